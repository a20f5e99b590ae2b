"""The ranks of a job as a mesh ``(dp_replicate, dp_shard, cp)``: who shards, who replicates, who splits sequences.

torchtitan's arrangement: context parallelism is the innermost dimension, so the ranks of a CP group are consecutive
(on one node, where their per-layer K/V all-gathers run over NVLink); data parallelism is outside it. FSDP2 shards
parameters over the flattened ``dp_shard × cp`` ranks — CP ranks hold different tokens of the same sequences, so
their gradients must be summed like those of data-parallel ranks, and sharding over them also divides the memory of
parameters and optimizer state by ``cp``. With ``dp_replicate > 1`` (multi-node HSDP) FSDP2 gets the 2-D mesh
``(dp_replicate, dp_shard_cp)``: shards within a node group, replicas across them.

Data: the ``cp`` ranks of a group train on the same micro-batches (each keeps its chunks), so the loader is built per
data-parallel rank: ``build_dataloader(..., rank=mesh.dp_rank, world_size=mesh.dp_size)``.

:class:`ContextParallel` is what a training loop holds: the mesh, this rank's data-parallel place, and the three
things context parallelism asks of the loop (prepare the model, shard each micro-batch, wrap each forward), all
no-ops with ``cp_size == 1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bioscale.distributed.context_parallel import apply_context_parallel, context_parallel
from bioscale.distributed.cp_layout import CPLayout, shard_batch_for_cp


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the ``(dp_replicate, dp_shard, cp)`` arrangement (ranks numbered row-major, cp fastest).

    Attributes:
        fsdp_mesh: what ``fully_shard`` takes: 1-D ``("dp_shard_cp",)``, or 2-D ``("dp_replicate", "dp_shard_cp")``
            for HSDP; ``None`` in a single process.
        cp_mesh: 2-D ``("dp", "cp")`` whose ``"cp"`` groups split sequences; ``None`` without CP.
        dp_replicate / dp_shard / cp: the size of each dimension (their product is the world size).
        rank: this process's global rank.
    """

    fsdp_mesh: DeviceMesh | None
    cp_mesh: DeviceMesh | None
    dp_replicate: int
    dp_shard: int
    cp: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def cp_rank(self) -> int:
        """Index within the CP group (which chunks of each sequence this rank holds)."""
        return self.rank % self.cp

    @property
    def dp_rank(self) -> int:
        """Data-parallel index: which shard of the data this rank's CP group trains on."""
        return self.rank // self.cp

    @property
    def dp_size(self) -> int:
        """Number of distinct data shards (``dp_replicate * dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The process group of this rank's CP group (``None`` without CP or in a single process)."""
        return self.cp_mesh["cp"].get_group() if self.cp_mesh is not None else None


