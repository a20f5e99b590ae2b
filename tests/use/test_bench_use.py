"""The inference benchmark's CPU smoke mode runs end to end and writes its report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_use.py"


def test_bench_use_quick_cpu(shared_data: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_use", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--device", "cpu", "--data", str(shared_data), "--out-dir", str(tmp_path)])
    report = out.read_text()
    assert out.name.endswith("-cpu-use.md")
    assert "| bioscale embed (padded) | ESM-2 debug | 24 |" in report
    assert report.count("| transformers EsmModel padded") == 2
    assert (
        report.count("Llama3ForCausalLM.generate") == 2 and report.count("transformers LlamaForCausalLM.generate") == 2
    )
    # Same weights in both embedding implementations: float32 results agree.
    for line in report.splitlines():
        if line.startswith("| transformers EsmModel"):
            assert float(line.rstrip(" |").rsplit("|", 1)[1]) < 1e-4, line


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
