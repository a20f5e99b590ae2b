"""The Lightning recipe (``examples/lightning/train_codonfm.py``, ``bioscale.integrations.lightning``) end to end on
CPU: two DDP processes with packed data, Lightning checkpoints, ``save_pretrained`` at the end, and a resume that
continues exactly (model, optimizer, schedule and every rank's data stream).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bioscale.models  # noqa: F401  (registers the bioscale classes with transformers' Auto API)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "lightning" / "train_codonfm.py"

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow


def run_recipe(output: Path, *args: str) -> str:
    cmd = [sys.executable, str(RECIPE), "--accelerator", "cpu", "--output-dir", str(output), *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def test_two_processes_checkpoint_and_save_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from bioscale.integrations.lightning import BioscaleLightningModule

    out = run_recipe(tmp_path, "--devices", "2", "--strategy", "ddp", "--max-steps", "4", "--checkpoint-every", "2")
    assert "trained 4 steps on 2 processes" in out
    saved = AutoModelForMaskedLM.from_pretrained(tmp_path / "final_model")
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    restored = BioscaleLightningModule.load_from_checkpoint(checkpoint, map_location="cpu").model
    assert type(restored) is type(saved)
    for (name, a), (_, b) in zip(saved.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The data module saved both ranks' loader positions (Lightning itself would have kept rank 0's only).
    states = torch.load(checkpoint, map_location="cpu", weights_only=False)["BioscaleDataModule"]["loader_states"]
    assert [s["bioscale"]["rank"] for s in states] == [0, 1]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_recipe(straight, "--devices", "1", "--max-steps", "4", "--checkpoint-every", "2")
    run_recipe(stopped, "--devices", "1", "--max-steps", "4", "--stop-at-step", "2", "--checkpoint-every", "2")
    out = run_recipe(stopped, "--devices", "1", "--max-steps", "4", "--checkpoint-every", "2",
                     "--resume", str(stopped / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert "trained 4 steps" in out
    a = AutoModelForMaskedLM.from_pretrained(straight / "final_model").state_dict()
    b = AutoModelForMaskedLM.from_pretrained(stopped / "final_model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_strategy_wraps_each_block() -> None:
    from bioscale.integrations.lightning import fsdp_strategy
    from bioscale.models.codonfm.modeling import EnCodonBlock

    strategy = fsdp_strategy("codonfm")  # built here, run only on GPUs
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {EnCodonBlock}
    assert strategy._state_dict_type == "full"
