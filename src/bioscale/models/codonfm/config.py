"""``EnCodonConfig``: the CodonFM EnCodon configuration, with the field names of CodonFM's ``EnCodonConfig``.

EnCodon (NVIDIA CodonFM: Darabi, Cao, Naghipourfar et al., 2025) is a codon-level masked language model over coding
sequences. Fields of the reference config keep their names and meaning, so conversion is a copy: the encoder shape
(``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``), ``hidden_dropout_prob`` /
``attention_probs_dropout_prob`` (0.1 each in the released recipes), ``initializer_range`` (the MAGNETO init scale),
``layer_norm_eps`` (1e-12), ``rotary_theta`` and ``max_position_embeddings``. bioscale adds the special-token ids of
the 69-token vocabulary, ``padded_vocab_size`` (pad the embedding / decoder rows without changing outputs) and
``attn_backend``.

RoPE theta. The reference ``EnCodonConfig`` (``../shared/reference/codonfm_reference/encodon_config.py``) defaults to
``rotary_theta=1e5``, and its layers pass that value to the attention (whose own keyword default, 1e4, is therefore
never used): :data:`REFERENCE_ROTARY_THETA`, bioscale's default too. CodonFM's original training wrapper
(``EncodonPL``, NVIDIA-Digital-Bio/CodonFM ``src/models/encodon_pl.py``) has its own default of 1e4, which it writes
into the hyper-parameters saved with a checkpoint, so a converted checkpoint always takes the value its ``config.json``
states (or its ``inv_freq`` buffers imply: :func:`bioscale.models.codonfm.convert.config_from_reference`).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name

# The reference EnCodonConfig's default rotary_theta (what its attention uses unless a config says otherwise).
REFERENCE_ROTARY_THETA = 1e5
# CodonFM's vocabulary: <CLS> <SEP> <UNK> <PAD> <MASK>, then the 64 codons (bioscale.data.tokenizers.CODON_VOCAB).
CODON_VOCAB_SIZE = 69


class EnCodonConfig(PretrainedConfig):
    r"""Configuration of an EnCodon model (``model_type="bioscale_encodon"``).

    Args:
        vocab_size: real tokens (69: five specials and the 64 codons).
        padded_vocab_size: rows of the embedding / decoder matrices, ``>= vocab_size`` (``None``: no padding); 72 or
            128 align the decoder GEMM. Padding rows are zero, never looked up, sliced off the logits.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the encoder shape.
        hidden_act: the FFN activation; EnCodon's is ``"gelu"`` (exact erf), any other value is refused.
        hidden_dropout_prob: dropout after the embedding norm and on both sub-layer outputs.
        attention_probs_dropout_prob: dropout on the attention probabilities (padded ``sdpa`` batches only: the
            packed ``varlen`` / ``flex`` kernels have none, so packed training needs 0 here).
        initializer_range: the MAGNETO init scale: linear weights ~ xavier-normal with gain
            ``initializer_range * sqrt(ln(2 * num_hidden_layers))`` (gain 1 for the query and key projections),
            embedding ~ N(0, initializer_range).
        layer_norm_eps: epsilon of every LayerNorm (1e-12).
        classifier_dropout: dropout of the sequence classification / regression head.
        rotary_theta: RoPE base (see the module docstring).
        max_position_embeddings: the trained context in tokens, ``<CLS>`` and ``<SEP>`` included (2048). RoPE has no
            table, so longer inputs run; they are outside what the model saw in training.
        pad_token_id, cls_token_id, sep_token_id, unk_token_id, mask_token_id: the vocabulary's special tokens.
        attn_backend: ``"sdpa"``, ``"varlen"`` or ``"flex"`` (see :mod:`bioscale.models.attention`).
    """

    model_type = "bioscale_encodon"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["cache", "past_key_values", "num_label_tokens"]

    def __init__(
        self,
        vocab_size: int = CODON_VOCAB_SIZE,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        classifier_dropout: float = 0.1,
        rotary_theta: float = REFERENCE_ROTARY_THETA,
        max_position_embeddings: int = 2048,
        pad_token_id: int = 3,
        cls_token_id: int = 0,
        sep_token_id: int = 1,
        unk_token_id: int = 2,
        mask_token_id: int = 4,
        padded_vocab_size: int | None = None,
        attn_backend: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        if hidden_act != "gelu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: EnCodon's FFN activation is 'gelu' (exact)")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {hidden_size // num_attention_heads} must be even "
                "for RoPE"
            )
        if padded_vocab_size is not None and padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= vocab_size ({vocab_size})")
        for name, p in (("hidden_dropout_prob", hidden_dropout_prob),
                        ("attention_probs_dropout_prob", attention_probs_dropout_prob),
                        ("classifier_dropout", classifier_dropout)):  # fmt: skip
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"{name} ({p}) must be in [0, 1)")
        if float(rotary_theta) <= 0:
            raise ValueError(f"rotary_theta ({rotary_theta}) must be > 0")
        for name, token_id in (("pad_token_id", pad_token_id), ("mask_token_id", mask_token_id),
                               ("cls_token_id", cls_token_id), ("sep_token_id", sep_token_id)):  # fmt: skip
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} ({token_id}) must be inside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.classifier_dropout = float(classifier_dropout)
        self.rotary_theta = float(rotary_theta)
        self.max_position_embeddings = max_position_embeddings
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.unk_token_id = unk_token_id
        self.mask_token_id = mask_token_id
        self.padded_vocab_size = padded_vocab_size
        self.attn_backend = check_backend_name(attn_backend)
        # The head's decoder is its own matrix (untied from the embedding), with a bias.
        kwargs.setdefault("tie_word_embeddings", False)
        # <CLS> / <SEP> are the bos / eos of transformers' vocabulary (a saved config.json has both: these win).
        kwargs.pop("bos_token_id", None)
        kwargs.pop("eos_token_id", None)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=cls_token_id, eos_token_id=sep_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding / decoder matrices: ``padded_vocab_size`` or ``vocab_size``."""
        return self.padded_vocab_size or self.vocab_size

    @property
    def rope_theta(self) -> float:
        return self.rotary_theta
