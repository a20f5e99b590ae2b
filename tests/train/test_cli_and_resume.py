"""``bioscale train`` as a subprocess: the README's main command, and stop-and-go with SIGKILL.

Stop-and-go: a run to 2N steps is compared with a run that is SIGKILLed after its step-N checkpoint, one step later
(while it is still training, not at a clean exit), and then resumed to 2N from the latest complete checkpoint, next to a
checkpoint folder truncated mid-write that must be ignored. Same data (per-step label-token counts: the masking is
drawn from the loader's state) and the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from train_helpers import FAST, losses, run_cli, run_in_process, subprocess_env

from bioscale.train.metrics import read_metrics

N = 3

# Runs the CLI, but once step N + 1 is logged (so the step-N checkpoint is complete and one more step is on disk in
# metrics.jsonl) it sleeps, holding its training state, so the test can SIGKILL a process that is mid-run.
_HANG_AFTER_STEP = f"""
import sys, time
from bioscale.train import metrics

_log = metrics.MetricsLogger.log

def _log_then_hang(self, record):
    _log(self, record)
    if record["step"] == {N + 1}:
        print("step {N + 1} logged", flush=True)
        time.sleep(600)

metrics.MetricsLogger.log = _log_then_hang
from bioscale.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bioscale_train_l0_sanity_runs_as_a_command(tmp_path):
    # The public form: only checkpoint.ckpt_dir is given, so the run directory is that folder too (nothing lands in
    # the working directory), and the last stdout line is the summary naming where everything went.
    ckpt_dir, cwd = tmp_path / "ckpt", tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli(
        [
            "train",
            "--config-name",
            "L0_sanity",
            "num_train_steps=3",
            f"checkpoint.ckpt_dir={ckpt_dir}",
            "device=cpu",
            "logging.log_every_n_steps=1",
        ],
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json"):
        assert (ckpt_dir / name).is_file(), name
    assert (ckpt_dir / "final_model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(ckpt_dir / "metrics.jsonl")] == [1, 2, 3]
    assert all("loss" in r for r in read_metrics(ckpt_dir / "metrics.jsonl"))
    summary = json.loads((ckpt_dir / "summary.json").read_text())
    assert summary["final_step"] == 3
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["run_dir"] == str(ckpt_dir)
    assert printed["metrics"] == str(ckpt_dir / "metrics.jsonl")
    assert printed["final_model"] == str(ckpt_dir / "final_model")
    assert list(cwd.iterdir()) == []


def test_bioscale_train_rejects_unknown_keys_before_training(tmp_path):
    result = run_cli(["train", "--config-name", "L0_sanity", "optimizer.learning_rate=1", f"run_dir={tmp_path}"])
    assert result.returncode == 2
    assert "learning_rate" in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_stop_and_go_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    common = [f"num_train_steps={2 * N}", f"checkpoint.save_every_n_steps={N}", "checkpoint.keep_last_n=5"]
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    run_in_process("L0_sanity", straight_dir, common)

    args = ["--config-name", "L0_sanity", *FAST, *common, f"run_dir={stopped_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_AFTER_STEP, *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until step N + 1 is logged (or the process died)
        assert line.strip() == f"step {N + 1} logged", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    ckpt_dir = stopped_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [f"step_{N}"]
    assert [r["step"] for r in read_metrics(stopped_dir / "metrics.jsonl")] == list(range(1, N + 2))

    # A later checkpoint whose write was cut short: shards present, no completion marker. It must be ignored.
    shutil.copytree(ckpt_dir / f"step_{N}", ckpt_dir / f"step_{N + 1}")
    os.remove(ckpt_dir / f"step_{N + 1}" / "COMPLETE")
    resumed = run_cli(["train", *args, "checkpoint.resume_from_checkpoint=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((stopped_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == N
    assert "ignoring incomplete checkpoint" in resumed.stderr

    straight = read_metrics(straight_dir / "metrics.jsonl")
    stopped = read_metrics(stopped_dir / "metrics.jsonl")
    assert [r["step"] for r in stopped] == list(range(1, 2 * N + 1))  # step N + 1 re-logged once, not twice
    assert [r["num_label_tokens"] for r in stopped] == [r["num_label_tokens"] for r in straight]
    assert losses(stopped_dir) == pytest.approx(losses(straight_dir), rel=1e-6)
    assert [r["lr"] for r in stopped] == pytest.approx([r["lr"] for r in straight], rel=1e-12)
