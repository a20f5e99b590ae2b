"""Where the GPU time of a profiled training window goes, from its ``torch.profiler`` Chrome trace.

``bioscale train ... profiler.enabled=true profiler.mode=torch profiler.start_step=40 profiler.end_step=42`` writes
``<run_dir>/profile/trace_rank0.json``; this reads it and prints (and with ``--json`` writes) per step:

- the kernel families (:func:`bench_train.kernel_category`: attention, GEMM, norm, optimizer, ...) in ms and share of
  the window, and ``GPU idle``: the part of the window no kernel, copy or memset covered (host work, syncs, launch
  gaps; the union of the device intervals, so overlapping streams are not counted twice);
- the costliest kernels (calls and ms per step);
- the longest gaps between consecutive device activities, each with the kernel before and after it: a gap after
  a small kernel in the middle of the forward is a host sync, a gap at a step boundary is the loop's host work;
- the host syncs (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` calls and
  blocking ``cudaMemcpyAsync`` copies longer than ``SYNC_MIN_US``) grouped by the operators they ran inside
  (outermost to innermost, e.g. ``autograd::engine::evaluate_function: IndexBackward0 > aten::index_put_ >
  aten::nonzero``), with their number and host wait per step: which operator makes the GPU wait.

The window is the profiled steps from the first device activity to the last; ``--steps`` is their number (default:
the ``step_*`` ranges the trace holds). Usage: ``python benchmarks/trace_summary.py TRACE [--steps N] [--json F]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import kernel_category  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_STEP_RANGE = re.compile(r"^step_\d+$")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# A cudaMemcpyAsync this long waited for the stream (a device-to-host copy of a value the host needs).
SYNC_MIN_US = 20.0


def load_trace(path: Path) -> dict[str, Any]:
    """A Chrome trace as written by ``torch.profiler`` (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    if not isinstance(trace, dict) or "traceEvents" not in trace:
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents)")
    return trace


def summarize_trace(trace: Mapping[str, Any], *, steps: int | None = None, top: int = 25,
                    gaps: int = 12) -> dict[str, Any]:  # fmt: skip
    """The window's per-step kernel families, costliest kernels and longest device gaps (module docstring)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: float(e["ts"]))
    if not device:
        raise ValueError("the trace holds no device activity (kernels, copies, memsets): was CUDA profiled?")
    if steps is None:
        steps = len({e["name"] for e in events if e.get("cat") == "user_annotation" and _STEP_RANGE.match(e["name"])})
    steps = max(1, steps)
    start = float(device[0]["ts"])
    end = max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in device)
    window_us = end - start

    # Copies and memsets by their trace category (their names, "Memcpy HtoD (Pinned -> Device)", match no family).
    family_of = {e["name"]: kernel_category(e["name"]) if e["cat"] == "kernel" else "memcpy / memset" for e in device}
    per_kernel: dict[str, list[float]] = {}
    busy_us, covered_to = 0.0, start
    longest: list[tuple[float, str, str]] = []
    previous = None
    for event in device:
        begin, duration = float(event["ts"]), float(event.get("dur", 0.0))
        stats = per_kernel.setdefault(event["name"], [0, 0.0])
        stats[0] += 1
        stats[1] += duration
        if begin > covered_to and previous is not None:
            longest.append((begin - covered_to, previous["name"], event["name"]))
        busy_us += max(0.0, begin + duration - max(begin, covered_to))
        if begin + duration > covered_to:
            covered_to, previous = begin + duration, event
    families: dict[str, float] = {}
    for name, (_, duration) in per_kernel.items():
        family = family_of[name]
        families[family] = families.get(family, 0.0) + duration
    ms = 1e-3 / steps
    family_rows = [{"family": f, "ms_per_step": us * ms, "share": us / window_us}
                   for f, us in sorted(families.items(), key=lambda item: item[1], reverse=True)]  # fmt: skip
    family_rows.append({"family": "GPU idle", "ms_per_step": (window_us - busy_us) * ms,
                        "share": (window_us - busy_us) / window_us})  # fmt: skip
    kernels = sorted(per_kernel.items(), key=lambda item: item[1][1], reverse=True)[:top]
    syncs = _host_syncs(events, steps)
    longest.sort(reverse=True)
    return {
        "steps": steps,
        "ms_per_step": window_us * ms,
        "kernels_per_step": sum(count for count, _ in per_kernel.values()) / steps,
        "families": family_rows,
        "kernels": [{"kernel": name[:140], "family": family_of[name], "calls_per_step": count / steps,
                     "ms_per_step": us * ms} for name, (count, us) in kernels],  # fmt: skip
        "gaps": [{"us": us, "after": before[:100], "before": after[:100]} for us, before, after in longest[:gaps]],
        "syncs": syncs,
    }


def _host_syncs(events: Sequence[Mapping[str, Any]], steps: int, depth: int = 4) -> list[dict[str, Any]]:
    """Host syncs grouped by the chain of operators around them (module docstring), costliest first."""
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and (
        e["name"] in SYNC_CALLS or (e["name"] == "cudaMemcpyAsync" and float(e.get("dur", 0.0)) >= SYNC_MIN_US))]
    operators: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
    for event in events:
        if event.get("cat") in ("cpu_op", "user_annotation"):
            operators.setdefault((event.get("pid"), event.get("tid")), []).append(event)
    groups: dict[str, list[float]] = {}
    for sync in syncs:
        begin = float(sync["ts"])
        around = [op for op in operators.get((sync.get("pid"), sync.get("tid")), [])
                  if float(op["ts"]) <= begin <= float(op["ts"]) + float(op.get("dur", 0.0))]  # fmt: skip
        around.sort(key=lambda op: -float(op.get("dur", 0.0)))  # outermost first
        names = [op["name"] for op in around if not _STEP_RANGE.match(op["name"])]
        chain = " > ".join((names[:1] + names[-(depth - 1):]) if len(names) > depth else names) or "(no operator)"
        stats = groups.setdefault(f"{chain} [{sync['name']}]", [0, 0.0])
        stats[0] += 1
        stats[1] += float(sync.get("dur", 0.0))
    rows = sorted(groups.items(), key=lambda item: item[1][1], reverse=True)
    return [{"where": where[:300], "per_step": count / steps, "wait_ms_per_step": us * 1e-3 / steps}
            for where, (count, us) in rows]  # fmt: skip


def render(summary: Mapping[str, Any]) -> str:
    lines = [f"{summary['steps']} steps, {summary['ms_per_step']:.2f} ms of window per step, "
             f"{summary['kernels_per_step']:.0f} device activities per step", "", "| family | ms/step | share |",
             "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['family']} | {r['ms_per_step']:.2f} | {100 * r['share']:.1f}% |" for r in summary["families"]]
    lines += ["", "| kernel | family | calls/step | ms/step |", "|---|---|---:|---:|"]
    lines += [f"| `{r['kernel']}` | {r['family']} | {r['calls_per_step']:.1f} | {r['ms_per_step']:.3f} |"
              for r in summary["kernels"]]  # fmt: skip
    lines += ["", "| gap µs | after | before |", "|---:|---|---|"]
    lines += [f"| {g['us']:.0f} | `{g['after']}` | `{g['before']}` |" for g in summary["gaps"]]
    lines += ["", "| host sync (operators, outermost first) | per step | host wait ms/step |", "|---|---:|---:|"]
    lines += [f"| `{r['where']}` | {r['per_step']:.1f} | {r['wait_ms_per_step']:.3f} |" for r in summary["syncs"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: the trace's step_* ranges)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = summarize_trace(load_trace(args.trace), steps=args.steps, top=args.top)
    print(render(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
