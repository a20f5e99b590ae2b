"""``Llama3Config``: the Llama 3 configuration, with the field names of ``transformers.LlamaConfig``.

Used here as a causal language model over DNA (a small nucleotide vocabulary), but any vocabulary size works. RoPE is
described the ``transformers`` 4.x way, ``rope_theta`` plus ``rope_scaling`` (``None`` or a ``llama3`` dict), on every
``transformers`` version (5.x calls the pair ``rope_parameters``; the converter translates). bioscale adds
``padded_vocab_size`` and ``attn_backend``. Llama variants outside Llama 3 (biases, other activations, other RoPE
scalings) are rejected by the converter.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name
from bioscale.models.rotary import validate_rope_scaling


class Llama3Config(PretrainedConfig):
    r"""Configuration of a Llama 3 model (``model_type="bioscale_llama3"``).

    Args:
        vocab_size: number of real tokens (default 16, a nucleotide vocabulary; set it to the tokenizer's size).
        padded_vocab_size: rows of the embedding / LM-head matrices, ``>= vocab_size`` (``None``: no padding);
            padding rows are zero and sliced off the logits, so outputs do not change.
        hidden_size, intermediate_size, num_hidden_layers: the decoder shape (SwiGLU MLP of width
            ``intermediate_size``).
        num_attention_heads, num_key_value_heads: query heads and shared key/value heads (grouped-query attention;
            ``None`` means as many as query heads).
        head_dim: size of one head (``None``: ``hidden_size // num_attention_heads``).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: ``None`` or ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (Llama 3.1 long-context frequency scaling).
        max_position_embeddings: context length the model is meant for (metadata; RoPE needs no table).
        tie_word_embeddings: LM head shares the embedding matrix.
        attention_dropout: dropout on attention probabilities (padded ``sdpa`` batches only; Llama 3: 0).
        initializer_range: std of the normal init of linear and embedding weights.
        bos_token_id, eos_token_id, pad_token_id: special tokens (used by ``generate``).
        attn_backend: ``"sdpa"``, ``"varlen"`` or ``"flex"``; packed inputs use ``varlen`` unless this is ``"flex"``
            (see :mod:`bioscale.models.attention`).
        use_cache: whether ``generate`` keeps a KV cache (a plain forward never builds one unless asked).
    """

    model_type = "bioscale_llama3"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["cache", "past_key_values", "num_label_tokens"]
    # transformers 5 turns `rope_scaling` into a deprecated alias of `rope_parameters` on the base class; a plain
    # class attribute shadows that property so this config stores rope_scaling as itself on every version.
    rope_scaling = None

    def __init__(
        self,
        vocab_size: int = 16,
        hidden_size: int = 2048,
        intermediate_size: int = 6144,
        num_hidden_layers: int = 25,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 8192,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        padded_vocab_size: int | None = None,
        attn_backend: str = "sdpa",
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({num_key_value_heads})"
            )
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}) "
                    "unless head_dim is given"
                )
            head_dim = hidden_size // num_attention_heads
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for RoPE")
        if padded_vocab_size is not None and padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= vocab_size ({vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.rope_scaling = validate_rope_scaling(rope_scaling)
        self.max_position_embeddings = max_position_embeddings
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.padded_vocab_size = padded_vocab_size
        self.attn_backend = check_backend_name(attn_backend)
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding / LM-head matrices: ``padded_vocab_size`` or ``vocab_size``."""
        return self.padded_vocab_size or self.vocab_size
