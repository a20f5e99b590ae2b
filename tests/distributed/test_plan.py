"""``plan_parallelism``: which wrapper and which dtypes a run gets, decided from explicit arguments on CPU (no GPU, no
process group needed); ``parallelize`` applies a plan in torchtitan's order; ``ContextParallel`` is public and its
single-rank form is a no-op."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.distributed as dist

from bioscale.distributed import (
    ContextParallel,
    ParallelPlan,
    apply_data_parallel,
    parallelize,
    plan_parallelism,
    wants_one_rank_group,
)
from bioscale.models import build_config, build_model


def _plan(**kwargs) -> ParallelPlan:
    defaults = {"strategy": "fsdp2", "dtype": "bf16", "device_type": "cuda", "world_size": 1, "is_distributed": False}
    return plan_parallelism(**{**defaults, **kwargs})


def test_one_process_wraps_nothing_and_autocasts_bf16() -> None:
    for strategy in ("ddp", "fsdp2"):
        plan = _plan(strategy=strategy)
        assert not (plan.use_fsdp or plan.use_ddp or plan.use_mfsdp or plan.sharded_bf16)
        assert plan.name == "single" and plan.autocast_dtype == torch.bfloat16 and plan.param_dtype is None
    # On CPU bf16 also comes from autocast; fp32 casts nothing.
    assert _plan(device_type="cpu").autocast_dtype == torch.bfloat16
    fp32 = _plan(dtype="fp32", device_type="cpu")
    assert fp32.autocast_dtype is None and isinstance(fp32.autocast("cpu"), contextlib.nullcontext)
    assert isinstance(_plan(device_type="cpu").autocast("cpu"), torch.autocast)


def test_sharded_bf16_is_bf16_compute_over_fp32_masters_on_gpus_only() -> None:
    plan = _plan(world_size=8, is_distributed=True)
    assert plan.use_fsdp and plan.sharded_bf16 and plan.name == "fsdp2"
    assert (plan.param_dtype, plan.master_dtype, plan.reduce_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert plan.autocast_dtype is None  # FSDP2's all-gather cast replaces autocast
    no_master = _plan(world_size=8, is_distributed=True, fp32_master_weights=False, reduce_dtype="bf16")
    assert no_master.master_dtype is None and no_master.reduce_dtype == torch.bfloat16
    # gloo on CPU: the sharded path stays fp32, bf16 comes from autocast.
    cpu = _plan(world_size=2, is_distributed=True, device_type="cpu")
    assert cpu.use_fsdp and not cpu.sharded_bf16 and cpu.param_dtype is None and cpu.autocast_dtype == torch.bfloat16
    ddp = _plan(strategy="ddp", world_size=2, is_distributed=True)
    assert ddp.use_ddp and not ddp.use_fsdp and ddp.autocast_dtype == torch.bfloat16


def test_single_gpu_fsdp_needs_bf16_a_gpu_and_its_one_rank_group() -> None:
    assert wants_one_rank_group("fsdp2", single_gpu_fsdp=True, dtype="bf16")
    assert not wants_one_rank_group("fsdp2", single_gpu_fsdp=True, dtype="fp32")
    assert not wants_one_rank_group("ddp", single_gpu_fsdp=True, dtype="bf16")
    assert _plan(single_gpu_fsdp=True, is_distributed=True).sharded_bf16
    assert not _plan(single_gpu_fsdp=True, is_distributed=False).use_fsdp  # no group: nothing to shard over
    assert not _plan(single_gpu_fsdp=True, is_distributed=True, device_type="cpu").use_fsdp
    assert not _plan(single_gpu_fsdp=False, is_distributed=True).use_fsdp  # torchrun with one rank


def test_fp8_all_gather_only_for_tensorwise_fsdp2() -> None:
    assert _plan(world_size=2, is_distributed=True, fp8=True).fp8_all_gather
    assert not _plan(world_size=2, is_distributed=True, fp8=True, fp8_recipe="rowwise").fp8_all_gather
    assert not _plan(strategy="ddp", world_size=2, is_distributed=True, fp8=True).fp8_all_gather
    assert not _plan(fp8=True).fp8_all_gather


def test_configuration_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="parallelism.strategy"):
        _plan(strategy="zero3")
    with pytest.raises(ValueError, match="dtype"):
        _plan(dtype="fp16")
    with pytest.raises(ValueError, match="parallelism.reduce_dtype"):
        _plan(reduce_dtype="fp8")
    with pytest.raises(ValueError, match="NVIDIA GPUs"):
        _plan(strategy="mfsdp", device_type="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        _plan().use_fsdp = True  # type: ignore[misc]


def test_context_parallel_of_one_process_is_a_no_op() -> None:
    cp = ContextParallel(1, "cpu", rank=0, world_size=1)
    assert (cp.mesh, cp.fsdp_mesh, cp.dp_rank, cp.dp_size, cp.cp_group) == (None, None, 0, 1, None)
    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    shards, layouts = cp.shard(batches, causal=True, pad_token_id=1)
    assert shards[0] is batches[0] and layouts == [None]
    with cp.forward(torch.nn.Linear(1, 1), None):
        pass
    with pytest.raises(ValueError, match="torchrun"):
        ContextParallel(2, "cpu", rank=0, world_size=1)


def test_parallelize_applies_the_plan_in_order_and_data_parallel_after_materialising() -> None:
    """AC then compile wrap each block (the compiled module is the checkpoint wrapper); FSDP2 shards the root last."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = dataclasses.replace(_plan(dtype="fp32", device_type="cpu", is_distributed=True), use_fsdp=True)
        model = build_model(build_config("esm2", "debug"), task="masked_lm", device="meta")
        parallelize(model, plan, activation_checkpointing="full", compile_blocks=True)
        block = model.layers[0]
        assert type(block).__name__ == "FSDPCheckpointWrapper" and block._compiled_call_impl is not None
        assert type(model).__name__.startswith("FSDP")
        model.to_empty(device="cpu")
        assert apply_data_parallel(model, plan, device=torch.device("cpu")) is model  # FSDP2 wrapped in place
    finally:
        dist.destroy_process_group()
