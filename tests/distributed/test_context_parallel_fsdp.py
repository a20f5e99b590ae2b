"""Context parallelism combined with FSDP2 over the (dp, cp) mesh, against one unsharded model on the global batch.

Every rank builds the same tiny Llama 3 (same seed), then a sharded copy: CP over the mesh's ``cp`` groups and FSDP2
over the flattened ``dp_shard × cp`` ranks. Each data-parallel group gets its own packed batch; the loss is summed over
label tokens and scaled like the trainer does (``world_size / global_label_count``: FSDP2 averages over ranks). The
sharded gradients (gathered) must equal those of the unsharded model on all the data-parallel batches at once, and so
must the parameters after one AdamW step. CPU/gloo in float64 here; the same worker runs on GPUs (NCCL, bf16).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _batch(seed: int, vocab_size: int) -> dict[str, Any]:
    lengths = [11, 30, 5]
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    ids = torch.randint(4, vocab_size - 1, (1, num_tokens), generator=generator)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scenario(cp_size: int, dp_replicate: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bioscale.distributed.context_parallel import apply_context_parallel, context_parallel
    from bioscale.distributed.cp_layout import shard_batch_for_cp
    from bioscale.distributed.cp_mesh import build_parallel_mesh
    from bioscale.models import build_config, build_model

    mesh = build_parallel_mesh(device.type, cp_size=cp_size, dp_replicate=dp_replicate)
    world = mesh.world_size
    config = build_config("llama3", "debug")
    torch.manual_seed(0)
    reference = build_model(config, task="causal_lm", device=device).to(dtype)
    torch.manual_seed(0)
    model = build_model(config, task="causal_lm", device=device).to(dtype)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    # Unsharded reference over every data-parallel batch.
    batches = [_batch(seed, config.vocab_size) for seed in range(mesh.dp_size)]
    global_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # CLM: shifted targets
    with autocast:
        reference_loss = sum(reference(**_to(b, device), loss_reduction="sum").loss for b in batches)
    (reference_loss / global_labels).backward()

    # Sharded: CP, then FSDP2 (the parallelize order), over the (dp, cp) mesh.
    if mesh.cp > 1:
        apply_context_parallel(model, mesh.cp_group)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    for block in model.layers:
        fully_shard(block, mesh=mesh.fsdp_mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh.fsdp_mesh, mp_policy=policy)
    if mesh.cp > 1:
        shard = shard_batch_for_cp(batches[mesh.dp_rank], mesh.cp_rank, mesh.cp, shift_labels=True)
        with context_parallel(model, shard.layout), autocast:
            out = model(**_to(shard.batch, device), loss_reduction="sum")
    else:
        with autocast:
            out = model(**_to(batches[mesh.dp_rank], device), loss_reduction="sum")
    (out.loss * world / global_labels).backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)

    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    grad_err = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor()
        ref = reference_grads[name]
        grad_err = max(
            grad_err, ((grad.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()
        )

    # One optimizer step each: the sharded parameters must stay equal to the reference's. AdamW's first step moves
    # every weight by +-lr whatever the gradient's size, so under bf16 noise a near-zero gradient could flip the
    # sign: SGD there.
    for module in (reference, model):
        if dtype == torch.float64:
            torch.optim.AdamW(module.parameters(), lr=1e-2).step()
        else:
            torch.optim.SGD(module.parameters(), lr=0.01).step()
    param_err = max(
        (p.full_tensor().double() - r.double()).abs().max().item()
        for p, r in zip(model.parameters(), reference.parameters())
    )
    return {
        "loss": abs(loss.item() - reference_loss.item()) / abs(reference_loss.item()),
        "grads": grad_err,
        "params_after_step": param_err,
    }


def _worker(
    rank: int, world: int, port: int, device_type: str, cp_size: int, dp_replicate: int, dtype_name: str, out_dir: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: dict[str, Any] = _scenario(cp_size, dp_replicate, device, getattr(torch, dtype_name))
    except Exception:  # noqa: BLE001 — sent back to the test, which fails with the traceback
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run(
    world: int, device_type: str, cp_size: int, dp_replicate: int = 1, dtype_name: str = "float64"
) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world, port, device_type, cp_size, dp_replicate, dtype_name, out_dir),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    for result in results:
        assert "error" not in result, result["error"]
    return {key: max(r[key] for r in results) for key in results[0]}


@pytest.mark.parametrize(
    ("world", "cp_size", "dp_replicate"),
    [(2, 2, 1), (4, 2, 1), pytest.param(4, 2, 2, marks=pytest.mark.slow)],
    ids=["cp2", "dp2xcp2", "hsdp2xcp2"],
)
def test_fsdp2_with_cp_matches_unsharded_cpu(world: int, cp_size: int, dp_replicate: int) -> None:
    result = run(world, "cpu", cp_size, dp_replicate)
    # The loss passes through float32 cross-entropy; gradients and updated parameters are float64 end to end.
    assert result["loss"] < 1e-6, result
    assert result["grads"] < 1e-10, result
    assert result["params_after_step"] < 1e-10, result


@pytest.mark.multi_gpu
@pytest.mark.parametrize("cp_size", [1, 2], ids=["fsdp2", "fsdp2+cp2"])
def test_fsdp2_two_gpus_match_one_gpu(cp_size: int) -> None:
    # fp32 weights, bf16 autocast: FSDP2 on 2 GPUs (with and without CP) against one unsharded model on both batches.
    result = run(2, "cuda", cp_size, dtype_name="float32")
    assert result["loss"] < 1e-2, result
    assert result["grads"] < 5e-2, result
    assert result["params_after_step"] < 5e-3, result
