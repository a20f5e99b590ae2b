"""No run loses or corrupts work (issue 25): the fault and bad-input cases, each re-created on the tiny L0 recipe.

A run owns its run directory (another run's checkpoints are refused or moved aside, a second process is locked out),
a damaged checkpoint is named and the run falls back to the older intact one with the losses of a run resumed from
that one, a full disk stops with a line naming the folder, non-finite steps never replace the last clean checkpoint,
non-finite weights are never checkpointed or exported, missing paths are one line, a changed learning rate on resume
is the one the run uses, and sequences of the other modality are warned about and counted, or refused.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from train_helpers import FAST, run_in_process, subprocess_env

from bioscale.train.checkpoint import LOCK_FILE, MANIFEST, PREVIOUS_RUNS, read_checkpoint_info, verify_checkpoint_files
from bioscale.train.metrics import read_metrics

# L0_sanity made smaller still: short sequences, small batches, a two-step warmup (seconds per run on one core).
TINY = ["data.max_seq_length=64", "data.micro_batch_size=4", "scheduler.warmup_steps=2"]


def _run(run_dir, *overrides, recipe="L0_sanity"):
    return run_in_process(recipe, run_dir, [*TINY, *overrides])


def _hashes(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _records_after(run_dir, step: int) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > step]


def test_a_fresh_run_refuses_another_runs_checkpoints_and_moves_them_aside_when_asked(tmp_path):
    first = _run(tmp_path, "num_train_steps=2", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=5")
    ckpt_dir = tmp_path / "checkpoints"
    before, config_before = _hashes(ckpt_dir), (tmp_path / "config.yaml").read_text()

    with pytest.raises(ValueError, match=r"holds checkpoints of another run .*checkpoint.move_aside_other_runs=true"):
        _run(tmp_path, "num_train_steps=2", "checkpoint.save_every_n_steps=1", "seed=7")
    assert _hashes(ckpt_dir) == before  # nothing deleted or overwritten
    assert (tmp_path / "config.yaml").read_text() == config_before

    second = _run(tmp_path, "num_train_steps=2", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=1",
                  "checkpoint.move_aside_other_runs=true", "seed=7")  # fmt: skip
    assert second["run_id"] != first["run_id"]
    (aside,) = (ckpt_dir / PREVIOUS_RUNS).iterdir()
    moved = _hashes(aside)
    assert {k: v for k, v in moved.items() if k.startswith("step_")} == before  # intact, byte for byte
    assert "metrics.jsonl" in moved  # the earlier run's metrics went with its checkpoints
    # The new run pruned its own checkpoints only (keep_last_n=1) and they carry its run id.
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_2"]
    assert read_checkpoint_info(ckpt_dir / "step_2").run_id == second["run_id"]


def test_resume_refuses_a_changed_model_or_data_config(tmp_path):
    _run(tmp_path, "num_train_steps=2", "checkpoint.save_every_n_steps=2")
    with pytest.raises(ValueError, match=r"another model or data configuration \(data.max_seq_length: 64 -> 48; "
                                         r"model.overrides.num_hidden_layers: '\(unset\)' -> 1\)"):  # fmt: skip
        _run(tmp_path, "num_train_steps=4", "checkpoint.resume_from_checkpoint=true", "data.max_seq_length=48",
             "+model.overrides.num_hidden_layers=1")  # fmt: skip
    assert (tmp_path / "checkpoints" / "step_2" / MANIFEST).is_file()  # refused, not renamed or touched


_HOLD_LOCK = """
import sys, time
from bioscale.train.checkpoint import RunLock
lock = RunLock(sys.argv[1], sys.argv[2])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_a_run_directory_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, caplog):
    # Another process holds the run directory exactly as a running `bioscale train` does.
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path), str(tmp_path / "checkpoints")],
                              env=subprocess_env(), stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another bioscale run \(PID {holder.pid} on "):
            _run(tmp_path, "num_train_steps=1")
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
        holder.send_signal(signal.SIGKILL)  # the holder dies without releasing its lock
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()
    caplog.set_level(logging.WARNING)
    summary = _run(tmp_path, "num_train_steps=1")
    assert summary["final_step"] == 1
    assert f"taking over the stale lock {tmp_path / LOCK_FILE} of PID {holder.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end of the run


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run to step 4 with checkpoints at 2 and 4, and the reference: a run resumed to step 6 from step_2 alone."""
    base = tmp_path_factory.mktemp("damaged") / "base"
    common = ["checkpoint.save_every_n_steps=2", "checkpoint.keep_last_n=2"]
    _run(base, "num_train_steps=4", *common)
    reference = base.parent / "reference"
    shutil.copytree(base / "checkpoints" / "step_2", reference / "checkpoints" / "step_2")
    _run(reference, "num_train_steps=6", "checkpoint.resume_from_checkpoint=true", *common)
    return base, reference


@pytest.mark.parametrize("damage", ["overwrite_4k_of_shard", "truncate_shard", "truncate_metadata"])
def test_a_damaged_checkpoint_is_named_and_the_run_falls_back_to_the_older_one(two_checkpoints, tmp_path, damage,
                                                                               caplog):  # fmt: skip
    base, reference = two_checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    step_4 = run_dir / "checkpoints" / "step_4"
    shard = step_4 / "__0_0.distcp"
    if damage == "overwrite_4k_of_shard":  # same size: only the SHA-256 can tell
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(4096))
        assert shard.stat().st_size == size
    else:
        target = shard if damage == "truncate_shard" else step_4 / ".metadata"
        os.truncate(target, target.stat().st_size // 2)
    caplog.set_level(logging.WARNING)
    summary = _run(run_dir, "num_train_steps=6", "checkpoint.resume_from_checkpoint=true",
                   "checkpoint.save_every_n_steps=2", "checkpoint.keep_last_n=2")  # fmt: skip
    assert summary["resumed_from_step"] == 2
    assert f"{step_4} failed verification" in caplog.text and "renamed to step_4.damaged" in caplog.text
    assert (run_dir / "checkpoints" / "step_4.damaged").is_dir()  # kept for inspection, never loaded
    resumed, expected = _records_after(run_dir, 2), _records_after(reference, 2)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]  # bit-identical
    assert [r["lr"] for r in resumed] == [r["lr"] for r in expected]


def test_a_full_disk_stops_with_one_line_naming_the_folder_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch,
                                                                                            capsys):  # fmt: skip
    from torch.distributed.checkpoint import FileSystemWriter

    from bioscale.train.cli import main

    real_write = FileSystemWriter.write_data
    calls = {"n": 0}

    def write_data(self, plan, planner):  # the second checkpoint's shard write hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            (open(os.path.join(self.path, "__0_0.distcp"), "wb")).close()  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    code = main(["--config-name", "L0_sanity", *FAST, *TINY, f"run_dir={tmp_path}", "num_train_steps=4",
                 "checkpoint.save_every_n_steps=2"])  # fmt: skip
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt_dir = tmp_path / "checkpoints"
    assert last.startswith(f"bioscale train: error: could not write the checkpoint of step 4 into {ckpt_dir}/.tmp_")
    assert "No space left on device" in last and f"latest: {ckpt_dir / 'step_2'}" in last
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_2"]  # its own temporary folder removed, nothing else
    assert verify_checkpoint_files(read_checkpoint_info(ckpt_dir / "step_2")) == []
    assert not (tmp_path / LOCK_FILE).exists()


def _nan_loss_at(monkeypatch, bad_steps: set[int]) -> None:
    import bioscale.train.train as train_module

    real, calls = train_module.model_loss, {"n": 0}

    def model_loss(model, batch, *, task):
        calls["n"] += 1
        loss = real(model, batch, task=task)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(train_module, "model_loss", model_loss)


def test_a_checkpoint_after_a_nan_burst_is_marked_and_never_preferred(tmp_path, monkeypatch):
    from bioscale.train.checkpoint import CheckpointManager

    _nan_loss_at(monkeypatch, {3, 4})
    _run(tmp_path, "num_train_steps=4", "checkpoint.save_every_n_steps=2", "checkpoint.keep_last_n=1")
    ckpt_dir = tmp_path / "checkpoints"
    # keep_last_n=1, yet the last clean checkpoint survives the one written after the two skipped steps.
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_2", "step_4"]
    assert read_checkpoint_info(ckpt_dir / "step_4").non_finite_steps == 2
    assert read_checkpoint_info(ckpt_dir / "step_2").clean
    assert CheckpointManager(ckpt_dir, rank=0).latest()[0] == 2
    monkeypatch.undo()
    summary = _run(tmp_path, "num_train_steps=4", "checkpoint.save_every_n_steps=2", "checkpoint.keep_last_n=1",
                   "checkpoint.resume_from_checkpoint=true")  # fmt: skip
    assert summary["resumed_from_step"] == 2 and summary["num_skipped_steps"] == 0


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path, monkeypatch):
    import bioscale.train.train as train_module
    from bioscale.train.train import NonFiniteLossError

    real_step = train_module.launch_step

    def train_step(model, *args, state, **kwargs):  # after step 3 a weight is NaN (as from a corrupted load)
        result = real_step(model, *args, state=state, **kwargs)
        if state.step == 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(train_module, "launch_step", train_step)
    with pytest.raises(NonFiniteLossError, match=r"final weights hold non-finite values.*final_model was not written"):
        _run(tmp_path, "num_train_steps=4", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=5",
             "checkpoint.save_final_model=true", "nan_tolerance=10")  # fmt: skip
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_1", "step_2"]
    assert not (ckpt_dir / "final_model").exists()


@pytest.mark.parametrize("fault", ["missing_data_source", "run_dir_under_a_file"])
def test_file_system_errors_are_one_line_naming_the_path(tmp_path, capsys, fault):
    from bioscale_cli import main

    if fault == "missing_data_source":
        path = tmp_path / "no_such" / "proteins.fasta"
        overrides, run_dir = [f"data.source={path}"], tmp_path / "run"
    else:
        (tmp_path / "a_file").write_text("")
        path = run_dir = tmp_path / "a_file" / "run"
        overrides = []
    code = main(["train", "--config-name", "L0_sanity", *FAST, *TINY, f"run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bioscale train: error: ") and str(path) in last
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_resume_with_a_changed_learning_rate_uses_the_new_config(tmp_path, caplog):
    _run(tmp_path / "resumed", "num_train_steps=2", "checkpoint.save_every_n_steps=2")
    caplog.set_level(logging.WARNING)
    _run(tmp_path / "resumed", "num_train_steps=4", "checkpoint.save_every_n_steps=2", "optimizer.lr=8e-3",
         "checkpoint.resume_from_checkpoint=true")  # fmt: skip
    changed = "the new config sets num_train_steps=4 (checkpoint: 2), optimizer.lr=0.008 (checkpoint: 0.004)"
    assert changed in caplog.text
    _run(tmp_path / "fresh", "num_train_steps=4", "optimizer.lr=8e-3")
    resumed, fresh = _records_after(tmp_path / "resumed", 2), _records_after(tmp_path / "fresh", 2)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in fresh], rel=1e-12)
    assert "optimizer:\n  lr: 0.008" in (tmp_path / "resumed" / "config.yaml").read_text()


def _write_fasta(path, records: dict[str, str]) -> None:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))


@pytest.mark.parametrize(
    ("recipe", "sequences", "looks_like"),
    [
        ("L0_sanity", "dna", "looks like DNA or RNA"),  # ESM-2 (protein) given DNA
        ("L0_sanity_llama3", "protein", "looks like a protein"),  # Llama 3 on nucleotides given proteins
    ],
)
def test_sequences_of_the_other_modality_are_warned_and_counted_or_refused(tmp_path, caplog, recipe, sequences,
                                                                           looks_like):  # fmt: skip
    import numpy as np

    rng = np.random.default_rng(0)
    letters = "ACGT" if sequences == "dna" else "ACDEFGHIKLMNPQRSTVWY"
    fasta = tmp_path / f"{sequences}.fasta"
    _write_fasta(fasta, {f"rec_{i}": "".join(rng.choice(list(letters), 120)) for i in range(24)})
    common = [f"data.source={fasta}", "num_train_steps=1", "data.crop=random"]
    caplog.set_level(logging.WARNING)
    summary = _run(tmp_path / "map", *common, recipe=recipe)
    assert f"record 'rec_0' in {fasta}" in caplog.text and looks_like in caplog.text
    assert summary["data_policy"]["wrong_modality"] == summary["data_policy"]["records_read"] > 0
    with pytest.raises(ValueError, match=rf"record 'rec_0' in {fasta}: .*{looks_like}"):
        _run(tmp_path / "error", *common, "data.unknown_residues=error", recipe=recipe)