def build_parallel_mesh(device_type: str, *, cp_size: int = 1, dp_replicate: int = 1) -> ParallelMesh:
    """Arrange the job's ranks as ``(dp_replicate, dp_shard, cp)`` with ``dp_shard = world / (dp_replicate * cp)``.

    Needs the default process group (``bioscale.distributed.init_distributed``); without one (a plain process) it
    returns the trivial single-rank arrangement. Two meshes over the same row-major numbering are built directly
    (rather than slicing a flattened dimension out of one 3-D mesh, which torch deprecates from 2.11).

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        cp_size: context-parallel degree (ranks that split each sequence).
        dp_replicate: HSDP replica groups (e.g. the number of nodes); 1 = plain FSDP over every rank.

    Raises:
        ValueError: ``cp_size`` or ``dp_replicate`` is below 1 or does not divide the world size.
    """
    if cp_size < 1 or dp_replicate < 1:
        raise ValueError(f"cp_size and dp_replicate must be >= 1, got cp_size={cp_size}, dp_replicate={dp_replicate}")
    if not (dist.is_available() and dist.is_initialized()):
        if cp_size != 1 or dp_replicate != 1:
            raise ValueError(f"cp_size={cp_size}, dp_replicate={dp_replicate} need several ranks: launch with torchrun")
        return ParallelMesh(None, None, 1, 1, 1, 0)
    world_size = dist.get_world_size()
    if world_size % (cp_size * dp_replicate):
        raise ValueError(
            f"cp_size={cp_size} x dp_replicate={dp_replicate} must divide the number of ranks ({world_size})"
        )
    dp_shard = world_size // (cp_size * dp_replicate)
    # FSDP2 shards over dp_shard and cp together (see the module docstring).
    if dp_replicate == 1:
        fsdp_mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard_cp",))
    else:
        fsdp_mesh = init_device_mesh(
            device_type, (dp_replicate, dp_shard * cp_size), mesh_dim_names=("dp_replicate", "dp_shard_cp")
        )
    cp_mesh = None
    if cp_size > 1:
        cp_mesh = init_device_mesh(device_type, (world_size // cp_size, cp_size), mesh_dim_names=("dp", "cp"))
    return ParallelMesh(fsdp_mesh, cp_mesh, dp_replicate, dp_shard, cp_size, dist.get_rank())


class ContextParallel:
    """The loop's view of the rank layout and of context parallelism: mesh, model preparation, batch sharding, forward.

    With ``cp_size == 1`` the CP methods are no-ops and every rank is its own data-parallel rank. Otherwise each group
    of ``cp_size`` consecutive ranks shares one data stream and splits its sequences; gradients of CP ranks are
    partial (each saw its own tokens), and FSDP2 or DDP over all ranks sums them like those of data-parallel ranks,
    so the loss normalisation (x world size / global label count) is unchanged.

    Attributes:
        size: the CP degree.
        mesh: the :class:`ParallelMesh` (None in a plain single process, where there is nothing to arrange).
        fsdp_mesh: what FSDP2 shards over (2-D for HSDP with ``dp_replicate > 1``; None in a plain process).
        dp_rank / dp_size: this rank's data shard and the number of shards (what the data loader is built for).

    Raises:
        ValueError: (constructor) ``cp_size`` or ``dp_replicate`` does not fit the job (see
            :func:`build_parallel_mesh`).
    """

    def __init__(
        self, cp_size: int, device_type: str, *, rank: int, world_size: int, dp_replicate: int = 1
    ) -> None:
        self.size = cp_size
        self.dp_rank, self.dp_size = rank, world_size
        self.mesh: ParallelMesh | None = None
        self.fsdp_mesh: DeviceMesh | None = None
        if cp_size == 1 and dp_replicate == 1 and world_size == 1:
            return
        self.mesh = build_parallel_mesh(device_type, cp_size=cp_size, dp_replicate=dp_replicate)
        self.fsdp_mesh = self.mesh.fsdp_mesh
        self.dp_rank, self.dp_size = self.mesh.dp_rank, self.mesh.dp_size

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The process group this rank splits sequences with (None without CP)."""
        return self.mesh.cp_group if self.mesh is not None and self.size > 1 else None

    def apply(self, model: nn.Module) -> None:
        """Prepare ``model`` (on meta, before activation checkpointing, compile and FSDP2) for CP; a no-op without."""
        if self.size > 1:
            apply_context_parallel(model, self.cp_group)

    def shard(
        self, batches: Sequence[dict[str, Any]], *, causal: bool, pad_token_id: int
    ) -> tuple[list[dict[str, Any]], list[CPLayout | None]]:
        """This rank's shards of ``batches`` and their layouts (the batches unchanged without CP).

        Causal labels are shifted before the split (``shift_labels``), so no label is lost at a chunk boundary.
        """
        if self.size == 1:
            return list(batches), [None] * len(batches)
        assert self.mesh is not None
        shards = [
            shard_batch_for_cp(b, self.mesh.cp_rank, self.size, shift_labels=causal, pad_token_id=pad_token_id)
            for b in batches
        ]
        return [s.batch for s in shards], [s.layout for s in shards]

    def forward(self, model: nn.Module, layout: CPLayout | None) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward: the model's attention sees this rank's CP plan."""
        return context_parallel(model, layout) if self.size > 1 else contextlib.nullcontext()
