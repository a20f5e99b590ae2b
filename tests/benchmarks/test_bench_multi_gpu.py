"""``benchmarks/bench_multi_gpu.py --smoke`` on CPU (gloo, tiny models): the driver, torchrun workers and report.

A second run measures only the 2-rank half and merges the 1-rank rows of the first (``--nprocs 2 --merge``), as the
GPU results were assembled from two device calls; the report must then pair them into a scaling efficiency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    table = [line for line in second.read_text().splitlines() if line.startswith("| esm2_debug | fsdp2 |")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    # model, strategy, tokens, AC, 1-GPU tokens/s, 2-GPU tokens/s per GPU, scaling efficiency, ...
    assert cells[4] != "not run" and cells[5] != "not run"
    assert cells[6].endswith("%")
