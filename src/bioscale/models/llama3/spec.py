"""Llama 3 registry entry: named sizes (``debug``, the Llama 3.2 ``1B`` and Llama 3.1 ``8B`` shapes, ``lingua_1B``)
and FLOPs."""

from __future__ import annotations

from typing import Any

from bioscale.models.llama3.config import Llama3Config
from bioscale.models.llama3.convert import from_hf, to_hf
from bioscale.models.llama3.modeling import Llama3ForCausalLM, Llama3Model
from bioscale.models.registry import ModelSpec

SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rope_theta=500000.0,
    ),
    # Meta's Llama-3.2-1B shape (vocabulary aside: 16 layers, 2048 wide, SwiGLU 8192, 32 query / 8 KV heads of 64),
    # without its RoPE scaling, which extends a 128k-token vocabulary model's context past 8k and is not needed for
    # models trained from scratch at 8k (set ``rope_scaling`` in the overrides to add it). ~0.97B matmul weights.
    "1B": dict(
        num_hidden_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    # The Lingua 1B shape (facebookresearch/lingua apps/main/configs/llama_1B.yaml) with Llama 3 GQA: deeper and
    # narrower than Llama 3.2 1B (~1.26B matmul weights, head_dim 128). bioscale's "1B" until 2026-11-22, so the
    # Llama rows of the benchmark results before that date are this shape.
    "lingua_1B": dict(
        num_hidden_layers=25,
        hidden_size=2048,
        intermediate_size=6144,
        num_attention_heads=16,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    # Meta-Llama-3.1-8B's shape (vocabulary aside), with its long-context RoPE scaling.
    "8B": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    ),
}


def matmul_params(config: Llama3Config) -> int:
    """Weights that take part in a matmul per token: the blocks' projections and the LM head (at its padded size:
    the matmul that actually runs)."""
    hidden = config.hidden_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.embedding_rows * hidden


def flops_per_token(config: Llama3Config, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * (H * head_dim) * seq_len``.

    ``N`` = :func:`matmul_params` (LM head included; the embedding lookup is not a matmul). The attention term is
    PaLM's non-causal count (Chowdhery et al., 2022, appendix B), kept for causal models too, as torchtitan and
    most MFU reports do, so numbers compare across codebases (a causal kernel does about half of that work).
    """
    attention_width = config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * attention_width * seq_len


MODEL_SPEC = ModelSpec(
    name="llama3",
    config_class=Llama3Config,
    model_classes={"base": Llama3Model, "causal_lm": Llama3ForCausalLM},
    default_task="causal_lm",
    sizes=SIZES,
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("llama",),
    flops_per_token=flops_per_token,
    modality="dna",
    tokenizer="nucleotide",
    causal=True,
    hf_classes={"base": ("LlamaModel", {}), "causal_lm": ("LlamaForCausalLM", {})},
    packing_tasks=frozenset({"base", "causal_lm"}),
    cp_tasks=frozenset({"base", "causal_lm"}),
    adapter_targets=("q_proj", "v_proj"),  # PEFT's default for stock "llama"
    hf_module_names=(
        *((f"model.layers.{{i}}.attention.{p}", f"model.layers.{{i}}.self_attn.{p}")
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *((f"model.layers.{{i}}.mlp.{p}", f"model.layers.{{i}}.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")),
        ("lm_head", "lm_head"),
    ),  # fmt: skip
)
