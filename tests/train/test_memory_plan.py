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


# ---- micro_batching=auto ------------------------------------------------------------------------------------------


def _plan(name: str, size: str, *, tokens_per_step: int, memory: float, **extra):
    from bioscale.train.memory import plan_micro_batches

    return plan_micro_batches(**_shape(name, size), items_per_step=tokens_per_step, tokens_per_item=1,
                              min_items_per_micro_batch=1024, item_multiple=16, device_memory_bytes=memory,
                              **extra)  # fmt: skip


def test_esm2_3b_splits_its_step_on_an_80_gb_gpu_instead_of_recomputing() -> None:
    on_h200 = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=H200)
    assert (on_h200.grad_acc_steps, on_h200.items_per_micro_batch) == (1, 16384)
    assert on_h200.activation_checkpointing == "none"
    # 16k tokens without checkpointing need ~98 GB; two micro-batches of 8k keep activations in ~72 GB.
    on_h100 = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=H100)
    assert (on_h100.grad_acc_steps, on_h100.items_per_micro_batch) == (2, 8192)
    assert on_h100.activation_checkpointing == "none"
    assert on_h100.fits and on_h100.predicted_peak_gb < 0.88 * H100 / GB
    assert "2 micro-batch(es) of 8192" in on_h100.describe()


def test_a_step_of_several_micro_batches_is_merged_where_it_fits() -> None:
    # ESM-2 650M, 64k tokens per step as 2 x 32k: one 64k micro-batch fits a 141 GB H200 (~107 GB predicted).
    merged = _plan("esm2", "esm2_t33_650M", tokens_per_step=65536, memory=H200)
    assert (merged.grad_acc_steps, merged.items_per_micro_batch, merged.activation_checkpointing) == (1, 65536, "none")


def test_recompute_only_when_no_split_keeps_activations() -> None:
    # ESM-2 3B: 45.4 GB of fp32 state, ~3.2 MB of kept activations per token. 60 GB (52.8 usable) keeps 2k tokens.
    tight = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=60 * GB)
    assert (tight.grad_acc_steps, tight.items_per_micro_batch, tight.activation_checkpointing) == (8, 2048, "none")
    # 52 GB (45.8 usable): not even 1k tokens of activations fit beside the state; full checkpointing at 1k does.
    full = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=52 * GB)
    assert (full.grad_acc_steps, full.items_per_micro_batch, full.activation_checkpointing) == (16, 1024, "full")
    assert full.fits
    # A mode the user set is planned for as given.
    fixed = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=H100, activation_checkpointing="full")
    assert (fixed.grad_acc_steps, fixed.activation_checkpointing) == (1, "full")
    # Nothing fits at all: the most split plan of the last mode, flagged.
    hopeless = _plan("esm2", "esm2_t36_3B", tokens_per_step=16384, memory=10 * GB)
    assert (hopeless.grad_acc_steps, hopeless.activation_checkpointing, hopeless.fits) == (16, "full", False)
    assert "does NOT fit" in hopeless.describe()


def test_micro_batches_hold_whole_sequences_and_aligned_token_budgets() -> None:
    from bioscale.train.memory import plan_micro_batches

    shape = _shape("esm2", "esm2_t36_3B")
    plan = plan_micro_batches(**shape, items_per_step=12288, tokens_per_item=1, min_items_per_micro_batch=4096,
                              item_multiple=16, device_memory_bytes=10 * GB)  # fmt: skip
    assert plan.grad_acc_steps == 3 and plan.items_per_micro_batch == 4096  # never below one 4,096-token sequence
    padded = plan_micro_batches(**shape, items_per_step=6, tokens_per_item=2048, min_items_per_micro_batch=1,
                                device_memory_bytes=H100)  # fmt: skip
    assert padded.items_per_micro_batch * padded.grad_acc_steps == 6
    assert padded.tokens_per_micro_batch == padded.items_per_micro_batch * 2048
    with pytest.raises(ValueError, match="activation_checkpointing"):
        plan_micro_batches(**shape, items_per_step=6, tokens_per_item=1, min_items_per_micro_batch=1,
                           device_memory_bytes=H100, activation_checkpointing="sometimes")  # fmt: skip


