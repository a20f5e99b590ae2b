"""Sharded, verified training checkpoints with ``torch.distributed.checkpoint`` (DCP), owned by the run that wrote them.

A checkpoint is a dict of ``Stateful`` objects (torchtitan's pattern): the model and optimizer through DCP's
``get_state_dict``/``set_state_dict`` (one code path for a single process, DDP and FSDP2; each rank writes its own
shards), and bioscale's own state, :class:`JsonState` entries (the trainer's counters, the schedule, and per rank its
RNG streams and data-loader position), written as JSON files beside the shards. **Nothing bioscale writes is pickled,
and loading runs no code from the checkpoint**: the JSON is parsed by a tagged decoder that builds only plain values,
tuples and numeric arrays; DCP's tensors are read with ``torch.load(weights_only=True)`` and so are its few
non-tensor entries (the optimizer's param groups: floats, tuples, names), through :class:`_WeightsOnlyLoadPlanner`
instead of DCP's default ``weights_only=False``; DCP's ``.metadata`` is a pickle, so it is read only after its
SHA-256 matched the manifest, and then by an unpickler that knows DCP's own metadata dataclasses, ``torch.Size``,
dtypes, layouts and paths and refuses every other global (the Python documentation's "restricting globals" pattern;
torch's ``weights_only`` unpickler does not read protocol 4, which DCP writes).

Layout in ``ckpt_dir``::

    step_<N>/                 a complete checkpoint: DCP shards + .metadata, <name>.json and <name>_<rank>.json,
                              MANIFEST.json, COMPLETE (written last, then the folder is renamed)
    .tmp_step_<N>.<run id>/   being written by run <run id>; never loaded; removed when that run starts again
    step_<N>.damaged/         failed verification when a run resumed: kept for inspection, never loaded or pruned
    previous_runs/<when>-<run id>/   another run's checkpoints, moved aside by a fresh run that was asked to

Writing: every rank writes its JSON entries and its shards into the temporary folder; DCP's rank 0 writes
``.metadata`` after all shards; every rank then hashes a share of the files and rank 0 writes ``MANIFEST.json``
(each file's name, size and SHA-256; the run id, step, world size, the run's config, and how many steps since the
previous checkpoint were non-finite), then ``COMPLETE`` (holding the manifest's own SHA-256), and renames the folder
to ``step_<N>`` (atomic on POSIX). A crash at any moment leaves either a complete ``step_<N>`` or an ignored
temporary folder. With ``async_save`` the shards are staged to CPU memory and written by a background thread; the
manifest and the rename follow when the write finished (checked at the next save and at :meth:`close`). A failed
write (disk full, permission, a folder gone) raises :class:`CheckpointWriteError` naming the folder, removes only
its own temporary folder, and leaves every earlier checkpoint as it was.

Reading (:meth:`CheckpointManager.resume`): before any reader opens a file, the marker, the manifest's hash and then
every file's size and SHA-256 are checked (each rank hashes a share), and no file may be missing or unlisted. A
checkpoint that fails is named, renamed ``step_<N>.damaged``, and the next older one is tried. Checkpoints written
after non-finite steps are marked in their manifest and tried only after every clean one.

Ownership: a run id (random at a fresh start, adopted from the checkpoint on resume) is recorded in every manifest;
pruning (``keep_last_n``) and the clean-up of temporary folders touch only this run's own checkpoints and always keep
its newest clean one. A fresh run refuses a folder that holds checkpoints (:meth:`CheckpointManager.start_fresh`)
unless told to move them aside; :class:`RunLock` keeps a second process out of a run directory.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from bioscale.distributed.init import barrier

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 1
LOCK_FILE = ".bioscale.lock"
PREVIOUS_RUNS = "previous_runs"
DAMAGED_SUFFIX = ".damaged"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
_HASH_CHUNK = 4 << 20
_FULL_DISK_BYTES = 256 << 20  # below this much free space, a write error without an errno is reported as a full disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, damaged, not verifiable, or holding something other than plain
    data. The message names the folder. Resume falls back past it to an older checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission denied, a folder gone). The message says what and
    where; earlier checkpoints are left as they were."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def new_run_id() -> str:
    """A fresh run's id: recorded in each checkpoint it writes, so pruning and clean-up know what is theirs."""
    return uuid.uuid4().hex[:12]


# ---- bioscale's own state: JSON with a few tags, never pickle --------------------------------------------------------

_TAG = "__bioscale__"
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what array tags may decode to


