"""``trace_summary.py`` on a hand-made Chrome trace: kernel families, the union of overlapping device intervals, idle
time and the longest gaps (the real traces come from ``bioscale train profiler.mode=torch`` on a GPU)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def summary_module():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("trace_summary", REPO_ROOT / "benchmarks" / "trace_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(REPO_ROOT / "benchmarks"))


def _kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def _trace() -> dict:
    # Two steps over 0..200 µs: a GEMM, an overlapping copy on another stream (covered once), a 40 µs gap after a
    # norm kernel, then attention; the second step repeats the first 100 µs later.
    events = [{"ph": "X", "cat": "user_annotation", "name": f"step_{s}", "ts": 100.0 * s, "dur": 100.0} for s in (0, 1)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5.0})  # host: not device time
    for offset in (0.0, 100.0):
        events += [_kernel("nvjet_tst_128x256", offset, 30.0), _kernel("Memcpy HtoD", offset + 20.0, 20.0, "gpu_memcpy"),
                   _kernel("triton_per_fused_native_layer_norm_0", offset + 40.0, 10.0),
                   _kernel("flash_fwd_kernel", offset + 90.0, 10.0)]  # fmt: skip
    # Host syncs: one inside a backward's nonzero on the autograd thread (2), a long copy inside .item() and a short
    # one (not a sync) on the main thread (1).
    def op(name, ts, dur, tid, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}

    events += [op("autograd::engine::evaluate_function: IndexBackward0", 10, 60, 2), op("aten::index_put_", 12, 50, 2),
               op("aten::nonzero", 15, 40, 2), op("cudaStreamSynchronize", 20, 30, 2, "cuda_runtime"),
               op("aten::item", 120, 60, 1), op("cudaMemcpyAsync", 125, 50, 1, "cuda_runtime"),
               op("cudaMemcpyAsync", 190, 5, 1, "cuda_runtime"), op("cudaStreamSynchronize", 150, 5, 2, "cuda_runtime")]
    return {"traceEvents": events}


def test_families_idle_and_gaps_of_a_hand_made_trace(summary_module, tmp_path: Path) -> None:
    summary = summary_module.summarize_trace(_trace())
    assert summary["steps"] == 2 and summary["ms_per_step"] == pytest.approx(0.1)
    assert summary["kernels_per_step"] == 4
    families = {row["family"]: row["ms_per_step"] for row in summary["families"]}
    # Busy per step: 0..40 (GEMM and the overlapping copy, once), 40..50 norm, 90..100 attention = 60 µs of 100.
    assert families["GPU idle"] == pytest.approx(0.040)
    assert families["GEMM"] == pytest.approx(0.030) and families["attention"] == pytest.approx(0.010)
    assert families["norm"] == pytest.approx(0.010) and families["memcpy / memset"] == pytest.approx(0.020)
    assert summary["gaps"][0] == {"us": 40.0, "after": "triton_per_fused_native_layer_norm_0",
                                  "before": "flash_fwd_kernel"}  # fmt: skip
    assert [g["us"] for g in summary["gaps"]] == [40.0, 40.0]  # no gap between the steps (100 follows 100)
    assert summary["syncs"] == [
        {"where": "aten::item [cudaMemcpyAsync]", "per_step": 0.5, "wait_ms_per_step": pytest.approx(0.025)},
        {"where": "autograd::engine::evaluate_function: IndexBackward0 > aten::index_put_ > aten::nonzero "
                  "[cudaStreamSynchronize]", "per_step": 0.5, "wait_ms_per_step": pytest.approx(0.015)},
        {"where": "(no operator) [cudaStreamSynchronize]", "per_step": 0.5, "wait_ms_per_step": pytest.approx(0.0025)},
    ]  # fmt: skip
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(_trace(), handle)
    summary_module.main([str(path), "--json", str(tmp_path / "summary.json")])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_a_trace_without_device_activity_is_refused(summary_module) -> None:
    with pytest.raises(ValueError, match="no device activity"):
        summary_module.summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0,
                                                         "dur": 1}]})  # fmt: skip