def test_a_run_with_micro_batching_auto_trains_the_planned_split(tmp_path, monkeypatch) -> None:
    """The trainer applies the plan: on a (pretended) large GPU two micro-batches per step become one of twice the
    size, with the same tokens per optimizer step; summary.json reports the plan."""
    import bioscale.train.train as train_module
    from bioscale.train.config import load_config

    monkeypatch.setattr(train_module, "device_memory_bytes", lambda device: 100 * GB)
    cfg = load_config("L0_sanity", ["device=cpu", "num_train_steps=3", "micro_batching=auto", "grad_acc_steps=2",
                                    "checkpoint.save_final_model=false", "logging.progress_bar=false",
                                    "logging.tensorboard=false", f"run_dir={tmp_path}"])  # fmt: skip
    item = "max_tokens_per_batch" if cfg.data.use_sequence_packing else "micro_batch_size"
    recipe_items = getattr(cfg.data, item)
    summary = train_module.train(cfg)
    plan = summary["micro_batching"]
    assert plan["grad_acc_steps"] == 1 and plan["items_per_micro_batch"] == 2 * recipe_items
    assert summary["activation_checkpointing"] == "none" and summary["final_step"] == 3
    saved = (tmp_path / "summary.json").read_text()
    assert '"micro_batching"' in saved


def test_a_resume_that_plans_another_split_is_refused_by_name(tmp_path, monkeypatch) -> None:
    import bioscale.train.train as train_module
    from bioscale.train.config import load_config

    overrides = ["device=cpu", "num_train_steps=2", "micro_batching=auto", "grad_acc_steps=2",
                 "checkpoint.save_every_n_steps=2", "checkpoint.save_final_model=false", "logging.progress_bar=false",
                 "logging.tensorboard=false", f"run_dir={tmp_path}", f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"]  # fmt: skip
    monkeypatch.setattr(train_module, "device_memory_bytes", lambda device: 100 * GB)  # merges: 1 x 32 sequences
    train_module.train(load_config("L0_sanity", overrides))
    # The same run resumed where the plan must split further: memory for only 4 of its sequences at a time.
    recipe = load_config("L0_sanity", overrides)
    from bioscale.train.memory import HEADROOM, predicted_peak_bytes

    four = predicted_peak_bytes(**_shape("esm2", recipe.model.size),
                                tokens_per_micro_batch=4 * recipe.data.max_seq_length)["none"]  # fmt: skip
    monkeypatch.setattr(train_module, "device_memory_bytes", lambda device: four / (1 - HEADROOM) * 1.01)
    resumed = load_config("L0_sanity", [*overrides, "num_train_steps=4", "checkpoint.resume_from_checkpoint=true"])
    with pytest.raises(ValueError, match="data.micro_batch_size: 32 -> 4"):
        train_module.train(resumed)


def test_merged_micro_batches_train_the_same_steps_as_the_recipes_split(tmp_path, monkeypatch) -> None:
    """auto changes how a step is carried, not what it computes: 2 x 8 padded DNA windows per step (fixed) and the
    1 x 16 that auto merges them into give the same losses step for step (causal LM: no random masking or dropout
    that would draw differently per micro-batch; float32, CPU)."""
    import json

    import bioscale.train.train as train_module
    from bioscale.train.config import load_config

    monkeypatch.setattr(train_module, "device_memory_bytes", lambda device: 100 * GB)
    losses = {}
    for mode in ("fixed", "auto"):
        run = tmp_path / mode
        train_module.train(load_config("L0_sanity_llama3", [
            "device=cpu", "num_train_steps=4", f"micro_batching={mode}", "grad_acc_steps=2",
            "checkpoint.save_final_model=false", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.log_every_n_steps=1", f"run_dir={run}"]))  # fmt: skip
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["fixed"]) == 4
    assert losses["auto"] == pytest.approx(losses["fixed"], rel=1e-5)
