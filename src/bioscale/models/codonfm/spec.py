"""CodonFM EnCodon registry entry: named sizes (the released architectures, the reference's 5B and ``debug``), the FLOP
count, and the released checkpoint format that ``bioscale.use.loading`` reads without running any CodonFM code."""

from __future__ import annotations

from typing import Any

from bioscale.models.codonfm.config import EnCodonConfig
from bioscale.models.codonfm.convert import (
    config_from_reference,
    from_hf,
    from_reference_state_dict,
    is_reference_config,
    to_hf,
)
from bioscale.models.codonfm.modeling import EnCodonForMaskedLM, EnCodonForSequenceClassification, EnCodonModel
from bioscale.models.registry import ModelSpec


def _size(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, Any]:
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)


# Shapes of nvidia/NV-CodonFM-Encodon-80M-v1 / -600M-v1 / -1B-v1 (CodonFM's MODEL_ARCHITECTURES, src/config.py; the
# 1B-Cdwt checkpoint is the 1B shape trained with codon-weighted masking); 5B is the reference recipe's largest config
# (24 x 4096, 32 heads; FFN 4 x hidden like the others). All: 69 tokens, 2048 positions, head_dim 128 (debug: 32).
# The released sizes keep CodonFM's dropout (0.1 hidden and attention); debug has none, so that tests can compare a
# model against itself across layouts (packed / padded, context parallelism) in training mode.
SIZES: dict[str, dict[str, Any]] = {
    "debug": {**_size(2, 128, 4, 512), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "80M": _size(6, 1024, 8, 4096),
    "600M": _size(12, 2048, 16, 8192),
    "1B": _size(18, 2048, 16, 8192),
    "5B": _size(24, 4096, 32, 16384),
}


def matmul_params(config: EnCodonConfig) -> int:
    """Weights that take part in a matmul per token: q/k/v/out and the two FFN matrices per layer, the head's dense
    layer and its decoder at the padded size (the matmul that actually runs)."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    return config.num_hidden_layers * per_layer + hidden * hidden + config.embedding_rows * hidden


def flops_per_token(config: EnCodonConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * D * seq_len``, as for ESM-2 and AMPLIFY.

    ``N`` = :func:`matmul_params` (the embedding lookup is not a matmul; biases and LayerNorms are not counted), ``L``
    layers, ``D`` hidden size; the attention term is PaLM's (Chowdhery et al., 2022, appendix B), bidirectional.
    """
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


MODEL_SPEC = ModelSpec(
    name="codonfm",
    config_class=EnCodonConfig,
    model_classes={
        "base": EnCodonModel,
        "masked_lm": EnCodonForMaskedLM,
        "sequence_classification": EnCodonForSequenceClassification,
    },
    default_task="masked_lm",
    sizes=SIZES,
    # from_hf takes a loaded reference EnCodon module; to_hf returns the released format (EnCodonReferenceCheckpoint,
    # whose save_pretrained writes config.json + model.safetensors): there is no stock transformers class.
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("encodon",),
    flops_per_token=flops_per_token,
    modality="codon",
    tokenizer="codon",
    causal=False,
    hf_classes={},
    packing_tasks=frozenset({"base", "masked_lm", "sequence_classification"}),
    cp_tasks=frozenset({"base", "masked_lm"}),
    foreign_checkpoint=(config_from_reference, from_reference_state_dict),
    # The released config.json carries no model_type (it is EncodonPL's arguments): recognised by its fields.
    foreign_config_match=is_reference_config,
    adapter_targets=("query", "value"),
    # The reference EnCodon's module paths (to_hf gives its state dict).
    hf_module_names=(
        *((f"encodon.layers.{{i}}.attention.{p}", f"layers.{{i}}.attention.{p}") for p in ("query", "key", "value")),
        ("encodon.layers.{i}.attention.post_attn_dense", "layers.{i}.post_attn_dense"),
        ("encodon.layers.{i}.mlp.intermediate_dense", "layers.{i}.intermediate_dense"),
        ("encodon.layers.{i}.mlp.output_dense", "layers.{i}.output_dense"),
        ("lm_head.dense", "cls.0"),
        ("lm_head.decoder", "cls.3"),
    ),
)
