"""``GeneformerConfig``: the Geneformer configuration, with the field names of ``transformers.BertConfig``.

Geneformer (Theodoris et al., 2023; Chen et al., 2024 for V2) is a post-LayerNorm BERT over genes ranked by expression:
word + learned absolute position + token-type embeddings, LayerNorm, dropout; blocks ``LN(x + Drop(Attn(x)))`` then
``LN(h + Drop(FFN(h)))`` with a ReLU FFN and biases everywhere; a masked-LM head dense → act → LayerNorm → decoder tied
to the word embeddings plus a bias. Fields ``BertConfig`` has keep its names and meaning, so conversion to and from
``BertForMaskedLM`` is a copy; bioscale adds ``padded_vocab_size`` (embedding / decoder rows padded without changing
outputs), ``attn_backend``, the special-token ids of the gene vocabulary (``mask_token_id``, and ``cls_token_id`` /
``eos_token_id`` in the V2 convention) and ``classifier_pooling`` for the cell-level head. ``BertConfig`` settings
Geneformer does not use (decoder mode, cross-attention, relative position embeddings) are refused by the converter.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name

# MLP / head activations bioscale implements (transformers' ACT2FN names). Geneformer uses "relu"; "gelu" is BERT's
# (the exact erf form, as transformers' GELUActivation).
SUPPORTED_ACTIVATIONS = ("relu", "gelu")
CLASSIFIER_POOLING = ("mean", "cls")


class GeneformerConfig(PretrainedConfig):
    r"""Configuration of a Geneformer model (``model_type="bioscale_geneformer"``).

    Args:
        vocab_size: number of real tokens (V1: 25,426 = ``<pad>``, ``<mask>`` and 25,424 genes; V2: 20,275).
        padded_vocab_size: rows of the embedding / decoder matrices, ``>= vocab_size`` (``None``: no padding).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the encoder shape.
        hidden_act: the FFN and LM-head activation, ``"relu"`` (Geneformer) or ``"gelu"`` (exact erf, BERT's).
        hidden_dropout_prob: dropout after the embeddings, the attention output and the FFN (Geneformer: 0.02).
        attention_probs_dropout_prob: dropout on attention probabilities (padded ``sdpa`` batches only; packed
            and context-parallel batches need 0; Geneformer: 0.02).
        max_position_embeddings: learned positions, the longest cell in tokens (V1: 2,048; V2: 4,096).
        type_vocab_size: rows of the token-type (segment) table; Geneformer uses only row 0.
        initializer_range: std of the normal init of linear and embedding weights (0.02).
        layer_norm_eps: epsilon of every LayerNorm (1e-12).
        pad_token_id, mask_token_id: ``<pad>`` (0) and ``<mask>`` (1) in both conventions.
        cls_token_id, eos_token_id: V2's ``<cls>`` / ``<eos>`` (``None`` in V1).
        classifier_pooling: what the sequence (cell) classification head reads: ``"mean"`` over the cell's tokens
            (bioscale's default; V1 cells have no ``<cls>``) or ``"cls"``, the first token, as
            ``BertForSequenceClassification``'s pooler does (set by the converter for that class).
        classifier_dropout: dropout before the classification heads (``None``: ``hidden_dropout_prob``).
        attn_backend: ``"sdpa"``, ``"varlen"`` or ``"flex"``; packed inputs use ``varlen`` unless this is ``"flex"``.
    """

    model_type = "bioscale_geneformer"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["num_label_tokens"]

    def __init__(
        self,
        vocab_size: int = 25426,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.02,
        max_position_embeddings: int = 2048,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        mask_token_id: int = 1,
        cls_token_id: int | None = None,
        eos_token_id: int | None = None,
        classifier_pooling: str = "mean",
        classifier_dropout: float | None = None,
        padded_vocab_size: int | None = None,
        attn_backend: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: choose one of {SUPPORTED_ACTIVATIONS}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if padded_vocab_size is not None and padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= vocab_size ({vocab_size})")
        if classifier_pooling not in CLASSIFIER_POOLING:
            raise ValueError(f"classifier_pooling={classifier_pooling!r}: choose one of {CLASSIFIER_POOLING}")
        if type_vocab_size < 1:
            raise ValueError(f"type_vocab_size ({type_vocab_size}) must be >= 1 (row 0 is added to every token)")
        for name, value in (("hidden_dropout_prob", hidden_dropout_prob),
                            ("attention_probs_dropout_prob", attention_probs_dropout_prob)):  # fmt: skip
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} ({value}) must be in [0, 1)")
        for name, token_id in (("pad_token_id", pad_token_id), ("mask_token_id", mask_token_id),
                               ("cls_token_id", cls_token_id), ("eos_token_id", eos_token_id)):  # fmt: skip
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} ({token_id}) must be inside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.mask_token_id = mask_token_id
        self.cls_token_id = cls_token_id
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        self.padded_vocab_size = padded_vocab_size
        self.attn_backend = check_backend_name(attn_backend)
        # BERT ties its decoder to the word embeddings; bioscale reads the embedding weight in the head directly.
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding / decoder matrices: ``padded_vocab_size`` or ``vocab_size``."""
        return self.padded_vocab_size or self.vocab_size

    @property
    def head_dropout(self) -> float:
        """Dropout of the classification heads (BERT's rule: ``classifier_dropout`` or ``hidden_dropout_prob``)."""
        return float(self.classifier_dropout if self.classifier_dropout is not None else self.hidden_dropout_prob)
