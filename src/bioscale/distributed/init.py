"""Start and stop the default process group from torchrun's environment, and the collectives the loop needs.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set), :func:`init_distributed` binds each rank to
its GPU and creates the default process group: NCCL for CUDA tensors with a gloo side for CPU objects
(``"cuda:nccl,cpu:gloo"``, which checkpointing's CPU-side collectives need), or plain gloo on CPU. Launched as a plain
process it creates no group at all and every helper here degrades to the single-process no-op, so the same training
loop runs on a laptop and on many nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of ranks, and its compute device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """True when a process group exists (launched by torchrun), even with a single rank."""
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files that exist once per run (config, metrics, exports)."""
        return self.rank == 0


def resolve_device_type(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` if a GPU is visible else ``"cpu"``; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    return device


def init_distributed(
    device: str = "auto", *, timeout: timedelta = timedelta(minutes=30), single_gpu_group: bool = False
) -> DistInfo:
    """Create the default process group if torchrun launched us; return this process's :class:`DistInfo`.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        timeout: collective timeout; generous because the first step may include a long ``torch.compile``.
        single_gpu_group: in a plain process on a GPU, create a one-rank group anyway (in-memory store, no ports),
            so FSDP2 can wrap the model on a single GPU (bf16 compute over fp32 master weights).
    """
    device_type = resolve_device_type(device)
    launched = all(var in os.environ for var in _TORCHRUN_VARS)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if launched and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="cuda:nccl,cpu:gloo", timeout=timeout, device_id=torch_device)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    elif single_gpu_group and device_type == "cuda" and not dist.is_initialized():
        dist.init_process_group(
            backend="cuda:nccl,cpu:gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timeout,
            device_id=torch_device,
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def destroy_distributed() -> None:
    """Destroy the default process group if one exists (safe to call in ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def get_world_size() -> int:
    """Ranks in the default process group; 1 in a single process."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it; the identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
