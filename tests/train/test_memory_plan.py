"""``activation_checkpointing.mode=auto`` as a pure function of model size, micro-batch tokens and device memory,
checked against the peaks measured on one H200 (2026-12-02: ESM-2 3B, 16,384 tokens, no checkpointing 98.1 GB, full
47.7 GB; AMPLIFY 350M, 65,536 tokens, none, 83.4 GB)."""

from __future__ import annotations

import pytest

from bioscale.models import build_config, build_model
from bioscale.train.memory import choose_activation_checkpointing, predicted_peak_bytes

GB = 1e9
H200, H100 = 143.7 * GB, 85.0 * GB


def _shape(name: str, size: str) -> dict:
    config = build_config(name, size)
    model = build_model(config, device="meta")
    return dict(num_params=sum(p.numel() for p in model.parameters()), num_layers=config.num_hidden_layers,
                hidden_size=config.hidden_size)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "size", "tokens", "measured_none_gb"),
    [("esm2", "esm2_t36_3B", 16384, 98.1), ("amplify", "350M", 65536, 83.4)],
)
def test_the_prediction_is_within_15_percent_of_measured_peaks(name, size, tokens, measured_none_gb) -> None:
    peaks = predicted_peak_bytes(**_shape(name, size), tokens_per_micro_batch=tokens)
    assert peaks["none"] / GB == pytest.approx(measured_none_gb, rel=0.15)
    assert peaks["full"] < peaks["none"]


def test_esm2_3b_keeps_activations_on_an_h200_and_recomputes_on_an_80_gb_gpu() -> None:
    shape = _shape("esm2", "esm2_t36_3B")
    assert choose_activation_checkpointing(**shape, tokens_per_micro_batch=16384, device_memory_bytes=H200).mode == "none"
    on_h100 = choose_activation_checkpointing(**shape, tokens_per_micro_batch=16384, device_memory_bytes=H100)
    assert on_h100.mode == "full"
    assert "chose 'full'" in on_h100.describe()
    # Sharded over 8 ranks, the 45 GB of state shrinks to 6 GB a rank: activations fit an 80 GB GPU again.
    sharded = choose_activation_checkpointing(**shape, tokens_per_micro_batch=16384, device_memory_bytes=H100,
                                              shard_ranks=8)  # fmt: skip
    assert sharded.mode == "none"


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        predicted_peak_bytes(num_params=0, num_layers=1, hidden_size=1, tokens_per_micro_batch=1)


def test_a_run_reports_its_time_to_first_step_steady_rate_and_the_mode_auto_chose(tmp_path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.train import train

    cfg = load_config("L0_sanity", ["device=cpu", "num_train_steps=12", "activation_checkpointing.mode=auto",
                                    "checkpoint.save_final_model=false", "logging.progress_bar=false",
                                    "logging.tensorboard=false", f"run_dir={tmp_path}"])  # fmt: skip
    summary = train(cfg)
    assert summary["activation_checkpointing"] == "none"  # off CUDA, auto keeps activations
    assert 0 < summary["time_to_first_step_s"] < summary["wall_time_s"] + 60
    assert summary["steady_state_from_step"] == 3  # 12 steps: the first fifth, at least 2, left out
    assert summary["steady_real_tokens_per_sec_per_gpu"] > 0
