"""``AmplifyConfig``: the AMPLIFY configuration, with the field names of chandar-lab's ``AMPLIFYConfig`` where it has
them.

AMPLIFY (Fournier et al., 2024) is a pre-RMSNorm protein encoder with interleaved rotary embeddings and a SwiGLU MLP.
Fields of the published config keep their names and meaning (``intermediate_size`` is the *nominal* width, which the
SwiGLU MLP shrinks to :attr:`AmplifyConfig.ffn_hidden_size`, exactly as the released code does), so conversion is a
copy. Two renames: the published ``max_length`` is ``max_position_embeddings`` here (what every bioscale tool reads as
the trained context), and the fixed architecture switches of the published config (``rms_norm``, ``att_bias``,
``ffn_bias``, ``layer_norm_after_embedding``, ``layer_norm_before_last_layer``) are not fields: bioscale implements the
released architecture, and the converter rejects any other value of them by name. bioscale adds ``padded_vocab_size``
(pad the embedding / decoder rows without changing outputs) and ``attn_backend``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name

# The published AMPLIFY code precomputes its rotary table with theta 10000 and has no setting for it.
ROPE_THETA = 10000.0
# The SwiGLU width is rounded up to a multiple of 8 (the released code's "misaligned operand" guard).
FFN_MULTIPLE_OF = 8


def swiglu_hidden_size(intermediate_size: int, multiple_of: int = FFN_MULTIPLE_OF) -> int:
    """AMPLIFY's SwiGLU width: ``int(2 * intermediate_size / 3)`` rounded up to ``multiple_of``.

    Keeps the parameter count of a ``intermediate_size``-wide two-matrix MLP (Shazeer, 2020): 2560 -> 1712 (120M),
    3840 -> 2560 (350M).
    """
    width = int(2 * intermediate_size / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class AmplifyConfig(PretrainedConfig):
    r"""Configuration of an AMPLIFY model (``model_type="bioscale_amplify"``).

    Args:
        vocab_size: number of real tokens (27 for the AMPLIFY alphabet).
        padded_vocab_size: rows of the embedding / decoder matrices, ``>= vocab_size`` (``None``: no padding).
            Padding rows are zero, never looked up, and sliced off the logits, so outputs do not change.
        hidden_size, num_hidden_layers, num_attention_heads: the encoder shape.
        intermediate_size: the nominal MLP width of the published config; the SwiGLU MLP is
            :attr:`ffn_hidden_size` wide.
        max_position_embeddings: longest input in tokens, ``<bos>`` and ``<eos>`` included (the published
            ``max_length``, 2048).
        norm_eps: epsilon of every RMSNorm.
        dropout_prob: dropout on the attention and MLP outputs and on attention probabilities (padded ``sdpa``
            batches), as in the published code (released checkpoints: 0).
        embedding_init_range, decoder_init_range: half-widths of the uniform init of the embedding and of every
            linear weight (the published initialisation).
        hidden_act: the MLP activation; AMPLIFY is ``"SwiGLU"`` (any other value is refused).
        pad_token_id, unk_token_id, mask_token_id, bos_token_id, eos_token_id: special tokens of the alphabet.
        attn_backend: ``"sdpa"``, ``"varlen"`` or ``"flex"``; packed inputs use ``varlen`` unless this is ``"flex"``
            (see :mod:`bioscale.models.attention` for the full routing rule).
    """

    model_type = "bioscale_amplify"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["cache", "past_key_values", "num_label_tokens"]

    def __init__(
        self,
        vocab_size: int = 27,
        hidden_size: int = 640,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 10,
        intermediate_size: int = 2560,
        max_position_embeddings: int = 2048,
        norm_eps: float = 1e-5,
        dropout_prob: float = 0.0,
        embedding_init_range: float = 0.02,
        decoder_init_range: float = 0.02,
        hidden_act: str = "SwiGLU",
        pad_token_id: int = 0,
        unk_token_id: int = 1,
        mask_token_id: int = 2,
        bos_token_id: int = 3,
        eos_token_id: int = 4,
        padded_vocab_size: int | None = None,
        attn_backend: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        if str(hidden_act).lower() != "swiglu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: AMPLIFY's MLP is 'SwiGLU'")
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
        if not 0.0 <= float(dropout_prob) < 1.0:
            raise ValueError(f"dropout_prob ({dropout_prob}) must be in [0, 1)")
        for name, token_id in (("pad_token_id", pad_token_id), ("mask_token_id", mask_token_id)):
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} ({token_id}) must be inside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.dropout_prob = dropout_prob
        self.embedding_init_range = embedding_init_range
        self.decoder_init_range = decoder_init_range
        self.hidden_act = hidden_act
        self.unk_token_id = unk_token_id
        self.mask_token_id = mask_token_id
        self.padded_vocab_size = padded_vocab_size
        self.attn_backend = check_backend_name(attn_backend)
        # AMPLIFY's decoder is its own matrix (untied from the embedding), with a bias.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the SwiGLU MLP: :func:`swiglu_hidden_size` of ``intermediate_size``."""
        return swiglu_hidden_size(self.intermediate_size)

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding / decoder matrices: ``padded_vocab_size`` or ``vocab_size``."""
        return self.padded_vocab_size or self.vocab_size

    @property
    def rope_theta(self) -> float:
        return ROPE_THETA
