"""bioscale's stateful loader in an Accelerate training loop, without Accelerate re-sharding it.

Do not pass a bioscale loader to ``accelerator.prepare``. ``prepare`` treats every ``DataLoader`` as one global stream
to split across processes: for an iterable dataset it reads batches on process 0 and concatenates and slices them
along the batch dimension for the others (measured with two processes, accelerate 1.16: a packed batch, one
``[1, T]`` row with ``max_length_q`` ints, fails in the concatenation; a padded one would reach every rank from
rank 0's stream), or, with ``dispatch_batches=False``, makes each process keep every N-th batch of what it reads.
bioscale's loader is already one stream per rank (``build_dataloader(..., rank=, world_size=)``: every sequence goes
to exactly one rank, packed to a token budget, resumable per rank), so either way its sharding is undone. The call is
instead::

    accelerator = Accelerator()
    loader = build_dataloader(cfg, tokenizer, rank=accelerator.process_index, world_size=accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)      # the loader is not prepared
    loader = prepare_loader(accelerator, loader)                  # checks the rank, moves batches to the device

:func:`prepare_loader` refuses a loader built for another rank or world size, moves each batch to
``accelerator.device`` and registers the loader for ``accelerator.save_state`` / ``load_state`` (every rank's state in
one file, since Accelerate writes custom state from the main process only; bioscale's loader checks the layout on
resume). Accelerate is an optional extra (``pip install 'bioscale[accelerate]'``);
it is imported by the caller, never by this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from bioscale.data import BioscaleDataLoader


class DeviceLoader:
    """A :class:`~bioscale.data.BioscaleDataLoader` whose batches arrive on ``device`` (tensors moved, the python ints
    of packed batches kept), checkpointed with every rank's position."""

    def __init__(self, loader: BioscaleDataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        non_blocking = self.device.type == "cuda"
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                   for k, v in batch.items()}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Every rank's loader state: ``accelerator.save_state`` writes custom objects from the main process only,
        so the states are gathered here (every process calls it) and each rank picks its own on load."""
        state = self.loader.state_dict()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"loader_states": [state]}
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return {"loader_states": states}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        states = state_dict["loader_states"]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if len(states) <= rank:
            raise ValueError(f"the saved data-loader state has {len(states)} ranks; this is rank {rank}")
        self.loader.load_state_dict(states[rank])  # the loader itself refuses another layout


def prepare_loader(accelerator: Any, loader: BioscaleDataLoader, *, checkpoint: bool = True) -> DeviceLoader:
    """``loader`` for this process of ``accelerator``, in place of ``accelerator.prepare(loader)`` (see the module
    docstring); ``checkpoint``: register it for ``accelerator.save_state`` / ``load_state``.

    Raises ``ValueError`` when ``loader`` was built for another rank or world size than this process's.
    """
    if not isinstance(loader, BioscaleDataLoader):
        raise ValueError(f"prepare_loader takes a bioscale loader (build_dataloader), got {type(loader).__name__}")
    meta = loader.state_dict()["bioscale"]
    here = (accelerator.process_index, accelerator.num_processes)
    if (meta["rank"], meta["world_size"]) != here:
        raise ValueError(
            f"the loader was built for rank {meta['rank']} of {meta['world_size']}, this process is rank {here[0]} of "
            f"{here[1]}: build it with rank=accelerator.process_index, world_size=accelerator.num_processes"
        )
    wrapped = DeviceLoader(loader, accelerator.device)
    if checkpoint:
        accelerator.register_for_checkpointing(wrapped)
    return wrapped