def encode_json_state(value: Any, where: str = "state") -> Any:
    """``value`` as JSON-able data: plain values as they are; tuples, dicts with non-string keys, NumPy arrays and
    CPU tensors of numeric dtypes as tagged objects. Anything else is a ``TypeError`` naming where it sits."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [encode_json_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode_json_state(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: encode_json_state(v, f"{where}.{k}") for k, v in value.items()}
        items = [[encode_json_state(k, where), encode_json_state(v, f"{where}[{k!r}]")] for k, v in value.items()]
        return {_TAG: "dict", "items": items}
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        return {_TAG: "tensor", **_encode_array(array, where)}
    if isinstance(value, np.ndarray):
        return {_TAG: "ndarray", **_encode_array(value, where)}
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON checkpoint state")


def _encode_array(array: np.ndarray, where: str) -> dict[str, Any]:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{where}: an array of dtype {array.dtype} is not JSON checkpoint state")
    data = np.ascontiguousarray(array)
    return {"dtype": data.dtype.str, "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode()}


def decode_json_state(value: Any) -> Any:
    """The inverse of :func:`encode_json_state`; builds nothing but plain values, tuples, dicts and numeric arrays."""
    if isinstance(value, list):
        return [decode_json_state(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode_json_state(v) for k, v in value.items()}
    if tag == "tuple":
        return tuple(decode_json_state(v) for v in value["items"])
    if tag == "dict":
        return {decode_json_state(k): decode_json_state(v) for k, v in value["items"]}
    if tag in ("ndarray", "tensor"):
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"array of dtype {dtype} in JSON state")
        array = np.frombuffer(base64.b64decode(value["data"]), dtype=dtype).reshape(value["shape"]).copy()
        return torch.from_numpy(array) if tag == "tensor" else array
    raise ValueError(f"unknown tag {tag!r} in JSON state")


class JsonState(Stateful):
    """State under one name, produced and consumed by two callbacks, stored as ``<name>.json`` in the checkpoint
    folder (see :func:`encode_json_state` for what it may hold).

    ``per_rank=True``: every rank writes and reads its own ``<name>_<rank>.json`` (RNG streams, data position);
    otherwise rank 0 writes one file that every rank reads (the same value on all of them: counters, schedule).
    """

    def __init__(
        self, name: str, get: Callable[[], Any], set: Callable[[Any], None], *, per_rank: bool = False
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"JsonState name {name!r}: letters, digits and _ only (it names a file)")
        self.name = name
        self.per_rank = per_rank
        self._get = get
        self._set = set

    def file_name(self, rank: int) -> str:
        return f"{self.name}_{rank}.json" if self.per_rank else f"{self.name}.json"

    def state_dict(self) -> dict[str, Any]:
        return {self.name: self._get()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set(state_dict[self.name])


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


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) this device's CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (also after a round trip through JSON state)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- DCP's .metadata and non-tensor entries, read without running code -----------------------------------------------

# Everything DCP 2.x pickles into .metadata (found by listing the globals of real files): its metadata dataclasses,
# the file index, torch.Size, layouts by name, and the checkpoint path. Dtypes (``torch.float32``) are allowed by type.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [(module, name) for module in ("pathlib", "pathlib._local")
       for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")]
)  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: any global outside :data:`_METADATA_GLOBALS` (or a dtype) is
    refused before it is imported, so a crafted file cannot call anything."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata: refused")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata: refused")


class _VerifiedReader(FileSystemReader):
    """DCP's file reader, handed the metadata that was already verified and safely unpickled (it never opens
    ``.metadata`` itself, and there is no per-rank metadata fall-back)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._verified_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not used by bioscale")
        metadata = self._verified_metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor entries are read with ``torch.load(weights_only=True)``
    (DCP's default is ``weights_only=False``, which would run any callable a crafted entry names)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as err:  # noqa: BLE001  (whatever the unpickler objects to, the entry is refused)
            raise CheckpointError(f"entry {fqn!r} is not plain data, refused ({_first_line(err)})") from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "Unsupported global" in line or "refused" in line]
    return (useful or lines or [type(err).__name__])[0]


