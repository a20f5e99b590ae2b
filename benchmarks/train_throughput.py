"""Steady-state throughput of ``bioscale train`` runs, read from their ``metrics.jsonl``: what a user of the recipe gets.

    python benchmarks/train_throughput.py RUN_DIR [RUN_DIR ...] [--skip-steps 20] [--json out.json]

For each run directory: the median over logged windows after ``--skip-steps`` (compilation and warm-up excluded) of
real (unpadded) tokens/s per GPU, all tokens/s, MFU (the trainer's own: the model spec's FLOPs at the window's
effective sequence length over the GPU's dense bf16 peak), step time; the largest peak memory; the first and last
logged loss; and the wall time before the first counted window (mostly ``torch.compile``). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def summarize(run_dir: Path, *, skip_steps: int) -> dict[str, Any]:
    """The steady-state numbers of one run; ``ValueError`` naming the file when it has no window after the skip."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: not found (is {run_dir} a bioscale train run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if "real_tokens_per_sec_per_gpu" in record and "step" in record:
            records.append(record)
    counted = [r for r in records if r["step"] > skip_steps]
    if not counted:
        steps = [r["step"] for r in records]
        raise ValueError(f"{path}: no training window after step {skip_steps} (logged steps: {steps})")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    def median(key: str) -> float | None:
        values = [r[key] for r in counted if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "run_dir": str(run_dir),
        "model": summary.get("model"),
        "steps_counted": f"{counted[0]['step']}-{counted[-1]['step']}",
        "real_tokens_per_s": median("real_tokens_per_sec_per_gpu"),
        "tokens_per_s": median("tokens_per_sec_per_gpu"),
        "mfu": median("mfu"),
        "step_time_s": median("step_time"),
        "peak_mem_gb": max((r.get("peak_mem_gb") or 0.0) for r in records),
        "first_loss": records[0].get("loss"),
        "last_loss": records[-1].get("loss"),
        "wall_time_s": summary.get("wall_time_s"),
    }


def render(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "| run | model | steps | real tokens/s | MFU | step s | peak GB | loss first → last | wall s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"| {Path(r['run_dir']).name} | {r['model']} | {r['steps_counted']} | {fmt(r['real_tokens_per_s'], ',.0f')} "
            f"| {fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | {fmt(r['step_time_s'], '.3f')} | {fmt(r['peak_mem_gb'], '.1f')} "
            f"| {fmt(r['first_loss'], '.3f')} → {fmt(r['last_loss'], '.3f')} | {fmt(r['wall_time_s'], '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--skip-steps", type=int, default=20, help="windows ending at or before this step are not counted")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for run_dir in args.run_dirs:
        try:
            rows.append(summarize(run_dir, skip_steps=args.skip_steps))
        except ValueError as exc:
            print(f"train_throughput: {exc}", file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if len(rows) == len(args.run_dirs) else 1


if __name__ == "__main__":
    sys.exit(main())
