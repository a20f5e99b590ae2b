"""Typed artifacts: the directories that the data, train and eval stages write and read.

An artifact is a directory holding a ``metadata.json`` (validated by :class:`ArtifactMetadata`) plus the files it
names under ``paths`` (relative to the directory). The metadata records what produced the artifact (config, seed,
scale, code version, creation time) and what it consumed (``lineage``: path, kind and content id of each input), so
every number in an evaluation traces back to a checkpoint and a curated dataset. The content ``id`` is a SHA-256 over
the files and the fields that define the artifact (not the creation time), so the same inputs, code and seed give the
same id: re-running a stage is checkable. ``metadata.json`` is written last and atomically, so a directory without it
is an incomplete artifact, never a silently broken one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from bioscale import __version__

SCHEMA_VERSION = 1
METADATA_FILENAME = "metadata.json"

ArtifactKind = Literal["dataset", "model", "evaluation"]
# Lineage may also name a raw input that is not an artifact (a FASTA or parquet file, a demo corpus, a hub dataset).
LineageKind = Literal["dataset", "model", "evaluation", "source"]
Scale = Literal["tiny", "small", "medium", "full"]
# "cells": evaluation artifacts of single-cell models (Geneformer); curation (``bioscale data``) reads protein / dna.
Modality = Literal["protein", "dna", "cells", "image"]

ARTIFACT_KINDS: tuple[str, ...] = ("dataset", "model", "evaluation")


class CodeVersion(BaseModel):
    """Which code produced an artifact: the package version and, when run from a git checkout, the commit."""

    model_config = ConfigDict(extra="forbid")

    bioscale: str
    git_commit: str | None = None
    git_dirty: bool | None = None


class LineageEntry(BaseModel):
    """One input an artifact consumed: an upstream artifact (by its directory and id) or a raw source file."""

    model_config = ConfigDict(extra="forbid")

    kind: LineageKind
    path: str  # absolute path at the time it was consumed (or a source spec such as "hf:org/name")
    id: str  # the upstream artifact's content id, or "sha256:<hex>" of a source file


class ArtifactMetadata(BaseModel):
    """The contents of an artifact's ``metadata.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: ArtifactKind
    id: str = ""  # filled by write_artifact
    modality: Modality | None = None
    paths: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    created: str = ""  # UTC ISO-8601, filled by write_artifact
    code_version: CodeVersion | None = None  # filled by write_artifact
    lineage: list[LineageEntry] = Field(default_factory=list)
    seed: int | None = None
    scale: Scale | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {value}; this bioscale reads version {SCHEMA_VERSION}")
        return value

    @field_validator("paths")
    @classmethod
    def _relative_paths(cls, value: dict[str, str]) -> dict[str, str]:
        # Relative, non-escaping paths keep an artifact relocatable: copy the directory and it still resolves.
        for role, rel in value.items():
            pure = PurePosixPath(rel)
            if not rel or pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
                raise ValueError(f"paths.{role}={rel!r} must be a relative path inside the artifact directory")
        return value

    @field_validator("created")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        if value:
            try:
                datetime.fromisoformat(value)
            except ValueError as err:
                raise ValueError(f"created={value!r} is not an ISO-8601 time") from err
        return value

    def path(self, artifact_dir: str | Path, role: str) -> Path:
        """Absolute path of the file or directory stored under ``paths[role]``."""
        if role not in self.paths:
            raise ValueError(
                f"{self.kind} artifact {artifact_dir} has no field 'paths.{role}' (has: {sorted(self.paths)})"
            )
        return Path(artifact_dir).resolve() / self.paths[role]

    def describe(self, artifact_dir: str | Path) -> dict[str, Any]:
        """The one-line JSON description a stage prints on stdout: where the artifact is, plus its metadata."""
        return {"path": str(Path(artifact_dir).resolve()), **self.model_dump(mode="json")}


@dataclass(frozen=True)
class Artifact:
    """An artifact on disk: its directory and its validated metadata (what each stage function returns)."""

    path: Path
    metadata: ArtifactMetadata

    def file(self, role: str) -> Path:
        """Absolute path stored under ``metadata.paths[role]``."""
        return self.metadata.path(self.path, role)

    def describe(self) -> dict[str, Any]:
        return self.metadata.describe(self.path)


