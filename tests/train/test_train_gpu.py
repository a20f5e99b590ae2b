"""GPU smoke tests of the training loop (skipped without CUDA): bf16 with packing and per-block compile, FP8 with
quant stats, and FSDP2 on two GPUs. CPU tests cover the numerics; these check the GPU-only paths run and learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import REPO_ROOT, losses, run_cli, run_in_process

from bioscale.train.metrics import read_metrics

GPU = [
    "device=cuda",
    "dtype=bf16",
    "use_sequence_packing=true",
    "data.max_tokens_per_batch=2048",
    "data.pad_to_multiple_of=16",
    "num_train_steps=30",
]


def _learns(run_dir) -> None:
    trajectory = losses(run_dir)
    assert trajectory[0] > 3.3  # ~ln(33) at init
    assert sum(trajectory[-5:]) / 5 < trajectory[0] - 0.3


@pytest.mark.gpu
def test_l0_sanity_on_gpu_bf16_packed_compiled(tmp_path):
    summary = run_in_process("L0_sanity", tmp_path, [*GPU, "compile=true", "activation_checkpointing=selective"])
    _learns(tmp_path)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert record["peak_mem_gb"] > 0
    assert record["real_tokens_per_sec_per_gpu"] > 0
    import torch

    from bioscale.train.metrics import gpu_peak_flops

    if gpu_peak_flops(torch.device("cuda")) is not None:
        assert 0 < record["mfu"] < 1
    assert summary["num_skipped_steps"] == 0


@pytest.mark.gpu
def test_fa4_through_the_trainer_matches_fa2(tmp_path):
    """``model.flash_impl=FA4`` trains like torch's built-in FA2 on the same steps, and the trainer hands the
    process back with FA2 active (needs flash-attn-4 and a Hopper/Blackwell GPU)."""
    pytest.importorskip("flash_attn.cute")
    from bioscale.models.flash_impl import active_flash_impl

    run_in_process("L0_sanity", tmp_path / "fa2", [*GPU, "compile=true"])
    run_in_process("L0_sanity", tmp_path / "fa4", [*GPU, "compile=true", "model.flash_impl=FA4"])
    _learns(tmp_path / "fa4")
    fa2, fa4 = losses(tmp_path / "fa2"), losses(tmp_path / "fa4")
    assert fa4[0] == pytest.approx(fa2[0], abs=1e-2)  # same weights and batch: only the kernel differs
    assert sum(fa4[-5:]) / 5 == pytest.approx(sum(fa2[-5:]) / 5, rel=0.03)
    assert active_flash_impl() == "FA2"


def _fp8_run_with_quant_stats(tmp_path, overrides: list[str]) -> None:
    """L0_sanity on the GPU with FP8 on block 2 and quant stats every 10 steps (plus ``overrides``); it must learn."""
    pytest.importorskip("torchao")
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    fp8 = ["fp8_config.enabled=true", "fp8_layers=[2]", "quant_stats_config.enabled=true", "quant_stats_config.freq=10"]
    run_in_process("L0_sanity", tmp_path, [*GPU, *fp8, *overrides])
    _learns(tmp_path)


@pytest.mark.gpu
def test_fp8_with_quant_stats_on_gpu(tmp_path):
    _fp8_run_with_quant_stats(tmp_path, [])
    assert (tmp_path / "quant_stats.jsonl").is_file()


@pytest.mark.gpu
def test_fp8_modules_selection_through_the_trainer(tmp_path):
    """``fp8_config.modules=[mlp]`` with ``fp8_layers=[2]``: exactly block 2's MLP linears run FP8 (the quant-stats
    layers are the FP8 linears), and the run learns."""
    _fp8_run_with_quant_stats(tmp_path, ["compile=true", "fp8_config.modules=[mlp]"])
    records = [json.loads(line) for line in (tmp_path / "quant_stats.jsonl").read_text().splitlines()]
    layers = sorted({record["layer"] for record in records})
    assert layers and all("layers.1.mlp." in name for name in layers), layers
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"up_proj", "down_proj"}


@pytest.mark.multi_gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gpus_train(strategy, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bioscale.cli",
        "train",
        "--config-name",
        "L0_sanity",
        *GPU,
        f"parallelism.strategy={strategy}",
        f"run_dir={tmp_path}",
        "logging.log_every_n_steps=1",
        "checkpoint.save_every_n_steps=15",
        "checkpoint.async_save=true",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _learns(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_15", "step_30"]
    assert (tmp_path / "checkpoints" / "final_model" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_a_second_run_of_a_recipe_compiles_nothing_new(tmp_path):
    """Two processes train the same compiled recipe with one compile cache: the first compiles (cache misses), the
    second takes every Inductor graph from the cache (no miss) and reaches its first step sooner."""
    summaries = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        result = run_cli(["train", "--config-name", "L0_sanity", *GPU, "compile=true", "num_train_steps=5",
                          f"compile.cache_dir={tmp_path / 'cache'}", f"run_dir={run_dir}"], timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
    first, second = (s["compile"] for s in summaries)
    assert first["fx_graph_cache_miss"] > 0, first
    assert second["fx_graph_cache_miss"] == 0 and second["fx_graph_cache_hit"] >= first["fx_graph_cache_miss"], second
    assert summaries[1]["compile_cache_dir"] == str(tmp_path / "cache")
    assert summaries[1]["time_to_first_step_s"] < summaries[0]["time_to_first_step_s"]
