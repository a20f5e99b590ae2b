"""Helpers for training tests: tiny fast overrides, an in-process runner and a CLI-subprocess runner.

A plain module (not ``conftest.py``): test files import it by a name unique across ``tests/``, so the import never
resolves to another folder's ``conftest`` when pytest collects several folders at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bioscale.train.config import load_config
from bioscale.train.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]

# Small, quiet and single-threaded-friendly: log every step (the tests compare per-step losses), no progress bar,
# no TensorBoard, no export or checkpoints unless a test asks for them.
FAST = [
    "device=cpu",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every_n_steps=1",
    "checkpoint.save_final_model=false",
    "checkpoint.save_every_n_steps=0",
]


def run_in_process(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``recipe`` in this process; returns the summary."""
    from bioscale.train.train import train

    cfg = load_config(recipe, [*FAST, f"run_dir={run_dir}", *overrides])
    return train(cfg)


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(Path(run_dir) / "metrics.jsonl")]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m bioscale.cli <args>`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "bioscale.cli", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        **kwargs,
    )

