"""``torchrun --nproc_per_node=2`` on CPU (gloo): DDP, FSDP2 and FSDP2 with context parallelism (cp_size=2) give the
loss trajectory of one process with the same global batch.

Every run starts from the same weights (``model.init_from``: FSDP2 initialises sharded parameters on their own
ranks, and on CPU DTensor's random ops do not reproduce the unsharded init). Each rank trains on micro-batches of one
sequence with ``grad_acc_steps=2``, so gradient sync must be off for the first micro-batch and on for the second
(``no_sync`` / ``set_requires_gradient_sync``); the single process trains on micro-batches of four. With
``data.shuffle=false`` rank r of 2 reads sequences r, r+2, ... and the single process reads 0, 1, 2, ..., so every
step covers the same four sequences. With ``cp_size=2`` both ranks read the one data stream (micro-batches of four)
and each keeps its chunks of every sequence. Sequences vary in length, so the loss must be normalised by the global label
count, not per rank. Tolerance: relative 1e-5 on each loss (float32 summation order differs between layouts).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from dp_helpers import PROTEIN_CLM, save_initial_weights, torchrun_train

from bioscale.train.config import load_config
from bioscale.train.metrics import read_metrics

STEPS = 4

OVERRIDES = ["device=cpu", "checkpoint.save_final_model=false", f"num_train_steps={STEPS}", *PROTEIN_CLM]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> Path:
    return save_initial_weights(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def single_process(initial_weights, tmp_path_factory) -> list[dict]:
    from bioscale.train.train import train

    run_dir = tmp_path_factory.mktemp("single")
    cfg = load_config(
        "L0_sanity_llama3",
        [
            *OVERRIDES,
            f"run_dir={run_dir}",
            f"model.init_from={initial_weights}",
            "data.micro_batch_size=4",
            "grad_acc_steps=1",
        ],
    )
    train(cfg)
    return read_metrics(run_dir / "metrics.jsonl")


def _torchrun(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return torchrun_train("L0_sanity_llama3", [*OVERRIDES, f"run_dir={run_dir}", *overrides])


@pytest.mark.parametrize(
    "layout",
    [
        # Two data-parallel ranks, two micro-batches of one sequence each per step.
        ["parallelism.strategy=ddp", "data.micro_batch_size=1", "grad_acc_steps=2"],
        ["parallelism.strategy=fsdp2", "data.micro_batch_size=1", "grad_acc_steps=2", "checkpoint.async_save=true"],
        # HSDP (2 replicas of 1 shard) with the FSDP2 tuning keys: explicit prefetch, no resharding after forward.
        [
            "parallelism.strategy=fsdp2",
            "parallelism.dp_replicate=2",
            "parallelism.prefetch=2",
            "parallelism.reshard_after_forward=never",
            "data.micro_batch_size=1",
            "grad_acc_steps=2",
        ],
        # One data stream split over a CP group of two ranks (each holds two mirrored chunks of every sequence).
        ["parallelism.strategy=fsdp2", "cp_size=2", "data.micro_batch_size=4", "grad_acc_steps=1"],
    ],
    ids=["ddp", "fsdp2", "hsdp_tuned", "fsdp2_cp2"],
)
def test_two_ranks_match_one_process_with_the_same_global_batch(layout, initial_weights, single_process, tmp_path):
    result = _torchrun(
        tmp_path, [*layout, f"model.init_from={initial_weights}", f"checkpoint.save_every_n_steps={STEPS}"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["num_label_tokens"] for r in records] == [r["num_label_tokens"] for r in single_process]
    assert len({r["num_label_tokens"] for r in records}) > 1
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single_process], rel=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in single_process], rel=1e-4)
    # Sharded checkpoint: one shard file per rank.
    assert len(list((tmp_path / "checkpoints" / f"step_{STEPS}").glob("*.distcp"))) == 2
