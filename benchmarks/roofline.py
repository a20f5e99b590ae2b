"""Roofline of one bench_train.py step, on CPU: FLOPs / 789 TFLOP/s and bytes / HBM bandwidth, per model.

For each ``--models`` entry (bench_train.py syntax) this plans the benchmark's steps on the real data and prints

- FLOPs per step: the model spec's count (``flops_per_token`` at the token-weighted mean length, times real tokens:
  the MFU numerator), and what the GPU executes: GEMMs ``6 * matmul_params`` per computed token (padding included)
  plus attention (PaLM's ``12 * L * H * head_dim * seq``; a causal kernel does half of it);
- the compute floor: executed FLOPs / 789 TFLOP/s (the bf16 GEMM rate measured on the lent H100; the H200 has the
  same SMs and clocks, so the same rate is assumed);
- bytes per step that no GEMM hides: weights and optimizer, and the activations of the elementwise kernels (norms,
  rotary, activation function, residual adds), under the byte model below; and their time at 4.8 TB/s (H200) and
  3.35 TB/s (H100 SXM) datasheet HBM bandwidth;
- two ceilings in tokens/s: ``max`` (perfect overlap of compute and memory, the textbook roofline) and ``sum``
  (GEMMs and memory-bound kernels one after another on one stream, which is how a training step runs).

Byte model (bf16 = 2 bytes; ideal fused kernels, each tensor touched the fewest times its op needs):

- weights / optimizer, bytes per parameter: ``fp32`` (fp32 weights + autocast) 46 = cast fp32->bf16 per forward (6)
  + bf16 weight reads by the forward and the input-gradient GEMMs (4) + bf16 weight gradient (2) + its cast and
  accumulation into the fp32 ``.grad`` (6) + fused AdamW reading weight, grad, m, v and writing weight, m, v in fp32
  (28); ``bf16`` 20 = 4 + 2 + AdamW in bf16 (14); ``bf16-master`` 46 = 4 + 2 + grad cast (6) + fp32 AdamW (28) +
  master -> bf16 copy (6).
- activations, elements per token per layer in the forward: norm (read x, write y: 2d) + rotary (read and write q, k)
  + residual add fused with the second norm (read 2d, write 2d) + activation function (GELU: read f, write f;
  SwiGLU: read 2f, write f) + final residual add (read 2d, write d); the backward moves twice that. Under autocast the
  residual stream and norm inputs/outputs are fp32 (autocast runs layer_norm in fp32), so the 9d of those terms
  cost 4 bytes instead of 2.

::

    python benchmarks/roofline.py
    python benchmarks/roofline.py --models esm2_650M:tokens=32768 --params bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GEMM_FLOPS = 789e12  # bf16 GEMM rate measured on the lent H100
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet, SXM
OPTIMIZER_BYTES_PER_PARAM = {"fp32": 46, "bf16": 20, "bf16-master": 46}


def _bench_train() -> Any:
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def activation_bytes_per_token(config: Any, *, gated: bool, autocast: bool) -> float:
    """Elementwise-kernel bytes per token for all layers, forward + backward (module docstring)."""
    d = config.hidden_size
    f = config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    k = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    act = 3 * f if gated else 2 * f  # SwiGLU (Llama) reads gate and up; GELU (ESM-2) reads one
    residual_terms = 2 * d + 4 * d + 3 * d  # norm 1, residual + norm 2, final residual
    forward_elements = residual_terms + 2 * (q + k) + act
    bytes_forward = 2 * forward_elements + (2 * residual_terms if autocast else 0)
    return 3 * bytes_forward * config.num_hidden_layers  # forward + backward (twice the forward)


def roofline(case: Any, examples: Sequence[Any], *, num_steps: int, params: str) -> dict[str, float]:
    bench = _bench_train()
    import importlib as _importlib

    from bioscale.models import build_model, get_model_spec

    config = bench._model_config(case, "sdpa")
    spec_module = _importlib.import_module(f"bioscale.models.{case.family}.spec")
    matmul_params = spec_module.matmul_params(config)
    num_params = sum(p.numel() for p in build_model(config, device="meta").parameters())
    plans = bench.plan_steps(examples, case, num_steps)
    lengths = [len(e) for plan in plans for e in plan.sequences]
    real = sum(lengths) / num_steps
    computed = case.tokens * case.grad_acc
    seq = sum(n * n for n in lengths) / sum(lengths)  # token-weighted mean length (what attention sees)
    model_flops = get_model_spec(case.family).flops_per_token(config, seq) * real
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Executed attention: every segment, the padding segment of greedy packing included (the kernel attends within it).
    pad_segments = [case.tokens - sum(len(e) for e in pack) for plan in plans for pack in plan.packs]
    squares = sum(n * n for n in lengths) + sum(n * n for n in pad_segments)
    attention_flops = 12.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * squares / num_steps
    if case.data == "dna":  # causal: the kernel skips the upper triangle
        attention_flops /= 2
    gemm_flops = 6.0 * matmul_params * computed
    optimizer_bytes = OPTIMIZER_BYTES_PER_PARAM[params] * num_params
    gated = case.family == "llama3"  # SwiGLU; ESM-2 uses GELU
    activation_bytes = activation_bytes_per_token(config, gated=gated, autocast=params == "fp32") * computed
    out = {
        "real_tokens": real,
        "seq": seq,
        "model_flops": model_flops,
        "gemm_flops": gemm_flops,
        "attention_flops": attention_flops,
        "compute_ms": 1e3 * (gemm_flops + attention_flops) / GEMM_FLOPS,
        "gemm_ms": 1e3 * gemm_flops / GEMM_FLOPS,
        "optimizer_gb": optimizer_bytes / 1e9,
        "activation_gb": activation_bytes / 1e9,
    }
    for gpu, bandwidth in HBM_BYTES_PER_S.items():
        memory_ms = 1e3 * (optimizer_bytes + activation_bytes) / bandwidth
        out[f"memory_ms_{gpu}"] = memory_ms
        out[f"ceiling_max_{gpu}"] = real / (1e-3 * max(out["compute_ms"], memory_ms))
        out[f"ceiling_sum_{gpu}"] = real / (1e-3 * (out["compute_ms"] + memory_ms))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="esm2_650M,esm2_3B:tokens=16384:ac=none,llama3_1B")
    parser.add_argument("--params", choices=tuple(OPTIMIZER_BYTES_PER_PARAM), default="fp32")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    bench = _bench_train()
    print(f"params={args.params}; compute floor at {GEMM_FLOPS / 1e12:.0f} TFLOP/s; memory at "
          + ", ".join(f"{gpu} {bw / 1e12:.2f} TB/s" for gpu, bw in HBM_BYTES_PER_S.items()))
    print("| model | real tok/step | mean len | model TFLOP/step | GEMM + attn TFLOP | compute ms | opt GB | act GB "
          "| mem ms H200 / H100 | ceiling tok/s max (H200) | sum H200 / H100 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cache: dict[tuple[str, int], list[Any]] = {}
    for text in bench.expand_models(args.models):
        case = bench.parse_model(text)
        key = (case.data, case.max_length)
        if key not in cache:
            cache[key] = bench.load_examples(case.data, case.max_length, args.data_dir or bench.DEFAULT_DATA_DIR,
                                             seed=0, limit=None)
        r = roofline(case, cache[key], num_steps=args.steps, params=args.params)
        print(f"| {case.label} | {r['real_tokens']:,.0f} | {r['seq']:.0f} | {r['model_flops'] / 1e12:.1f} "
              f"| {r['gemm_flops'] / 1e12:.1f} + {r['attention_flops'] / 1e12:.1f} | {r['compute_ms']:.0f} "
              f"| {r['optimizer_gb']:.0f} | {r['activation_gb']:.0f} | {r['memory_ms_H200']:.0f} / "
              f"{r['memory_ms_H100']:.0f} | {r['ceiling_max_H200']:,.0f} | {r['ceiling_sum_H200']:,.0f} / "
              f"{r['ceiling_sum_H100']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