def load_artifact(
    artifact: Artifact | str | Path, expected_kind: ArtifactKind | Iterable[ArtifactKind] | None = None
) -> Artifact:
    """An :class:`Artifact` from a directory (validated by :func:`read_artifact`) or an existing one (kind checked)."""
    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    return Artifact(path=path.resolve() if path.exists() else path, metadata=read_artifact(path, expected_kind))


def prepare_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Create ``out`` for a new artifact; a non-empty ``out`` is refused unless ``overwrite`` (then emptied)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"output directory {out} is not empty; choose another --out or pass --overwrite")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """The bioscale version, plus the git commit (and whether the tree is dirty) when the package sits in a checkout."""

    package_dir = Path(__file__).resolve().parents[1]
    commit: str | None = None
    dirty: bool | None = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or None
        if commit is not None:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", str(package_dir)],
                cwd=package_dir, capture_output=True, text=True, timeout=10, check=True,
            ).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        # Not a checkout (an installed wheel) or no git binary: the package version alone identifies the code.
        commit, dirty = None, None
    return CodeVersion(bioscale=__version__, git_commit=commit, git_dirty=dirty)


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # walk order must not depend on the filesystem
        for name in sorted(filenames):
            yield Path(dirpath) / name


def content_id(artifact_dir: str | Path, metadata: ArtifactMetadata) -> str:
    """SHA-256 over the files under ``paths`` and the defining fields, excluding ``created``, ``id`` and code version.

    Two runs with the same inputs, config and seed that write byte-identical files get the same id; any change to a
    file, a metric, the config or the lineage changes it.
    """
    root = Path(artifact_dir)
    digest = hashlib.sha256()
    defining = metadata.model_dump(mode="json", exclude={"id", "created", "code_version"})
    digest.update(json.dumps(defining, sort_keys=True, separators=(",", ":")).encode())
    seen: set[Path] = set()
    for role in sorted(metadata.paths):
        target = root / metadata.paths[role]
        for file in _iter_files(target):
            if file in seen:  # a role may point inside another role's directory
                continue
            seen.add(file)
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()[:32]


def write_artifact(artifact_dir: str | Path, metadata: ArtifactMetadata) -> ArtifactMetadata:
    """Fill ``id``, ``created`` and ``code_version``, check every ``paths`` entry exists, and write ``metadata.json``.

    The file is written to a temporary name and renamed, so a reader never sees half a metadata file.
    """
    root = Path(artifact_dir)
    if not root.is_dir():
        raise ValueError(f"artifact directory {root} does not exist")
    for role, rel in metadata.paths.items():
        if not (root / rel).exists():
            raise ValueError(f"artifact {root}: paths.{role} points to {rel}, which does not exist")
    metadata = metadata.model_copy(update={"created": utc_now_iso(), "code_version": code_version()})
    metadata = metadata.model_copy(update={"id": content_id(root, metadata)})
    # Round-trip through validation so what is written is exactly what read_artifact accepts.
    metadata = ArtifactMetadata.model_validate(metadata.model_dump(mode="json"))
    tmp = root / f".{METADATA_FILENAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / METADATA_FILENAME)
    return metadata


def _format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"field {field!r}: {item['msg']}")
    return "; ".join(parts)


