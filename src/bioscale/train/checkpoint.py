"""Sharded, crash-safe training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a dict of ``Stateful`` objects (torchtitan's pattern): the model and optimizer through DCP's
``get_state_dict``/``set_state_dict`` (one code path for a single process, DDP and FSDP2; each rank writes its own
shards), the trainer's counters and scheduler, and one entry per rank with that rank's RNG states and data-loader
position. Non-tensor state is pickled into ``bytes`` so DCP stores it verbatim instead of flattening nested lists.

Layout in ``ckpt_dir``::

    step_<N>/            a complete checkpoint: DCP shards + .metadata + COMPLETE (written last, then renamed)
    .tmp_step_<N>/       being written; never loaded, removed on the next start

Every rank writes into ``.tmp_step_<N>``; once DCP reports all shards and the metadata written, rank 0 adds the
``COMPLETE`` marker and renames the folder to ``step_<N>`` (an atomic rename on POSIX file systems). A crash at any
moment therefore leaves either a complete ``step_<N>`` or an ignored temporary folder, never a checkpoint that looks
valid but is not. :meth:`CheckpointManager.latest` returns the newest folder that has both the marker and DCP's
metadata. With ``async_save`` the shards are staged to CPU memory and written by a background thread while training
continues; the rename happens when the write finished (checked at the next save and at :meth:`close`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from bioscale.distributed.init import barrier

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"


class ModelOptimizerState(Stateful):
    """Model and optimizer state, sharded as the model is (DTensor shards under FSDP2, full tensors otherwise)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


class PickledState(Stateful):
    """Arbitrary picklable state under one key, produced and consumed by two callbacks.

    The key is rank-specific for per-rank state (``rank_3``), so every rank's entry survives DCP's de-duplication of
    identical keys across ranks.
    """

    def __init__(self, key: str, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        self.key = key
        self._get = get
        self._set = set

    def state_dict(self) -> dict[str, Any]:
        return {self.key: pickle.dumps(self._get())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set(pickle.loads(state_dict[self.key]))


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) this device's CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call without a process group ("assuming the intent is to save in a single process"),
    # which is exactly our intent in a single process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_complete(path: Path) -> bool:
    """A checkpoint folder counts only with its completion marker and DCP's metadata file."""
    return (path / COMPLETE_MARKER).is_file() and (path / ".metadata").is_file()


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as ``(step, path)``, oldest first; incomplete ones are skipped."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            if is_complete(path):
                found.append((int(match.group(1)), path))
            else:
                logger.warning("ignoring incomplete checkpoint %s (no %s marker or metadata)", path, COMPLETE_MARKER)
    return sorted(found)


class CheckpointManager:
    """Save, find and load checkpoints in one folder; keep the newest ``keep_last_n``.

    All ranks call :meth:`save` and :meth:`load` (they are collective); only rank 0 touches folder names.
    """

    def __init__(self, ckpt_dir: str | Path, *, rank: int, keep_last_n: int = 2, async_save: bool = False) -> None:
        if keep_last_n < 1:
            raise ValueError(f"checkpoint.keep_last_n must be >= 1; got {keep_last_n}")
        self.ckpt_dir = Path(ckpt_dir)
        self.rank = rank
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self._pending: tuple[int, Future] | None = None
        self._async_group = None
        if async_save and dist.is_initialized():
            # Background writes run collectives while training runs its own; a separate gloo group keeps them apart
            # (and works when the default group is NCCL-only).
            self._async_group = dist.new_group(backend="gloo")
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_dir.glob(f"{_TMP_PREFIX}*"):
                logger.warning("removing incomplete checkpoint %s left by an interrupted save", stale)
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint as ``(step, path)``, or None."""
        found = list_checkpoints(self.ckpt_dir)
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Stateful]) -> None:
        """Write ``state`` as the checkpoint of ``step`` (synchronously, or staged and written in the background)."""
        self.wait()  # at most one save in flight: finish (and rename) the previous one first
        tmp = self.ckpt_dir / f"{_TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        start = time.perf_counter()
        if self.async_save:
            with _quiet_single_process():
                future = dcp.async_save(
                    state, checkpoint_id=str(tmp), process_group=self._async_group, no_dist=not dist.is_initialized()
                )
            # Newer torch returns a response object holding the upload future.
            future = getattr(future, "upload_completion", future)
            self._pending = (step, future)
            logger.info(
                "checkpoint step %d staged in %.2fs, writing in the background", step, time.perf_counter() - start
            )
        else:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            self._finalize(step)
            logger.info("checkpoint step %d saved in %.2fs", step, time.perf_counter() - start)

    def wait(self) -> None:
        """Block until a background save finished, then mark it complete. A no-op when none is in flight."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finalize(step)

    def close(self) -> None:
        """Finish any background save."""
        self.wait()

    def _finalize(self, step: int) -> None:
        # DCP's save finishes with a collective in which rank 0 writes .metadata after every rank's shards: from here
        # on the folder is complete and only needs its marker and name.
        tmp = self.ckpt_dir / f"{_TMP_PREFIX}{step_dir_name(step)}"
        final = self.ckpt_dir / step_dir_name(step)
        if self.rank == 0:
            marker = {
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "time": time.time(),
            }
            with open(tmp / COMPLETE_MARKER, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # left by an earlier run in the same folder that did not resume
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune()
        if not self.async_save:
            barrier()

    def _prune(self) -> None:
        found = list_checkpoints(self.ckpt_dir)
        for _, path in found[: max(len(found) - self.keep_last_n, 0)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path, state: dict[str, Stateful]) -> None:
        """Load checkpoint folder ``path`` into ``state`` (each ``Stateful`` receives its part)."""
        path = Path(path)
        if not is_complete(path):
            raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker or .metadata)")
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
