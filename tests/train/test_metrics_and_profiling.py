"""Metrics arithmetic (MFU, effective sequence length, GPU peaks), the metrics logger, and the step profiler."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch

from bioscale.train.metrics import (
    MetricsLogger,
    compute_mfu,
    effective_seq_len,
    gpu_peak_flops,
    perplexity,
    read_metrics,
)
from bioscale.train.profiling import StepProfiler
from bioscale.train.train import _sum_sq_seq_lens


def test_mfu_is_model_flops_over_peak():
    # 6 * 650M params per token at 100k tokens/s on one H100 (989 TFLOP/s): 0.394.
    assert compute_mfu(6 * 650e6, 1e5, 989e12) == pytest.approx(6 * 650e6 * 1e5 / 989e12)
    assert compute_mfu(6 * 650e6, 1e5, None) is None


def test_gpu_peaks_are_matched_by_name(monkeypatch):
    assert gpu_peak_flops(torch.device("cpu")) is None
    for name, peak in (
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Some Future GPU", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_peak_flops(torch.device("cuda", 0)) == peak, name


def test_effective_seq_len_weights_attention_by_sequence():
    # Two sequences of 3 and 5 tokens packed with 2 padding tokens: attention costs 3^2 + 5^2 = 34 over 8 tokens.
    packed = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 3, 8, 10])}
    sq = _sum_sq_seq_lens(packed, {"num_sequences": 2})
    assert sq == 34
    assert effective_seq_len(sq, 8) == pytest.approx(34 / 8)
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    assert _sum_sq_seq_lens(padded, {"num_sequences": 2}) == 34


def test_metrics_logger_writes_strict_json_and_drops_records_past_a_resume(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=4, tensorboard=True, progress_bar=False)
    for step in (1, 2, 3):
        logger.log(
            {
                "step": step,
                "loss": float("nan") if step == 2 else 1.0 / step,
                "lr": 0.1,
                "tokens_per_sec_per_gpu": 10.0,
                "real_tokens_per_sec_per_gpu": 8.0,
            }
        )
    assert logger.close() == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["loss"] is None  # NaN is not JSON
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resumed = MetricsLogger(tmp_path, enabled=True, total_steps=4, start_step=2, tensorboard=False, progress_bar=False)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    resumed.close(plot=False)
    assert perplexity(1000.0) == math.inf


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, total_steps=2)
    logger.log({"step": 1, "loss": 1.0})
    assert logger.close() is None
    assert not (tmp_path / "run").exists()


def test_torch_profiler_traces_the_window(tmp_path):
    profiler = StepProfiler(
        enabled=True, mode="torch", start_step=2, end_step=3, run_dir=tmp_path, rank=0, device=torch.device("cpu")
    )
    for step in range(1, 5):
        profiler.step_begin(step)
        with profiler.range("forward"):
            torch.randn(8, 8) @ torch.randn(8, 8)
        profiler.step_end(step)
        assert (tmp_path / "profile" / "trace_rank0.json").exists() == (step >= 3)
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    assert any(event.get("name") == "forward" for event in trace["traceEvents"])
    profiler.close()


def test_nsys_mode_without_cuda_falls_back_to_a_torch_trace_with_a_warning(tmp_path, caplog):
    profiler = StepProfiler(
        enabled=True, mode="nsys", start_step=1, end_step=1, run_dir=tmp_path, rank=0, device=torch.device("cpu")
    )
    assert profiler.enabled and profiler.mode == "torch"
    profiler.step_begin(1)
    with profiler.range("forward"):
        torch.ones(4).sum()
    profiler.step_end(1)
    assert "needs a CUDA device" in caplog.text
    assert (tmp_path / "profile" / "trace_rank0.json").is_file()


def _sync_here() -> None:
    # What torch.cuda.set_sync_debug_mode("warn") raises for a synchronizing operation (it needs a GPU).
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_sync_mode_counts_synchronizing_operations_by_call_stack_in_the_window(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    profiler = StepProfiler(
        enabled=True, mode="syncs", start_step=2, end_step=3, run_dir=tmp_path, rank=1, device=torch.device("cpu")
    )
    for step in range(1, 5):
        profiler.step_begin(step)
        for _ in range(step):  # steps 2 and 3 count: 5 syncs from one call site
            _sync_here()
        warnings.warn("something else", RuntimeWarning, stacklevel=1)  # shown as usual, not counted
        profiler.step_end(step)
    report = (tmp_path / "profile" / "syncs_rank1.txt").read_text()
    assert report.startswith("5 synchronizing CUDA operation(s), 1 distinct call stack(s)")
    assert "==== 5 x" in report and "_sync_here()" in report
    assert "no CUDA device" in caplog.text and "5 host syncs" in caplog.text
    with warnings.catch_warnings(record=True) as seen:  # outside the window the filter is restored
        warnings.simplefilter("always")
        _sync_here()
    assert len(seen) == 1
