"""The ViT on a GPU: bf16 (flash SDPA) close to float32 timm, per-block compiled equal to eager, FP8 blocks that train,
and the L0 recipe through ``bioscale train`` in bf16 with compiled blocks.

Run on a CUDA machine: ``python -m pytest -q tests/models/test_vit_gpu.py`` (skipped without a GPU; the timm
comparison also without timm). Errors are relative L2 norms as in the other GPU tests: bf16 keeps ~3 significant
digits (errors ~1e-3 to 1e-2 over a few blocks); a wrong layout gives errors near 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vit_reference import timm_vit

from bioscale.distributed.parallelize import apply_compile
from bioscale.models import build_config, build_model
from bioscale.models.vit import from_timm

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BF16_VS_FP32 = 2e-2
COMPILED_VS_EAGER = 1e-2  # both bf16: different fusions round differently, nothing more


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def _recipe_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_config("vit", "debug", image_size=64, num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                          intermediate_size=512, num_labels=10, **overrides)  # fmt: skip
    return build_model(config, device=CUDA).eval()


def _pixels(batch: int = 16, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(CUDA)


def test_bf16_flash_close_to_float32_timm() -> None:
    reference = timm_vit(img_size=64, patch_size=8, num_classes=10, embed_dim=128, depth=4, num_heads=4,
                         reg_tokens=8, qk_norm=True, global_pool="map").to(CUDA)  # fmt: skip
    model = from_timm(reference).to(CUDA).eval()
    x = _pixels()
    with torch.no_grad():
        expected = reference(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = model(pixel_values=x).logits.float()
        bf16 = model.to(torch.bfloat16)(pixel_values=x).logits.float()
    assert _relative_error(autocast, expected) < BF16_VS_FP32
    assert _relative_error(bf16, expected) < BF16_VS_FP32


def test_compiled_blocks_equal_eager_in_bf16() -> None:
    eager = _recipe_model()
    compiled = _recipe_model()
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, dynamic=False)
    x = _pixels()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = eager(pixel_values=x).logits.float()
        actual = compiled(pixel_values=x).logits.float()
    assert _relative_error(actual, expected) < COMPILED_VS_EAGER
    # and backward through the compiled blocks
    labels = torch.randint(0, 10, (16,), device=CUDA)
    compiled.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(pixel_values=x, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compiled.parameters() if p.requires_grad)


def test_fp8_blocks_train() -> None:
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    from bioscale.precision import apply_fp8

    model = _recipe_model().train()
    apply_fp8(model, recipe="tensorwise")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, labels = _pixels(32), torch.randint(0, 10, (32,), device=CUDA)  # 32 images x 73 tokens: a multiple of 16
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_l0_recipe_in_bf16_with_compiled_blocks(tmp_path: Path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.train import train

    cfg = load_config("L0_sanity_vit", [
        "device=cuda", "dtype=bf16", "compile.enabled=true", "num_train_steps=30", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.save_every_n_steps=0", f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary["final_loss"] < summary["first_loss"] and summary["num_skipped_steps"] == 0
    assert summary["mfu"] is None or 0 < summary["mfu"] < 1


@pytest.mark.parametrize("strategy", ["fsdp2", "mfsdp"])
def test_l0_recipe_sharded_on_one_gpu_resumes_and_exports(strategy: str, tmp_path: Path) -> None:
    """The recipe's sharded paths on one GPU (FSDP2 / Megatron-FSDP over a one-rank group, bf16 compute over fp32
    master weights): the first loss is the plain autocast run's, a copy of the run cut back to its step-10
    checkpoint resumes to the uninterrupted run's last loss, and the exported model loads with ``from_pretrained``."""
    if strategy == "mfsdp":
        pytest.importorskip("megatron_fsdp")
    import shutil

    from transformers import AutoModelForImageClassification

    from bioscale.train.config import load_config
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    def run(name: str, extra: list[str]) -> dict:
        return train(load_config("L0_sanity_vit", [
            "device=cuda", "dtype=bf16", "num_train_steps=20", "logging.progress_bar=false", "logging.tensorboard=false",
            "logging.log_every_n_steps=1", f"run_dir={tmp_path / name}", "seed=7", *extra,
        ]))  # fmt: skip

    plain = run("plain", ["parallelism.single_gpu_fsdp=false", "checkpoint.save_every_n_steps=0"])
    sharded = [f"parallelism.strategy={strategy}", "parallelism.single_gpu_fsdp=true", "checkpoint.save_every_n_steps=10"]
    full = run("full", sharded)
    assert full["strategy"] == strategy and plain["strategy"] == "single"
    assert full["first_loss"] == pytest.approx(plain["first_loss"], rel=2e-2)
    assert full["final_loss"] < full["first_loss"]
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for later in (tmp_path / "cut" / "checkpoints").iterdir():
        if later.name != "step_10":
            shutil.rmtree(later)
    resumed = run("cut", [*sharded, "checkpoint.resume_from_checkpoint=true"])
    assert resumed["resumed_from_step"] == 10
    straight = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    again = [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert len(again) == len(straight) == 20
    # bf16 and the flash backward's atomics: close, not bitwise.
    assert again[-1] == pytest.approx(straight[-1], rel=1e-2)
    exported = AutoModelForImageClassification.from_pretrained(resumed["final_model"]).cuda().eval()
    pixels = torch.randn(4, 3, exported.config.image_size, exported.config.image_size, device="cuda")
    assert exported(pixel_values=pixels).logits.shape == (4, exported.config.num_labels)
