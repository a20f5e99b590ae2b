"""``benchmarks/bench_multi_gpu.py --smoke`` on CPU (gloo, tiny models): the driver, torchrun workers and report.

A second run measures only the 2-rank half and merges the 1-rank rows of the first (``--nprocs 2 --merge``), as the
GPU results were assembled from two device calls; the report must then pair them into a scaling efficiency. FP8 rows
(emulated on CPU) run next to bf16 ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_multi_gpu.py"


def _run(out_dir: Path, *args: str) -> Path:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--phases", "fsdp", "--out-dir", str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = out_dir.glob("*-multigpu-smoke.md")
    return report


def test_one_rank_rows_merge_into_a_two_rank_run(tmp_path):
    first = _run(tmp_path / "one", "--nprocs", "1")
    rows = json.loads(first.with_suffix(".json").read_text())["rows"]
    assert [(r["phase"], r["gpus"], r["strategy"], r["ok"]) for r in rows] == [("fsdp", 1, "fsdp2", True)]
    merged_input = tmp_path / "one_rank.jsonl"
    merged_input.write_text("".join(json.dumps(r) + "\n" for r in rows))

    second = _run(tmp_path / "two", "--nprocs", "2", "--merge", str(merged_input))
    table = [line for line in second.read_text().splitlines() if line.startswith("| esm2_debug | fsdp2 | bf16 |")]
    # model, strategy, precision, GPUs, tokens, AC, tokens/s per GPU, scaling efficiency, MFU, peak memory
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert [c[3] for c in cells] == ["1", "2"]
    assert cells[0][6] not in ("not run", "error") and cells[1][6] not in ("not run", "error")
    assert cells[0][7] == "base (1 GPU)" and cells[1][7].endswith("%")


def test_fp8_rows_train_under_fsdp2_on_two_ranks(tmp_path):
    """FP8 (emulated on CPU) with FP8 all-gathers and the per-step scale refresh, next to bf16, over 2 ranks."""
    pytest.importorskip("torchao.float8")
    report = _run(tmp_path, "--nprocs", "2", "--fsdp-precisions", "bf16,fp8")
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [(r["precision"], r["gpus"], r["ok"]) for r in rows] == [("bf16", 2, True), ("fp8", 2, True)], rows
    bf16, fp8 = rows
    assert fp8["fp8_linears"] == 4 * 2 and "fp8_linears" not in bf16  # qkv, out, up, down of the 2 debug blocks
    assert abs(fp8["final_loss"] - bf16["final_loss"]) < 0.1 * bf16["final_loss"]  # same batches, close losses
    assert "| esm2_debug | fsdp2 | fp8 | 2 |" in report.read_text()
