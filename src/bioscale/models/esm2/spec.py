"""ESM-2 registry entry: named sizes (the published architectures plus ``debug``) and the FLOP count."""

from __future__ import annotations

from typing import Any

from bioscale.models.esm2.config import Esm2Config
from bioscale.models.esm2.convert import from_hf, to_hf
from bioscale.models.esm2.modeling import (
    Esm2ForMaskedLM,
    Esm2ForSequenceClassification,
    Esm2ForTokenClassification,
    Esm2Model,
)
from bioscale.models.registry import ModelSpec


def _published(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    # Every published ESM-2 uses a 4x MLP, the 33-token alphabet and 1026 positions (1024 residues + <cls>/<eos>).
    return dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=33,
        max_position_embeddings=1026,
    )


# Shapes from Lin et al. (2023), Table S1 / the facebook/esm2_* checkpoints.
SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128),
    "esm2_t6_8M": _published(6, 320, 20),
    "esm2_t12_35M": _published(12, 480, 20),
    "esm2_t30_150M": _published(30, 640, 20),
    "esm2_t33_650M": _published(33, 1280, 20),
    "esm2_t36_3B": _published(36, 2560, 40),
    "esm2_t48_15B": _published(48, 5120, 40),
}


def matmul_params(config: Esm2Config) -> int:
    """Weights that take part in a matmul per token: the blocks' projections and the LM head (dense + decoder, the
    decoder at its padded size: the matmul that actually runs)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    lm_head = hidden * hidden + config.embedding_rows * hidden
    return config.num_hidden_layers * per_layer + lm_head


def flops_per_token(config: Esm2Config, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * D * seq_len``.

    ``N`` = :func:`matmul_params` (LM head included; the embedding lookup is not a matmul), ``L`` layers, ``D``
    hidden size. The attention term is PaLM's (Chowdhery et al., 2022, appendix B): ``q @ k^T`` and ``attn @ v``
    forward and backward for every key in the sequence.
    """
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


MODEL_SPEC = ModelSpec(
    name="esm2",
    config_class=Esm2Config,
    model_classes={
        "base": Esm2Model,
        "masked_lm": Esm2ForMaskedLM,
        "token_classification": Esm2ForTokenClassification,
        "sequence_classification": Esm2ForSequenceClassification,
    },
    default_task="masked_lm",
    sizes=SIZES,
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("esm",),
    flops_per_token=flops_per_token,
    modality="protein",
    tokenizer="protein",
    causal=False,
    hf_classes={
        "base": ("EsmModel", {"add_pooling_layer": False}),  # ESM-2 never trained the pooler; bioscale has none
        "masked_lm": ("EsmForMaskedLM", {}),
        "token_classification": ("EsmForTokenClassification", {}),
        # No sequence_classification entry: ESM's head reads <cls>, bioscale's pools the mean (a fresh head).
    },
    packing_tasks=frozenset({"base", "masked_lm", "token_classification", "sequence_classification"}),
    cp_tasks=frozenset({"base", "masked_lm", "token_classification"}),
    # 1026 positions hold 1024 tokens (<cls> + residues + <eos>): ESM's rotary positions never use the last two.
    position_offset=2,
    adapter_targets=("query", "value"),  # PEFT's default for stock "esm"
    hf_module_names=(
        ("esm.layers.{i}.attention.query", "esm.encoder.layer.{i}.attention.self.query"),
        ("esm.layers.{i}.attention.key", "esm.encoder.layer.{i}.attention.self.key"),
        ("esm.layers.{i}.attention.value", "esm.encoder.layer.{i}.attention.self.value"),
        ("esm.layers.{i}.attention.output.dense", "esm.encoder.layer.{i}.attention.output.dense"),
        ("esm.layers.{i}.mlp.intermediate.dense", "esm.encoder.layer.{i}.intermediate.dense"),
        ("esm.layers.{i}.mlp.output.dense", "esm.encoder.layer.{i}.output.dense"),
        ("lm_head.dense", "lm_head.dense"),
    ),
)