# ---- manifests -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's manifest says about it (read without opening a shard)."""

    step: int
    path: Path
    run_id: str | None
    world_size: int | None
    non_finite_steps: int  # steps since the previous checkpoint whose loss or gradient was not finite
    config: dict[str, Any] | None  # the run's resolved config when it wrote this checkpoint
    files: dict[str, dict[str, Any]]  # name -> {"size", "sha256"}

    @property
    def clean(self) -> bool:
        return self.non_finite_steps == 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(folder: Path) -> list[str]:
    """Every entry of a checkpoint folder except the manifest and the marker, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, COMPLETE_MARKER))


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The manifest of checkpoint folder ``path``, after checking that ``COMPLETE`` vouches for it (its SHA-256).

    Raises:
        CheckpointError: no marker, no manifest (a checkpoint of a bioscale before manifests, or not bioscale's),
            or a manifest that is damaged, changed or of an unknown format.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker or {DCP_METADATA})")
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_bytes())
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {MANIFEST}: it was written by a bioscale before checkpoint manifests, or not by bioscale, "
            "and cannot be verified, so it is not loaded (resume checkpoints are for the run that wrote them; start "
            "from exported weights with model.init_from=<dir>/final_model)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {COMPLETE_MARKER} marker ({err})") from err
    if not isinstance(marker, dict) or hashlib.sha256(raw).hexdigest() != marker.get("manifest_sha256"):
        raise CheckpointError(f"{path}: {MANIFEST} does not match the SHA-256 in {COMPLETE_MARKER} (changed, damaged)")
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format')!r}, this bioscale reads {FORMAT_VERSION}")
        return CheckpointInfo(
            step=int(manifest["step"]),
            path=path,
            run_id=manifest.get("run_id"),
            world_size=manifest.get("world_size"),
            non_finite_steps=int(manifest.get("non_finite_steps", 0)),
            config=manifest.get("config"),
            files={str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in manifest["files"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: {MANIFEST} is not a bioscale manifest ({err})") from err


def verify_checkpoint_files(info: CheckpointInfo, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with the files of ``info``'s folder against its manifest (empty: intact).

    Every rank checks the listing and every size (cheap); the SHA-256 of file ``i`` is computed by rank
    ``i % world_size`` only, so the ranks share the hashing (gather the lists for the verdict).
    """
    path = info.path
    present = set(_payload_files(path))
    listed = set(info.files)
    problems = [f"{name}: not in the manifest" for name in sorted(present - listed)]
    problems += [f"{name}: missing" for name in sorted(listed - present)]
    for index, name in enumerate(sorted(listed & present)):
        expected = info.files[name]
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: not a regular file")
            continue
        size = file.stat().st_size
        if size != expected["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)")
        elif index % world_size == rank and sha256_file(file) != expected["sha256"]:
            problems.append(f"{name}: content differs from the manifest's SHA-256 (corrupted or replaced)")
    return problems


def _read_verified(info: CheckpointInfo, name: str) -> bytes:
    """File ``name`` of the checkpoint, read once and checked against the manifest from memory."""
    raw = (info.path / name).read_bytes()
    expected = info.files.get(name)
    if expected is None or hashlib.sha256(raw).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"{info.path / name}: does not match the manifest (changed since it was verified?)")
    return raw


def read_dcp_metadata(info: CheckpointInfo) -> Metadata:
    """DCP's ``.metadata`` of a checkpoint: its bytes checked against the manifest, then unpickled with the
    allow-list of :class:`_MetadataUnpickler`; every file it points at must be in the manifest."""
    raw = _read_verified(info, DCP_METADATA)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as err:  # noqa: BLE001  (any failure of a refused or malformed pickle: nothing in it ran)
        raise CheckpointError(
            f"{info.path / DCP_METADATA} is not DCP metadata ({_first_line(err)}); nothing in it was run"
        ) from err
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{info.path / DCP_METADATA} is not DCP metadata (a {type(metadata).__name__})")
    outside = sorted({str(getattr(s, "relative_path", s)) for s in metadata.storage_data.values()} - set(info.files))
    if outside:
        raise CheckpointError(f"{info.path / DCP_METADATA} points at files outside the manifest: {outside[:3]}")
    return metadata


def _read_json_states(info: CheckpointInfo, entries: dict[str, JsonState], rank: int) -> dict[str, Any]:
    values = {}
    for key, entry in entries.items():
        name = entry.file_name(rank)
        if name not in info.files:
            raise CheckpointError(f"{info.path}: no {name} (saved by another number of ranks, or by older bioscale)")
        raw = _read_verified(info, name)
        try:
            values[key] = decode_json_state(json.loads(raw))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{info.path / name} is not bioscale JSON state ({err})") from err
    return values


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_complete(path: Path) -> bool:
    """A checkpoint folder counts only with its completion marker and DCP's metadata file."""
    return (path / COMPLETE_MARKER).is_file() and (path / DCP_METADATA).is_file()


