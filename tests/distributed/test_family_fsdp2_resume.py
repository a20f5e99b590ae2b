"""FSDP2 training and exact resume for masked-LM families added after ESM-2 (CodonFM EnCodon, Geneformer), each
through its own L0 recipe under ``torchrun --nproc_per_node=2`` on CPU (gloo).

The referee for FSDP2 is DDP on the same two ranks: both start from the same saved weights (``model.init_from``)
and read the same data with the same masks (MLM masks are drawn per data-parallel consumer, so one process would
see other masks; DDP does not shard weights, so it is the unsharded computation of the same global batch). Then the
FSDP2 run is resumed from its step-2 checkpoint (the step-4 one deleted, as if the job had died) and must reproduce
steps 3 and 4: optimizer moments, schedule, data position, masks and RNG all come back from the sharded checkpoint.
(CodonFM's recipe has dropout: the RNG streams must come back too.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from dp_helpers import REPO_ROOT, torchrun_train

from bioscale.models import build_config, build_model
from bioscale.train.config import load_config
from bioscale.train.metrics import read_metrics

STEPS = 4
COMMON = [
    "device=cpu",
    f"num_train_steps={STEPS}",
    "checkpoint.save_final_model=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every_n_steps=1",
    "data.micro_batch_size=2",
    "data.num_workers=0",
    "grad_acc_steps=2",
    "scheduler.warmup_steps=1",
    "compile.enabled=false",
]
# Family -> its L0 recipe and the overrides that keep it small (Geneformer reads the shared corpus).
# AMPLIFY is left out: its blocks, init and state dict take the shared paths ESM-2's FSDP2 tests already run (it
# passed here when written; each family costs ~40 s of torchrun start-ups on 2 CPU cores).
FAMILIES = {
    "codonfm": ("L0_sanity_codonfm", ["data.max_seq_length=64"]),
    "geneformer": ("L0_sanity_geneformer", ["data.max_seq_length=64"]),
}
# FSDP2 against DDP for one family only (each torchrun costs ~15 s of CPU start-up): Geneformer, whose learned
# positions, tied decoder and sharded init (pad row) differ most from the families tests/distributed already checks.
# CodonFM's L0 recipe keeps CodonFM's dropout 0.1, so its resume also checks that dropout's RNG stream comes back.
DDP_REFEREE = {"geneformer"}


def _initial_weights(recipe: str, overrides: list[str], folder: Path) -> Path:
    cfg = load_config(recipe, [*COMMON, *overrides])
    torch.manual_seed(0)
    config = build_config(cfg.model.name, cfg.model.size, **cfg.model.overrides)
    model = build_model(config, device="cpu")
    model.save_pretrained(folder)
    return folder


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fsdp2_matches_ddp_and_resumes_exactly(family: str, tmp_path: Path) -> None:
    recipe, overrides = FAMILIES[family]
    if family == "geneformer" and not (REPO_ROOT.parent / "shared" / "data" / "genecorpus_500_samples.parquet").exists():
        pytest.skip("the shared Genecorpus sample (../shared/data) is not here")
    init = _initial_weights(recipe, overrides, tmp_path / "init")
    base = [*COMMON, *overrides, f"model.init_from={init}"]

    fsdp_dir = tmp_path / "fsdp2"
    fsdp = torchrun_train(
        recipe, [*base, "parallelism.strategy=fsdp2", "checkpoint.save_every_n_steps=2", f"run_dir={fsdp_dir}"]
    )
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    sharded = _losses(fsdp_dir)
    assert [s for s, _, _ in sharded] == list(range(1, STEPS + 1))
    assert len({loss for _, loss, _ in sharded}) == STEPS  # the model trains: the comparisons are not vacuous
    if family in DDP_REFEREE:
        ddp = torchrun_train(recipe, [*base, "parallelism.strategy=ddp", f"run_dir={tmp_path / 'ddp'}"])
        assert ddp.returncode == 0, ddp.stderr[-4000:]
        reference = _losses(tmp_path / "ddp")
        assert [loss for _, loss, _ in sharded] == pytest.approx([loss for _, loss, _ in reference], rel=1e-5)
        assert [norm for _, _, norm in sharded] == pytest.approx([norm for _, _, norm in reference], rel=1e-4)

    # The job "died" after step 2: its last checkpoint is gone; resume must redo steps 3 and 4 exactly.
    shutil.rmtree(fsdp_dir / "checkpoints" / f"step_{STEPS}")
    uninterrupted = sharded
    resumed = torchrun_train(
        recipe,
        [*base, "parallelism.strategy=fsdp2", "checkpoint.save_every_n_steps=2",
         "checkpoint.resume_from_checkpoint=true", f"run_dir={fsdp_dir}"],
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = _losses(fsdp_dir)
    assert [s for s, _, _ in after] == list(range(1, STEPS + 1))  # entries past the resumed step were replaced
    assert [loss for _, loss, _ in after[2:]] == pytest.approx([loss for _, loss, _ in uninterrupted[2:]], rel=1e-6)
    assert [norm for _, _, norm in after[2:]] == pytest.approx([n for _, _, n in uninterrupted[2:]], rel=1e-5)
