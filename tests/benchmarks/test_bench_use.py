"""benchmarks/bench_use.py's CPU smoke mode (``--quick``, debug-size models) runs end to end and writes its report:
every embedding configuration gives the first one's numbers, and the static generation engine's greedy samples
equal stock ``transformers``' (float32 on CPU: exactly)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_use.py"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_bench_use_quick_cpu(shared_data: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_use", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--device", "cpu", "--data", str(shared_data), "--out-dir", str(tmp_path),
                      "--profile-decode"])  # fmt: skip
    report = out.read_text()
    assert out.name.endswith("-cpu-use.md")
    lines = report.splitlines()
    embed_rows = [_cells(line) for line in lines if line.startswith("| bioscale embed (padded")]
    assert len(embed_rows) == 2 and all(row[1:3] == ["ESM-2 debug", "24"] for row in embed_rows)
    assert report.count("| transformers EsmModel padded") == 2
    # Same weights in every embedding implementation: float32 results agree (bioscale's exactly).
    for line in lines:
        if line.startswith("| bioscale embed"):
            assert float(_cells(line)[-1]) == 0.0, line
        if line.startswith("| transformers EsmModel"):
            assert float(_cells(line)[-1]) < 1e-4, line
    generation = [_cells(line) for line in lines if "generate" in line and line.startswith("| ")]
    assert [row[0] for row in generation].count("bioscale generate_dna, static engine") == 2  # batch 1 and 4
    assert sum("transformers LlamaForCausalLM.generate" == row[0] for row in generation) == 2
    assert sum(row[0].startswith("bioscale Llama3ForCausalLM.generate") for row in generation) == 2
    for row in generation:  # every implementation's greedy samples equal transformers' in float32
        done, total = row[-1].split("/")
        assert done == total, row
    # --profile-decode: one row per batch size and profiled variant (default: the engine's own choice), the decode
    # step's own work (the prefill-only call subtracted).
    profiled = [_cells(line) for line in lines if line.startswith("| Llama 3 debug |")]
    assert [(row[1], row[2]) for row in profiled] == [("engine defaults", "1"), ("engine defaults", "4")]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in profiled), profiled


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