def list_checkpoints(ckpt_dir: str | Path, *, warn: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as ``(step, path)``, oldest first; incomplete ones are skipped (with a
    warning unless ``warn=False``)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            if is_complete(path):
                found.append((int(match.group(1)), path))
            elif warn:
                logger.warning("ignoring incomplete checkpoint %s (no %s marker or metadata)", path, COMPLETE_MARKER)
    return sorted(found)


def _info_or_none(path: Path) -> CheckpointInfo | None:
    try:
        return read_checkpoint_info(path)
    except CheckpointError:
        return None


# ---- collectives (no-ops in one process) ---------------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(value: Any, group: Any = None) -> list[Any]:
    """``value`` of every rank, in rank order (over the network, never through a file)."""
    if _world() == 1:
        return [value]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value, group=group)
    return out


def on_rank0(rank: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result; its ``ValueError`` / ``OSError`` is raised on every
    rank (the others with the same message), so no rank waits for a decision that failed."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (ValueError, OSError) as err:
            error = err
    if _world() > 1:
        box = [(result, None if error is None else (isinstance(error, OSError), str(error)))]
        dist.broadcast_object_list(box, src=0)
        result, failure = box[0]
        if rank != 0 and failure is not None:
            is_os_error, message = failure
            raise (OSError(errno.EIO, message) if is_os_error else ValueError(message))
    if error is not None:
        raise error
    return result


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call without a process group ("assuming the intent is to save in a single process"),
    # which is exactly our intent in a single process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


def _root_cause(err: BaseException) -> BaseException:
    """The exception behind DCP's ``CheckpointException`` (which wraps each rank's failure) and ``raise from``."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CheckpointException) and err.failures:
            inner = next(iter(err.failures.values()))
            err = inner[0] if isinstance(inner, tuple) else inner
        elif err.__cause__ is not None:
            err = err.__cause__
        else:
            break
    return err


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


# ---- the manager --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save, find, verify and load the checkpoints of one run in one folder; keep its newest ``keep_last_n``.

    ``run_id`` names the run whose checkpoints this manager writes and prunes (a new one by default; :meth:`resume`
    adopts the loaded checkpoint's). All ranks call :meth:`save`, :meth:`resume` and :meth:`load` (they are
    collective); only rank 0 touches folder names.
    """

    def __init__(
        self, ckpt_dir: str | Path, *, rank: int, keep_last_n: int = 2, async_save: bool = False,
        run_id: str | None = None,
    ) -> None:  # fmt: skip
        if keep_last_n < 1:
            raise ValueError(f"checkpoint.keep_last_n must be >= 1; got {keep_last_n}")
        self.ckpt_dir = Path(ckpt_dir)
        self.rank = rank
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self.run_id: str = on_rank0(rank, lambda: run_id or new_run_id())  # one id for all ranks
        self._pending: tuple[int, Future, dict[str, Any]] | None = None
        self._async_group = None
        if async_save and dist.is_initialized():
            # Background writes run collectives while training runs its own; a separate gloo group keeps them apart
            # (and works when the default group is NCCL-only).
            self._async_group = dist.new_group(backend="gloo")
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        barrier()

    # ---- finding --------------------------------------------------------------------------------------------------
    def _candidates(self, *, warn: bool = False) -> list[tuple[int, Path]]:
        """Complete checkpoints in the order a resume tries them: clean ones newest first, then the ones written
        after non-finite steps, newest first."""
        found = list(reversed(list_checkpoints(self.ckpt_dir, warn=warn)))
        marked = set()
        for step, path in found:
            info = _info_or_none(path)
            if info is not None and not info.clean:
                marked.add(step)
        return [c for c in found if c[0] not in marked] + [c for c in found if c[0] in marked]

    def latest(self) -> tuple[int, Path] | None:
        """The checkpoint a resume would try first, as ``(step, path)`` (not verified), or None."""
        candidates = self._candidates()
        return candidates[0] if candidates else None

    def _own(self) -> list[CheckpointInfo]:
        """This run's complete checkpoints, oldest first."""
        infos = [_info_or_none(path) for _, path in list_checkpoints(self.ckpt_dir, warn=False)]
        return [info for info in infos if info is not None and info.run_id == self.run_id]

    def _tmp_dir(self, step: int) -> Path:
        return self.ckpt_dir / f"{_TMP_PREFIX}{step_dir_name(step)}.{self.run_id}"

    # ---- a run's start ----------------------------------------------------------------------------------------------
    def start_fresh(self, *, move_aside: bool = False, run_files: Iterable[Path] = ()) -> None:
        """Prepare the folder for a run that does not resume (rank 0; wrap in :func:`on_rank0` under torchrun).

        Checkpoints already there belong to another run, and this run would otherwise overwrite them as it reaches
        their steps: refuse with ``CheckpointError``, or with ``move_aside`` move them (with that run's exports and
        ``run_files`` such as its metrics) into ``previous_runs/<when>-<run id>/``. Nothing is deleted.
        """
        if not self.ckpt_dir.is_dir():
            return
        others = sorted(
            (p for p in self.ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
            key=lambda p: int(p.name.split("_")[1]),
        )
        if not others:
            return
        owners = sorted({info.run_id or "unknown" for p in others if (info := _info_or_none(p)) is not None})
        names = ", ".join(p.name for p in others)
        if not move_aside:
            raise CheckpointError(
                f"{self.ckpt_dir} holds checkpoints of another run ({names}; run {', '.join(owners) or 'unknown'}), "
                "and a fresh run never deletes or overwrites them: pass checkpoint.resume_from_checkpoint=true to "
                "continue that run, give this run another checkpoint.ckpt_dir, or pass "
                f"checkpoint.move_aside_other_runs=true to move them into {self.ckpt_dir / PREVIOUS_RUNS}/ first"
            )
        newest = _info_or_none(others[-1])
        owner = (newest.run_id if newest is not None else None) or "unknown"
        dest = self.ckpt_dir / PREVIOUS_RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{owner}"
        dest.mkdir(parents=True, exist_ok=False)
        moved = [*others, *(p for p in self.ckpt_dir.iterdir() if p.name.endswith(DAMAGED_SUFFIX))]
        moved += [self.ckpt_dir / name for name in ("final_model", "final_model_hf")]
        moved += [Path(p) for p in run_files]
        for path in moved:
            if path.exists() and path.resolve() != dest.resolve():
                os.rename(path, dest / path.name)
        logger.warning("moved the checkpoints of an earlier run (%s) and its exports into %s", names, dest)

    def remove_stale_tmp(self) -> None:
        """Remove this run's temporary folders left by an interrupted save (rank 0); other runs' are left alone."""
        if self.rank != 0 or not self.ckpt_dir.is_dir():
            return
        for stale in self.ckpt_dir.glob(f"{_TMP_PREFIX}*"):
            if stale.name.endswith(f".{self.run_id}"):
                logger.warning("removing incomplete checkpoint %s left by an interrupted save", stale)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                logger.info("leaving %s alone: another run's temporary folder", stale)

    # ---- writing ----------------------------------------------------------------------------------------------------
    def save(
        self, step: int, state: dict[str, Stateful], *, non_finite_steps: int = 0, config: dict[str, Any] | None = None
    ) -> None:
        """Write ``state`` as the checkpoint of ``step`` (synchronously, or staged and written in the background).

        ``non_finite_steps`` (steps since the previous checkpoint that were skipped for a non-finite loss or gradient)
        is recorded; such a checkpoint is never preferred over a clean one. ``config`` (the run's resolved config)
        lets a resume refuse a changed model or data configuration.

        Raises:
            CheckpointWriteError: the folder could not be written (the message says why and where).
        """
        self.wait()  # at most one save in flight: finish (and rename) the previous one first
        tmp = self._tmp_dir(step)
        meta = {"non_finite_steps": int(non_finite_steps), "config": config}
        tensor_state = {k: v for k, v in state.items() if not isinstance(v, JsonState)}
        json_state = {k: v for k, v in state.items() if isinstance(v, JsonState)}
        start = time.perf_counter()
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # this run's own earlier attempt at this step
                tmp.mkdir(parents=True)
            barrier()
            for entry in json_state.values():
                if entry.per_rank or self.rank == 0:
                    data = encode_json_state(entry.state_dict()[entry.name], entry.name)
                    _write_durably(tmp / entry.file_name(self.rank), json.dumps(data).encode())
            writer = FileSystemWriter(str(tmp))
            with _quiet_single_process():
                if self.async_save:
                    future = dcp.async_save(tensor_state, storage_writer=writer, process_group=self._async_group,
                                            no_dist=not dist.is_initialized())  # fmt: skip
                    # Newer torch returns a response object holding the upload future.
                    self._pending = (step, getattr(future, "upload_completion", future), meta)
                else:
                    dcp.save(tensor_state, storage_writer=writer, no_dist=not dist.is_initialized())
            if not self.async_save:
                self._finalize(step, meta)
        except (OSError, CheckpointException) as err:
            raise self._write_failed(step, err) from err
        if self.async_save:
            logger.info("checkpoint step %d staged in %.2fs, writing in the background", step,
                        time.perf_counter() - start)  # fmt: skip
        else:
            logger.info("checkpoint step %d saved in %.2fs", step, time.perf_counter() - start)

    def wait(self) -> None:
        """Block until a background save finished, then mark it complete. A no-op when none is in flight."""
        if self._pending is None:
            return
        step, future, meta = self._pending
        self._pending = None
        try:
            future.result()
            self._finalize(step, meta)
        except (OSError, CheckpointException) as err:
            raise self._write_failed(step, err) from err

    def close(self) -> None:
        """Finish any background save."""
        self.wait()

    def _finalize(self, step: int, meta: dict[str, Any]) -> None:
        # DCP's save finishes with a collective in which rank 0 writes .metadata after every rank's shards: from here
        # on every file is on disk. Each rank hashes a share; rank 0 writes the manifest, the marker, the name.
        tmp = self._tmp_dir(step)
        final = self.ckpt_dir / step_dir_name(step)
        world = _world()
        names = _payload_files(tmp)
        share = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                 for name in names[self.rank :: world]}  # fmt: skip
        shares = _gather(share, self._async_group)
        if self.rank == 0:
            files: dict[str, dict[str, Any]] = {}
            for part in shares:
                files.update(part)
            manifest = {
                "format": FORMAT_VERSION,
                "run_id": self.run_id,
                "step": step,
                "world_size": world,
                "time": time.time(),
                "non_finite_steps": meta["non_finite_steps"],
                "config": meta["config"],
                "files": dict(sorted(files.items())),
            }
            raw = json.dumps(manifest, indent=1).encode()
            _write_durably(tmp / MANIFEST, raw)
            marker = {"step": step, "world_size": world, "time": manifest["time"],
                      "manifest_sha256": hashlib.sha256(raw).hexdigest()}  # fmt: skip
            _write_durably(tmp / COMPLETE_MARKER, json.dumps(marker).encode())
            replaced = self._make_room(final) if final.exists() else None
            os.rename(tmp, final)
            _fsync_dir(self.ckpt_dir)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            if meta["non_finite_steps"]:
                logger.warning(
                    "checkpoint %s follows %d non-finite step(s): marked in its manifest, never preferred over a "
                    "clean checkpoint, and the newest clean one is kept", final, meta["non_finite_steps"],
                )  # fmt: skip
            self._prune()
        if not self.async_save:
            barrier()

    def _make_room(self, final: Path) -> Path | None:
        """``final`` exists: this run's own (from before a resume fell back past it) is returned to be removed once
        the new one is in place; anything else is moved into ``previous_runs/``, never overwritten."""
        info = _info_or_none(final)
        if info is not None and info.run_id == self.run_id:
            replaced = final.with_name(f"{_TMP_PREFIX}replaced_{final.name}.{self.run_id}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            return replaced
        owner = (info.run_id if info is not None else None) or "unknown"
        dest = self.ckpt_dir / PREVIOUS_RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{owner}"
        dest.mkdir(parents=True, exist_ok=True)
        os.rename(final, dest / final.name)
        logger.warning("%s belonged to another run (%s): moved to %s instead of overwriting it", final, owner, dest)
        return None

    def _prune(self) -> None:
        own = self._own()
        keep = {info.path for info in own[-self.keep_last_n :]}
        clean = [info.path for info in own if info.clean]
        if clean:
            keep.add(clean[-1])  # a run of non-finite checkpoints never pushes out the last clean one
        for info in own:
            if info.path not in keep:
                shutil.rmtree(info.path, ignore_errors=True)

    def _write_failed(self, step: int, err: BaseException) -> CheckpointWriteError:
        tmp = self._tmp_dir(step)
        root = _root_cause(err)
        if isinstance(root, OSError) and root.strerror:
            reason = root.strerror + (f" ({root.filename})" if root.filename else "")
        else:
            reason = _first_line(root)
        free = _free_bytes(tmp)
        if not isinstance(root, OSError) and free is not None and free < _FULL_DISK_BYTES:
            reason += "; the file system looks full"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # only this save's own temporary folder
        latest = self.latest()
        free_text = f"{free / 2**20:.0f} MiB free there" if free is not None else "free space unknown"
        message = (
            f"could not write the checkpoint of step {step} into {tmp}: {reason} ({free_text}); earlier checkpoints "
            f"are intact (latest: {latest[1] if latest else 'none'}). Free space or fix the permissions of "
            f"{self.ckpt_dir}, then resume with checkpoint.resume_from_checkpoint=true"
        )
        return CheckpointWriteError(getattr(root, "errno", None) or errno.EIO, message, str(tmp))

    # ---- reading ----------------------------------------------------------------------------------------------------
    def verify(self, info: CheckpointInfo) -> list[str]:
        """Problems of ``info``'s files against its manifest, agreed by every rank (each hashes a share)."""
        problems = verify_checkpoint_files(info, rank=self.rank, world_size=_world())
        return sorted({p for part in _gather(problems) for p in part})

    def load(self, path: str | Path, state: dict[str, Stateful]) -> CheckpointInfo:
        """Verify checkpoint folder ``path`` against its manifest, then load it into ``state``.

        Raises:
            CheckpointError: incomplete, unverifiable, damaged, or holding something other than plain data (the
                message names the folder; nothing from the checkpoint was run).
        """
        info = read_checkpoint_info(path)
        problems = self.verify(info)
        if problems:
            raise CheckpointError(f"{info.path} failed verification: {'; '.join(problems[:4])}")
        self._load_verified(info, state)
        return info

    def _load_verified(self, info: CheckpointInfo, state: dict[str, Stateful]) -> None:
        tensor_state = {k: v for k, v in state.items() if not isinstance(v, JsonState)}
        json_state = {k: v for k, v in state.items() if isinstance(v, JsonState)}
        try:  # everything is read and checked before the first tensor of the model is overwritten
            metadata = read_dcp_metadata(info)
            values = _read_json_states(info, json_state, self.rank)
            failure = None
        except CheckpointError as err:
            metadata, values, failure = None, {}, str(err)
        failures = [f for f in _gather(failure) if f is not None]
        if failures:
            raise CheckpointError(failures[0])
        try:
            with _quiet_single_process():
                dcp.load(tensor_state, storage_reader=_VerifiedReader(info.path, metadata),
                         planner=_WeightsOnlyLoadPlanner(), no_dist=not dist.is_initialized())  # fmt: skip
        except (CheckpointException, CheckpointError) as err:
            raise CheckpointError(f"{info.path} could not be loaded: {_first_line(_root_cause(err))}") from err
        for key, entry in json_state.items():
            entry.load_state_dict({entry.name: values[key]})

    def resume(
        self, state: dict[str, Stateful], *, accept: Callable[[CheckpointInfo], None] | None = None
    ) -> CheckpointInfo | None:
        """Load the newest intact checkpoint into ``state`` and adopt its run id; None when there is none at all.

        Candidates are tried in :meth:`latest`'s order. ``accept(info)`` may refuse one by raising ``ValueError``
        (a changed model or data config, another world size): that stops the resume. A checkpoint that fails
        verification or loading is named in a warning, renamed ``<name>.damaged``, and the next one is tried.

        Raises:
            CheckpointError: checkpoints exist but none is intact (each is named with what is wrong).
        """
        candidates = on_rank0(self.rank, lambda: self._candidates(warn=True))
        if not candidates:
            return None
        damaged = []
        for _, path in candidates:
            try:
                info = read_checkpoint_info(path)
            except CheckpointError as err:  # not verifiable (no manifest, a changed one): skipped, left as it is
                damaged.append(str(err))
                logger.warning("%s; trying the next older checkpoint", err)
                continue
            if accept is not None:
                accept(info)
            try:
                problems = self.verify(info)
                if problems:
                    raise CheckpointError(f"{path} failed verification: {'; '.join(problems[:4])}")
                self._load_verified(info, state)
            except CheckpointError as err:
                damaged.append(str(err))
                aside = on_rank0(self.rank, lambda p=path: self._set_aside(p))
                logger.warning("%s: renamed to %s; trying the next older checkpoint", err, aside.name)
                continue
            self.run_id = info.run_id or self.run_id
            if damaged:
                logger.warning("resumed from %s, the newest intact checkpoint (damaged: %d, named above)", path,
                               len(damaged))  # fmt: skip
            if not info.clean:
                logger.warning("%s follows %d non-finite step(s) and no clean checkpoint is left: resuming from it",
                               path, info.non_finite_steps)  # fmt: skip
            return info
        raise CheckpointError(
            f"no intact checkpoint in {self.ckpt_dir}: {' | '.join(damaged)}. Resume needs one; move these folders "
            "away (or start a fresh run in another checkpoint.ckpt_dir)"
        )

    def _set_aside(self, path: Path) -> Path:
        dest = path.with_name(path.name + DAMAGED_SUFFIX)
        index = 1
        while dest.exists():
            index += 1
            dest = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{index}")
        os.rename(path, dest)
        return dest


# ---- one process per run directory ------------------------------------------------------------------------------


def _process_start(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of process ``pid`` from ``/proc`` (Linux), or None where there is no ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class RunLock:
    """One process at a time in a run directory (and in its checkpoint folder when that lies elsewhere).

    The lock is a file, :data:`LOCK_FILE`, holding the holder's PID, host, process start time and folders, created
    atomically with its content (a hard link of a fully written file, which fails if the lock exists, also on NFS).
    A live holder is refused; so is one whose folders overlap this run's, found in a parent folder or in the
    checkpoint folder. A holder on this host whose process is gone (or whose PID now names a newer process) left a
    stale lock, which is taken over with a warning. A holder on another host cannot be checked from here: refused,
    with the path to delete once that run is known to be gone. :meth:`release` removes only a lock still its own.
    """

    def __init__(self, run_dir: str | Path, ckpt_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.ckpt_dir = Path(ckpt_dir).resolve()
        folders = [self.run_dir] + ([] if _inside(self.ckpt_dir, self.run_dir) else [self.ckpt_dir])
        self.paths = [folder / LOCK_FILE for folder in folders]
        start = _process_start(os.getpid())
        self.content = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": start[1] if start else None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "run_dir": str(self.run_dir),
            "ckpt_dir": str(self.ckpt_dir),
        }
        self._held: list[Path] = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock(s), or raise ``ValueError`` naming the holder (an ``OSError`` if a folder is unusable)."""
        self._check_overlapping_holders()
        try:
            for path in self.paths:
                self._acquire_one(path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for path in self._held:
            try:
                if json.loads(path.read_text()) == self.content:
                    path.unlink()
            except (OSError, ValueError):
                pass
        self._held = []

    def _acquire_one(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f"{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        _write_durably(staged, json.dumps(self.content).encode())
        try:
            for _ in range(2):  # a second try after taking over a stale lock
                try:
                    os.link(staged, path)
                    self._held.append(path)
                    return
                except FileExistsError:
                    holder, text = self._read(path)
                    verdict = self._verdict(holder)
                    if verdict != "stale":
                        raise ValueError(self._refusal(path, holder, verdict)) from None
                    logger.warning(
                        "taking over the stale lock %s of PID %s on %s (since %s): that process is no longer "
                        "running, so its run ended without cleaning up", path, holder.get("pid"), holder.get("host"),
                        holder.get("since"),
                    )  # fmt: skip
                    if self._read(path)[1] == text:  # not taken over by someone else meanwhile
                        path.unlink(missing_ok=True)
            raise ValueError(f"could not take the lock {path}: another run took it at the same moment")
        finally:
            staged.unlink(missing_ok=True)

    def _check_overlapping_holders(self) -> None:
        ours = {str(self.run_dir), str(self.ckpt_dir)}
        for folder in (self.run_dir, self.ckpt_dir):
            for candidate in (folder / LOCK_FILE, *(parent / LOCK_FILE for parent in folder.parents)):
                if candidate in self.paths or not candidate.is_file():
                    continue
                holder, _ = self._read(candidate)
                if {holder.get("run_dir"), holder.get("ckpt_dir")} & ours and self._verdict(holder) != "stale":
                    raise ValueError(self._refusal(candidate, holder, self._verdict(holder)))

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any], str | None]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}, None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), text

    @staticmethod
    def _verdict(holder: dict[str, Any]) -> str:
        """``"live"``, ``"stale"`` (its process is gone), ``"remote"`` (another host) or ``"unknown"`` (unreadable)."""
        if not holder or "pid" not in holder:
            return "unknown"
        if holder.get("host") != socket.gethostname():
            return "remote"
        pid = int(holder["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "stale"
        except PermissionError:
            pass  # alive, another user's
        start = _process_start(pid)
        if start is not None and (start[0] == "Z" or (holder.get("start_time") and start[1] != holder["start_time"])):
            return "stale"  # a zombie, or the PID now belongs to a newer process
        return "live"

    def _refusal(self, path: Path, holder: dict[str, Any], verdict: str) -> str:
        who = f"PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
        if verdict == "unknown":
            return f"{path.parent} is locked by {path}, which is unreadable; delete it if no run uses this folder"
        message = (
            f"{path.parent} is in use by another bioscale run ({who}; lock {path}): two runs in one run directory "
            "would interleave metrics.jsonl and overwrite each other's checkpoints. Wait for it to finish, or give "
            "this run another run_dir / checkpoint.ckpt_dir"
        )
        if verdict == "remote":
            message += f"; if that run is no longer running, delete {path}"
        return message
