"""AMPLIFY registry entry: named sizes (the released architectures plus ``debug``), the FLOP count, and the
published checkpoint format that ``bioscale.use.loading`` reads without running its remote code."""

from __future__ import annotations

from typing import Any

from bioscale.models.amplify.config import AmplifyConfig
from bioscale.models.amplify.convert import config_from_reference, from_hf, from_reference_state_dict, to_hf
from bioscale.models.amplify.modeling import (
    AmplifyForMaskedLM,
    AmplifyForSequenceClassification,
    AmplifyForTokenClassification,
    AmplifyModel,
)
from bioscale.models.registry import ModelSpec


def _released(layers: int, hidden: int, heads: int, intermediate: int) -> dict[str, Any]:
    # Both releases: the 27-token alphabet, 2048 positions (<bos> and <eos> included), 64-wide heads.
    return dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        vocab_size=27,
        max_position_embeddings=2048,
    )


# Shapes of chandar-lab/AMPLIFY_120M and AMPLIFY_350M (their config.json; Fournier et al. 2024, Table 1). The SwiGLU
# width is int(2I/3) rounded up to 8: 1712 and 2560.
SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=192),
    "120M": _released(24, 640, 10, 2560),
    "350M": _released(32, 960, 15, 3840),
}


def matmul_params(config: AmplifyConfig) -> int:
    """Weights that take part in a matmul per token: q/k/v/out, the SwiGLU's three matrices, and the decoder at its
    padded size (the matmul that actually runs)."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn
    return config.num_hidden_layers * per_layer + config.embedding_rows * hidden


def flops_per_token(config: AmplifyConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * D * seq_len``, as for ESM-2.

    ``N`` = :func:`matmul_params` (decoder included; the embedding lookup is not a matmul), ``L`` layers, ``D`` hidden
    size; the attention term is PaLM's (Chowdhery et al., 2022, appendix B), bidirectional.
    """
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


MODEL_SPEC = ModelSpec(
    name="amplify",
    config_class=AmplifyConfig,
    model_classes={
        "base": AmplifyModel,
        "masked_lm": AmplifyForMaskedLM,
        "token_classification": AmplifyForTokenClassification,
        "sequence_classification": AmplifyForSequenceClassification,
    },
    default_task="masked_lm",
    sizes=SIZES,
    # from_hf takes a loaded published AMPLIFY module; to_hf returns the published format (AmplifyReferenceCheckpoint,
    # whose save_pretrained writes what chandar-lab's remote code loads): there is no stock transformers class.
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("AMPLIFY",),
    flops_per_token=flops_per_token,
    modality="protein",
    tokenizer="amplify",
    causal=False,
    # No stock transformers classes: the Hub checkpoints are read through foreign_checkpoint instead.
    hf_classes={},
    packing_tasks=frozenset({"base", "masked_lm", "token_classification", "sequence_classification"}),
    cp_tasks=frozenset({"base", "masked_lm", "token_classification"}),
    foreign_checkpoint=(config_from_reference, from_reference_state_dict),
    adapter_targets=("q", "v"),
    # The published AMPLIFY's module paths (to_hf gives its state dict; the module is chandar-lab's remote code).
    hf_module_names=(
        *((f"amplify.layers.{{i}}.attention.{p}", f"transformer_encoder.{{i}}.{p}") for p in ("q", "k", "v", "wo")),
        *((f"amplify.layers.{{i}}.mlp.{p}", f"transformer_encoder.{{i}}.ffn.{p}") for p in ("w12", "w3")),
        ("lm_head", "decoder"),
    ),
)
