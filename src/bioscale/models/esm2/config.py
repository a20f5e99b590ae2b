"""``Esm2Config``: the ESM-2 configuration, with the field names of ``transformers.EsmConfig`` where they exist.

ESM-2 is a pre-LayerNorm BERT-style encoder with rotary position embeddings (Lin et al., 2023). Fields that
``EsmConfig`` has keep its names and meaning so conversion is a copy; bioscale adds ``padded_vocab_size`` (pad the
embedding / LM-head rows to a hardware-friendly multiple without changing outputs) and ``attn_backend``. Fields of
``EsmConfig`` that ESM-2 does not use (absolute positions, decoder mode, ESMFold) are rejected by the converter.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name


class Esm2Config(PretrainedConfig):
    r"""Configuration of an ESM-2 model (``model_type="bioscale_esm2"``).

    Args:
        vocab_size: number of real tokens (33 for the ESM-2 alphabet).
        padded_vocab_size: rows of the embedding / LM-head matrices, ``>= vocab_size`` (``None``: no padding).
            Padding rows are zero, never looked up, and sliced off the logits, so outputs do not change.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the encoder shape.
        max_position_embeddings: longest sequence the model was trained for (metadata; RoPE needs no table).
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_dropout_prob: dropout after the attention output and MLP projections (ESM-2 checkpoints: 0).
        attention_probs_dropout_prob: dropout on attention probabilities (padded ``sdpa`` batches only; ESM-2: 0).
        initializer_range: std of the normal init of linear and embedding weights.
        token_dropout: ESM's mask-token dropout: ``<mask>`` embeddings are zeroed and the rest rescaled by
            ``(1 - 0.15 * 0.8) / (1 - observed mask ratio)`` per sequence (see ``Esm2Embeddings``).
        emb_layer_norm_before: LayerNorm right after the embedding (ESM-1b; ``False`` for ESM-2).
        mask_token_id, pad_token_id, cls_token_id, eos_token_id: special tokens of the ESM alphabet.
        attn_backend: ``"sdpa"``, ``"varlen"`` or ``"flex"``; packed inputs use ``varlen`` unless this is ``"flex"``
            (see :mod:`bioscale.models.attention` for the full routing rule).
        rope_theta: RoPE base (10000 in ESM-2).
    """

    model_type = "bioscale_esm2"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["cache", "past_key_values", "num_label_tokens"]

    def __init__(
        self,
        vocab_size: int = 33,
        hidden_size: int = 320,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 20,
        intermediate_size: int = 1280,
        max_position_embeddings: int = 1026,
        layer_norm_eps: float = 1e-5,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        token_dropout: bool = True,
        emb_layer_norm_before: bool = False,
        mask_token_id: int = 32,
        pad_token_id: int = 1,
        cls_token_id: int = 0,
        eos_token_id: int = 2,
        padded_vocab_size: int | None = None,
        attn_backend: str = "sdpa",
        rope_theta: float = 10000.0,
        **kwargs: Any,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {hidden_size // num_attention_heads} "
                "must be even for RoPE"
            )
        if padded_vocab_size is not None and padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= vocab_size ({vocab_size})")
        for name, token_id in (("mask_token_id", mask_token_id), ("pad_token_id", pad_token_id)):
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} ({token_id}) must be inside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.token_dropout = token_dropout
        self.emb_layer_norm_before = emb_layer_norm_before
        self.mask_token_id = mask_token_id
        self.cls_token_id = cls_token_id
        self.padded_vocab_size = padded_vocab_size
        self.attn_backend = check_backend_name(attn_backend)
        self.rope_theta = rope_theta
        # ESM ties its LM decoder to the word embeddings; bioscale reads the embedding weight in the head directly.
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding / LM-head matrices: ``padded_vocab_size`` or ``vocab_size``."""
        return self.padded_vocab_size or self.vocab_size
