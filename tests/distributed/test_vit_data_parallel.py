"""The ViT recipe on two CPU ranks (gloo): FSDP2 and DDP, started from the same weights (``model.init_from``: their
own inits draw differently, sharded or not), see the same images and agree step for step; the sharded checkpoint has
one shard per rank, and FSDP2's export loads as a plain bioscale model."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_helpers import torchrun_train

from bioscale.train.metrics import read_metrics

STEPS = 4
COMMON = ["device=cpu", f"num_train_steps={STEPS}", "data.micro_batch_size=8", "data.num_workers=0",
          "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_n_steps=1",
          f"checkpoint.save_every_n_steps={STEPS}"]  # fmt: skip


@pytest.mark.slow  # two torchrun launches of two ranks: ~40 s on 2 CPU cores
def test_fsdp2_and_ddp_agree_on_the_vit_recipe(tmp_path: Path) -> None:
    import torch

    from bioscale.models import build_config, build_model

    torch.manual_seed(0)
    build_model(build_config("vit", "debug", num_labels=10), device="cpu").save_pretrained(tmp_path / "init")
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        run_dir = tmp_path / strategy
        result = torchrun_train("L0_sanity_vit", [*COMMON, f"parallelism.strategy={strategy}", f"run_dir={run_dir}",
                                                 f"model.init_from={tmp_path / 'init'}"],
                                env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        runs[strategy] = read_metrics(run_dir / "metrics.jsonl")
    assert [r["num_label_tokens"] for r in runs["fsdp2"]] == [16] * STEPS  # 2 ranks x 8 images
    assert [r["loss"] for r in runs["fsdp2"]] == pytest.approx([r["loss"] for r in runs["ddp"]], rel=1e-5)
    assert len(list((tmp_path / "fsdp2" / "checkpoints" / f"step_{STEPS}").glob("*.distcp"))) == 2
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "fsdp2" / "checkpoints" / "final_model")
    assert type(model).__name__ == "VitForImageClassification" and model.config.num_labels == 10