def read_artifact(
    artifact_dir: str | Path,
    expected_kind: ArtifactKind | Iterable[ArtifactKind] | None = None,
    *,
    verify: bool = False,
) -> ArtifactMetadata:
    """Read and validate an artifact directory's ``metadata.json``.

    Raises ``ValueError`` naming the directory and the offending field for: a missing directory, a missing or
    unparsable ``metadata.json``, failed validation, a kind other than ``expected_kind``, a ``paths`` entry whose
    file is gone, and (with ``verify=True``) content that no longer matches the recorded ``id``.
    """
    root = Path(artifact_dir)
    if not root.exists():
        raise ValueError(f"artifact {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"artifact {root} is not a directory (an artifact is a directory holding {METADATA_FILENAME})")
    meta_file = root / METADATA_FILENAME
    if not meta_file.is_file():
        raise ValueError(f"artifact {root} has no {METADATA_FILENAME} (not an artifact, or its stage did not finish)")
    try:
        raw = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"artifact {meta_file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"artifact {meta_file} must hold a JSON object, got {type(raw).__name__}")
    try:
        metadata = ArtifactMetadata.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"artifact {meta_file} is invalid: {_format_validation_error(err)}") from None
    if expected_kind is not None:
        allowed = (expected_kind,) if isinstance(expected_kind, str) else tuple(expected_kind)
        if metadata.kind not in allowed:
            raise ValueError(
                f"artifact {root} has field 'kind' = {metadata.kind!r}, expected {' or '.join(map(repr, allowed))}"
            )
    for role, rel in metadata.paths.items():
        if not (root / rel).exists():
            raise ValueError(f"artifact {root}: field 'paths.{role}' points to {rel}, which does not exist")
    if verify:
        actual = content_id(root, metadata)
        if actual != metadata.id:
            raise ValueError(
                f"artifact {root}: field 'id' is {metadata.id} but the content hashes to {actual} (modified since?)"
            )
    return metadata


def lineage_entry(artifact_dir: str | Path, metadata: ArtifactMetadata) -> LineageEntry:
    """The lineage record of a consumed artifact."""
    return LineageEntry(kind=metadata.kind, path=str(Path(artifact_dir).resolve()), id=metadata.id)


def source_lineage_entry(source: str | Path) -> LineageEntry:
    """The lineage record of a raw input: a file (hashed) or a non-file spec such as ``hf:org/name`` (kept verbatim)."""
    path = Path(source)
    if path.is_file():
        return LineageEntry(kind="source", path=str(path.resolve()), id=f"sha256:{sha256_file(path)}")
    if path.is_dir():
        digest = hashlib.sha256()
        for file in _iter_files(path):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + sha256_file(file).encode() + b"\n")
        return LineageEntry(kind="source", path=str(path.resolve()), id=f"sha256:{digest.hexdigest()}")
    return LineageEntry(kind="source", path=str(source), id=f"spec:{source}")


def trace_lineage(artifact_dir: str | Path) -> list[tuple[LineageEntry, ArtifactMetadata | None]]:
    """Walk the lineage graph from ``artifact_dir`` upwards, depth first, returning every ancestor once.

    Each item pairs the lineage record with the ancestor's metadata (``None`` for raw sources, or for an artifact
    that has since moved). The recorded id is checked against the ancestor's current id, so a replaced upstream
    artifact is reported rather than silently followed.
    """
    result: list[tuple[LineageEntry, ArtifactMetadata | None]] = []
    seen: set[str] = set()

    def visit(metadata: ArtifactMetadata) -> None:
        for entry in metadata.lineage:
            if entry.id in seen:
                continue
            seen.add(entry.id)
            if entry.kind == "source" or not Path(entry.path).is_dir():
                result.append((entry, None))
                continue
            parent = read_artifact(entry.path, expected_kind=entry.kind)
            if parent.id != entry.id:
                raise ValueError(
                    f"lineage of {artifact_dir}: artifact {entry.path} now has id {parent.id}, "
                    f"but {entry.id} was consumed"
                )
            result.append((entry, parent))
            visit(parent)

    visit(read_artifact(artifact_dir))
    return result


def parse_artifact_line(text: str, *, origin: str = "stdin") -> Path:
    """The artifact directory named by the last JSON line of ``text`` (a previous stage's stdout).

    Non-JSON lines are ignored so that a stray line from a library does not break a pipe; an empty input or one with
    no artifact line gets a message saying what to do instead.
    """
    last: Mapping[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict) and "path" in parsed:
            last = parsed
    if last is None:
        if not text.strip():
            raise ValueError(
                f"no input artifact: {origin} is empty (did the upstream stage fail?); pass --input ARTIFACT_DIR"
            )
        raise ValueError(
            f"no input artifact: {origin} holds no JSON line with a 'path' field; pass --input ARTIFACT_DIR"
        )
    return Path(str(last["path"]))
