"""Packed (varlen) attention kernels at bioscale's model shapes: torch's built-in flash kernel (FA2) vs FA4 / FA3.

``bioscale.models.attention.varlen_attention`` calls ``torch.nn.attention.varlen.varlen_attn``, whose flash ops torch
can reroute to FlashAttention 4 (``torch.nn.attention.activate_flash_attention_impl("FA4")``, needs the
``flash-attn-4`` package and its CUTLASS DSL wheels) or FA3. This script times forward + backward of that call for
each shape with each implementation on the same tensors, checks FA4's output and gradients against FA2's, and writes
a table to ``<out-dir>/<date>-<gpu>-attention.md``::

    python benchmarks/bench_attention.py                  # FA2 vs FA4 (rows say why an implementation is missing)
    python benchmarks/bench_attention.py --impls FA2,FA3

"new-N call ms" is one forward + backward on a batch with a different number of sequences, wall clock: what a
kernel that plans per batch geometry costs when every packed batch holds a different number of sequences, as in
training. (cuDNN's ragged attention, tried through ``aten._cudnn_attention_forward`` with ``cum_seq_q/k`` in commit
ef4b074, built a plan on every call on torch 2.11 — 50–150 ms per call — and returned wrong values: see
``results/2026-11-22-h100-attention.md``.)

Shapes: ESM-2 650M (20 heads × 64) and 3B (40 × 64) on 16,384 packed tokens of UniRef90-like lengths (uniform
100–1,024; bidirectional), Llama 3 1B (Llama 3.2 1B shape: 32 query / 8 KV heads × 64, causal) and the Lingua 1B
shape (16 / 8 × 128) on two 8,192-token sequences.
TFLOP/s counts the useful work: 4·L²·heads·head_dim per sequence forward (half for causal), 2.5× that for backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (query heads, kv heads, head_dim, causal, lengths generator)
SHAPES: dict[str, tuple[int, int, int, bool, str]] = {
    "esm2_650M": (20, 20, 64, False, "protein"),
    "esm2_3B": (40, 40, 64, False, "protein"),
    "llama3_1B": (32, 8, 64, True, "dna"),
    "llama3_lingua_1B": (16, 8, 128, True, "dna"),
}


def _lengths(kind: str, tokens: int, rng: np.random.Generator) -> list[int]:
    if kind == "dna":
        return [8192] * (tokens // 8192)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(min(rng.integers(100, 1025), tokens - sum(lengths))))
    return lengths


def _activate(impl: str) -> str | None:
    """Route torch's flash ops to ``impl`` (:func:`bioscale.models.flash_impl.activate_flash_impl`); returns why
    not, or None."""
    from bioscale.models.flash_impl import activate_flash_impl

    try:
        activate_flash_impl(impl)
    except Exception as err:  # noqa: BLE001 — report, don't crash: the other implementations still run
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def _time(fn: Any, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_shape(name: str, impls: list[str], tokens: int, iters: int) -> list[dict[str, Any]]:
    from bioscale.models.attention import AttentionInputs, varlen_attention

    heads, kv_heads, head_dim, causal, kind = SHAPES[name]
    rng = np.random.default_rng(0)
    lengths = _lengths(kind, tokens, rng)
    total = sum(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    inputs = AttentionInputs(
        backend="varlen", causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
        max_seqlen_k=max(lengths),
    )
    # The same tokens cut into one more sequence (the longest split in two): a new batch geometry.
    split = int(np.argmax(lengths))
    other = [*lengths[:split], lengths[split] // 2, lengths[split] - lengths[split] // 2, *lengths[split + 1 :]]
    cu_other = torch.tensor(np.concatenate([[0], np.cumsum(other)]), dtype=torch.int32, device="cuda")
    inputs_other = dataclasses.replace(inputs, cu_seqlens_q=cu_other, cu_seqlens_k=cu_other)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, total, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, total, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(1, total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops_fwd = sum(4.0 * n * n * heads * head_dim for n in lengths) * (0.5 if causal else 1.0)
    rows, reference = [], None
    for impl in impls:
        row: dict[str, Any] = {"shape": name, "impl": impl, "tokens": total, "sequences": len(lengths)}
        why = _activate(impl)
        if why is not None:
            rows.append({**row, "error": why})
            continue
        try:
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))

            def forward(qq=qq, kk=kk, vv=vv, batch=inputs) -> torch.Tensor:
                return varlen_attention(qq, kk, vv, batch, None)

            def forward_backward(qq=qq, kk=kk, vv=vv, batch=inputs) -> None:
                qq.grad = kk.grad = vv.grad = None
                forward(batch=batch).backward(grad_out)

            out = forward()
            forward_backward()
            result = (out.detach().float(), qq.grad.float(), kk.grad.float(), vv.grad.float())
            with torch.no_grad():
                fwd_ms = _time(forward, iters)
            fwd_bwd_ms = _time(forward_backward, iters)
            torch.cuda.synchronize()
            started = time.perf_counter()
            forward_backward(batch=inputs_other)
            torch.cuda.synchronize()
            row["new_shape_ms"] = (time.perf_counter() - started) * 1e3
            row.update(
                fwd_ms=fwd_ms,
                fwd_bwd_ms=fwd_bwd_ms,
                fwd_tflops=flops_fwd / fwd_ms / 1e9,
                fwd_bwd_tflops=3.5 * flops_fwd / fwd_bwd_ms / 1e9,
            )
            if reference is None:
                reference = result
            else:
                row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(result, reference))
            rows.append(row)
        except Exception as err:  # noqa: BLE001
            rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        finally:
            _activate("FA2")
    return rows


def render(rows: list[dict[str, Any]], env: dict[str, str], command: str) -> str:
    md = [
        f"# Packed attention kernels, {env['gpu']}, {env['date']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}.",
        "",
        "```bash",
        command,
        "```",
        "",
        (__doc__ or "").split("\n\n")[-1].strip(),
        "",
        "| shape | impl | sequences | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | vs FA2 | new-N call ms "
        "| max abs diff vs FA2 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            md.append(f"| {row['shape']} | {row['impl']} | {row['sequences']} | – | – | – | – | – | – | {row['error']} |")
            continue
        base = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "FA2" and "error" not in r), None)
        speedup = f"{base['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}×" if base else "–"
        diff = f"{row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "reference"
        md.append(
            f"| {row['shape']} | {row['impl']} | {row['sequences']} | {row['fwd_ms']:.2f} | {row['fwd_tflops']:.0f} "
            f"| {row['fwd_bwd_ms']:.2f} | {row['fwd_bwd_tflops']:.0f} | {speedup} | {row['new_shape_ms']:.1f} | {diff} |"
        )
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--impls", default="FA2,FA4", help="comma-separated: FA2 (torch built-in), FA3, FA4")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    impls = args.impls.split(",")
    if impls[0] != "FA2":
        impls = ["FA2", *[i for i in impls if i != "FA2"]]  # FA2 first: it is the reference
    rows = [row for name in args.shapes.split(",") for row in run_shape(name, impls, args.tokens, args.iters)]
    env = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }
    command = "python benchmarks/bench_attention.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    md = render(rows, env, command.strip())
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    (out / f"{env['date']}-{slug}-attention.md").write_text(md)
    (out / f"{env['date']}-{slug}-attention.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
