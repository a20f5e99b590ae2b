"""Geneformer registry entry: named sizes (the published checkpoints, the reference recipe's from-scratch models and
``debug``) and the FLOP count."""

from __future__ import annotations

from typing import Any

from bioscale.models.geneformer.config import GeneformerConfig
from bioscale.models.geneformer.convert import from_hf, to_hf
from bioscale.models.geneformer.modeling import (
    GeneformerForMaskedLM,
    GeneformerForSequenceClassification,
    GeneformerForTokenClassification,
    GeneformerModel,
)
from bioscale.models.registry import ModelSpec

# Vocabulary sizes: V1 (Genecorpus-30M) = <pad>, <mask> and 25,424 Ensembl genes; V2 (Genecorpus-104M) = 20,275 tokens.
V1_VOCAB_SIZE = 25426
V2_VOCAB_SIZE = 20275


def _shape(layers: int, hidden: int, heads: int, ffn: int, positions: int, vocab: int) -> dict[str, Any]:
    return dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        vocab_size=vocab,
    )


# Published shapes: V1-10M (Theodoris et al. 2023; ctheodoris/Geneformer gf-6L-30M-i2048), V2-104M / V2-316M
# (Chen et al. 2024; gf-12L-104M-i4096, gf-18L-316M-i4096), and the from-scratch 106M / 4B of the reference recipe
# (bionemo geneformer_native_te: 12 x 768 and 36 x 2560 over the V1 vocabulary and 2,048 positions). Every size uses
# Geneformer's ReLU, dropout 0.02, LayerNorm eps 1e-12 and init normal(0.02) (the config defaults). "4B" keeps the
# reference recipe's name; its 36 x 2560 / FFN 10240 shape holds 2.91B parameters. ``debug`` has no dropout, so that
# tests can compare the model against itself across layouts (padded / packed, context parallelism) in training mode,
# and packed batches (no attention dropout in the varlen kernel) train with it as it is.
SIZES: dict[str, dict[str, Any]] = {
    "debug": {**_shape(2, 64, 4, 128, 2048, V1_VOCAB_SIZE), "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0},  # fmt: skip
    "V1_10M": _shape(6, 256, 4, 512, 2048, V1_VOCAB_SIZE),
    "V2_104M": _shape(12, 768, 12, 3072, 4096, V2_VOCAB_SIZE),
    "V2_316M": _shape(18, 1152, 18, 4608, 4096, V2_VOCAB_SIZE),
    "106M": _shape(12, 768, 12, 3072, 2048, V1_VOCAB_SIZE),
    "4B": _shape(36, 2560, 40, 10240, 2048, V1_VOCAB_SIZE),
}


def matmul_params(config: GeneformerConfig) -> int:
    """Weights that take part in a matmul per token: the blocks' projections and the LM head (dense + decoder, the
    decoder at its padded size: the matmul that actually runs). Embedding lookups are not matmuls."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    lm_head = hidden * hidden + config.embedding_rows * hidden
    return config.num_hidden_layers * per_layer + lm_head


def flops_per_token(config: GeneformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * D * seq_len``, as for ESM-2 (bidirectional attention, PaLM's
    attention term, Chowdhery et al. 2022, appendix B). The decoder counts at every position, as a plain BERT runs
    it; the trainer's masked-only head (``logits_on_labels_only``) does ~85% less of that work, so MFU computed with
    this count is conservative for MLM training."""
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


MODEL_SPEC = ModelSpec(
    name="geneformer",
    config_class=GeneformerConfig,
    model_classes={
        "base": GeneformerModel,
        "masked_lm": GeneformerForMaskedLM,
        "token_classification": GeneformerForTokenClassification,
        "sequence_classification": GeneformerForSequenceClassification,
    },
    default_task="masked_lm",
    sizes=SIZES,
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("bert",),
    flops_per_token=flops_per_token,
    modality="cells",
    tokenizer="geneformer",
    causal=False,
    hf_classes={
        "base": ("BertModel", {"add_pooling_layer": False}),  # the masked LM never trains BERT's pooler
        "masked_lm": ("BertForMaskedLM", {}),
        "token_classification": ("BertForTokenClassification", {}),
        # No sequence_classification entry: a fresh cell head mean-pools (classifier_pooling="mean"); from_hf of a
        # BertForSequenceClassification keeps its first-token pooler instead.
    },
    packing_tasks=frozenset({"base", "masked_lm", "token_classification", "sequence_classification"}),
    # Token-local heads only; the position embedding reads the shard's global positions under CP.
    cp_tasks=frozenset({"base", "masked_lm", "token_classification"}),
    adapter_targets=("query", "value"),  # PEFT's default for stock "bert"
    hf_module_names=(
        *((f"bert.layers.{{i}}.attention.{p}", f"bert.encoder.layer.{{i}}.attention.self.{p}")
          for p in ("query", "key", "value")),
        ("bert.layers.{i}.attention.output.dense", "bert.encoder.layer.{i}.attention.output.dense"),
        ("bert.layers.{i}.mlp.intermediate.dense", "bert.encoder.layer.{i}.intermediate.dense"),
        ("bert.layers.{i}.mlp.output.dense", "bert.encoder.layer.{i}.output.dense"),
        ("lm_head.dense", "cls.predictions.transform.dense"),
    ),
)
