"""The GPU benchmark's training overrides compose into a valid config (a typo would only surface on the GPU)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from bioscale.train.config import load_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"


@pytest.mark.parametrize("quick", [False, True])
def test_bench_overrides_are_a_valid_config(quick: bool) -> None:
    spec = importlib.util.spec_from_file_location("bench_eval", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(quick=quick, steps=1000, tokens=32768, lr=1e-3, warmup=100, compile=False)
    overrides = bench.train_overrides(args, torch.device("cpu" if quick else "cuda"))
    cfg = load_config("L0_sanity", overrides)
    assert cfg.num_train_steps == 1000
    if not quick:
        assert cfg.model.size == "esm2_t6_8M" and cfg.data.use_sequence_packing and cfg.data.max_tokens_per_batch == 32768
        assert cfg.dtype == "bf16" and cfg.device == "cuda" and cfg.data.max_seq_length == 1024
