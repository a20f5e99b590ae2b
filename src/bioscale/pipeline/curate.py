"""The data stage: curate raw sequences into a dataset artifact of parquet shards with a leakage-free split.

Records come from any source the data layer opens (FASTA, parquet file or shard directory, ``hf:``, or the offline
demo corpus when none is given) and go through the data layer's :class:`~bioscale.data.policy.InputPolicy` (stop
codons, case, unknown residues, empty records; DNA contigs cut into chunks), then a length filter and exact
de-duplication. The train/validation split is decided by a seeded hash of the sequence itself, so identical
sequences always land on the same side (no validation sequence is also a training sequence), the split needs no
second pass or memory of what came before, and the same seed gives the same split on any machine. Every count (read,
skipped, mapped, filtered, duplicated, kept per split) goes into the artifact's metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioscale.data.splits import is_held_out
from bioscale.pipeline.artifacts import (
    Artifact,
    ArtifactMetadata,
    Modality,
    Scale,
    prepare_output_dir,
    source_lineage_entry,
    write_artifact,
)
from bioscale.pipeline.scales import check_modality, get_preset
from bioscale.data.demo import demo_corpus
from bioscale.data.policy import InputPolicy
from bioscale.data.sources import iter_sequences
from bioscale.data.sources import open_source

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
DEFAULT_SHARD_SIZE = 100_000  # rows per parquet shard: ~35 MB of protein sequence, a few seconds to read
_POLICY_KIND = {"protein": "protein", "dna": "nucleotide"}


def split_of(sequence: str, *, seed: int, validation_fraction: float) -> str:
    """``"validation"`` or ``"train"`` for ``sequence``: a pure function of (sequence, seed), see data/splits.py."""
    return "validation" if is_held_out(sequence, seed=seed, fraction=validation_fraction) else "train"


@dataclass
class _ShardWriter:
    """Buffers rows of one split and writes ``<dir>/shard-NNNNN.parquet`` every ``shard_size`` rows."""

    directory: Path
    shard_size: int
    ids: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    num_shards: int = 0
    num_records: int = 0
    num_residues: int = 0

    def add(self, record_id: str, sequence: str) -> None:
        self.ids.append(record_id)
        self.sequences.append(sequence)
        self.num_records += 1
        self.num_residues += len(sequence)
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": pa.array(self.ids, pa.string()), "sequence": pa.array(self.sequences, pa.string())})
        pq.write_table(table, self.directory / f"shard-{self.num_shards:05d}.parquet", compression="zstd")
        self.num_shards += 1
        self.ids, self.sequences = [], []


@dataclass(frozen=True)
class CurationSettings:
    """The validated parameters of one curation (recorded as the dataset artifact's ``config``)."""

    source: str
    kind: Modality
    sequence_column: str
    id_column: str | None
    hf_split: str
    min_length: int
    max_length: int | None
    chunk_length: int | None
    unknown_residues: str
    validation_fraction: float
    max_records: int | None
    shard_size: int


def curate(
    source: str | Path | None = None,
    *,
    out: str | Path,
    kind: Modality = "protein",
    scale: Scale = "tiny",
    seed: int = 0,
    sequence_column: str = "sequence",
    id_column: str | None = None,
    hf_split: str = "train",
    min_length: int = 1,
    max_length: int | None = None,
    chunk_length: int | None = None,
    unknown_residues: str = "map",
    validation_fraction: float = 0.1,
    max_records: int | None = -1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Artifact:
    """Curate ``source`` into a dataset artifact at ``out``; return it.

    Args:
        source: FASTA (optionally gzipped), parquet file or directory of shards, ``hf:<name>``, ``demo:<kind>``; None
            curates the offline demo corpus for ``kind`` (``demo:protein``, or the DNA demo genome).
        kind: ``"protein"`` or ``"dna"``: the alphabet of the input policy and the model family downstream.
        min_length, max_length: keep sequences with ``min_length <= len <= max_length`` residues after the policy
            (``max_length=None``: no upper bound; training crops long sequences itself).
        chunk_length: DNA only: cut each record into consecutive non-overlapping chunks of this many bases (the last
            one shorter) before filtering, so a genome of one record can still be split. Default: the scale's.
        unknown_residues: the input policy for characters outside the alphabet: ``map`` to X/N, ``reject`` the
            record (counted), or ``error``.
        validation_fraction: expected fraction of unique sequences in the validation split, in [0, 1).
        max_records: keep at most this many unique sequences, the first ones in source order (reading stops
            there); ``-1`` takes the scale's cap, ``None`` keeps all.
        shard_size: rows per parquet shard.
        overwrite: replace a non-empty ``out`` instead of refusing.

    Raises:
        ValueError: a bad argument (named), an unreadable source (the data layer names file and record), or no
            sequence left for training. Nothing is left at ``out`` after a failure.
    """

    kind = check_modality(kind)
    preset = get_preset(scale)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction}")
    if min_length < 1:
        raise ValueError(f"min_length must be >= 1; got {min_length}")
    if max_length is not None and max_length < min_length:
        raise ValueError(f"max_length={max_length} is smaller than min_length={min_length}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    if kind == "protein" and chunk_length is not None:
        raise ValueError("chunk_length applies to DNA only (proteins are cropped at training time)")
    if kind == "dna" and chunk_length is None:
        chunk_length = preset.dna_chunk_length
    if chunk_length is not None and chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1; got {chunk_length}")
    if max_records == -1:
        max_records = preset.max_records
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be >= 1 or None; got {max_records}")
    settings = CurationSettings(
        source=str(source) if source is not None else preset.demo_source[kind], kind=kind,
        sequence_column=sequence_column, id_column=id_column, hf_split=hf_split, min_length=min_length,
        max_length=max_length, chunk_length=chunk_length, unknown_residues=unknown_residues,
        validation_fraction=validation_fraction, max_records=max_records, shard_size=shard_size,
    )

    try:
        opened = open_source(settings.source, sequence_column=sequence_column, id_column=id_column, hf_split=hf_split)
    except FileNotFoundError as err:
        raise ValueError(f"data source {settings.source}: {err}") from err
    # Lineage names the file actually read (a demo spec resolves to the wheel's file), hashed.
    lineage_target: str | Path = settings.source
    if settings.source.startswith("demo:"):

        lineage_target = demo_corpus(settings.source[len("demo:") :])

    out = prepare_output_dir(out, overwrite)
    try:
        metadata = _write_dataset(out, opened, settings, seed=seed, scale=scale)
        metadata = metadata.model_copy(update={"lineage": [source_lineage_entry(lineage_target)]})
        metadata = write_artifact(out, metadata)
    except BaseException:
        # A half-written dataset is useless and would block a re-run: remove it (the error says what went wrong).
        shutil.rmtree(out, ignore_errors=True)
        raise
    logger.info(
        "dataset %s: %d train / %d validation sequences (%d duplicates, %d filtered by length)",
        out, metadata.metrics["train_sequences"], metadata.metrics["validation_sequences"],
        metadata.metrics["duplicates"], metadata.metrics["too_short"] + metadata.metrics["too_long"],
    )
    return Artifact(path=out.resolve(), metadata=metadata)


def _write_dataset(out: Path, opened: Any, settings: CurationSettings, *, seed: int, scale: Scale) -> ArtifactMetadata:
    """Stream the source through policy, filters and de-duplication into the split shards; the metadata to write."""

    writers = {name: _ShardWriter(out / name, settings.shard_size) for name in SPLITS}
    for writer in writers.values():
        writer.directory.mkdir()
    # Windowing without overlap is exactly "cut into chunks"; proteins are not cropped here (training crops).
    policy = InputPolicy(
        _POLICY_KIND[settings.kind],
        max_length=settings.chunk_length,
        crop="window",
        window_stride=settings.chunk_length,
        unknown_residues=settings.unknown_residues,
    )
    seen: set[bytes] = set()  # 16-byte digests: ~100 MB per million unique sequences
    too_short = too_long = duplicates = 0
    capped = False
    logger.info("curating %s (%s, scale %s) into %s", settings.source, settings.kind, scale, out)
    for record_id, sequence in iter_sequences(opened, policy):
        if len(sequence) < settings.min_length:
            too_short += 1
            continue
        if settings.max_length is not None and len(sequence) > settings.max_length:
            too_long += 1
            continue
        digest = hashlib.blake2b(sequence.encode(), digest_size=16).digest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        split = split_of(sequence, seed=seed, validation_fraction=settings.validation_fraction)
        writers[split].add(record_id, sequence)
        if settings.max_records is not None and len(seen) >= settings.max_records:
            capped = True
            break
    for writer in writers.values():
        writer.flush()

    train, validation = writers["train"], writers["validation"]
    if train.num_records == 0:
        raise ValueError(
            f"data source {settings.source}: no sequence left for training after the input policy and filters "
            f"(read {policy.stats.records_read} records; {too_short} shorter than min_length={settings.min_length}, "
            f"{too_long} longer than max_length={settings.max_length}, {duplicates} duplicates)"
        )
    if validation.num_records == 0:
        logger.warning(
            "validation split is empty (%d unique sequences, fraction %g)", len(seen), settings.validation_fraction
        )
    metrics: dict[str, Any] = {f"policy_{k}": v for k, v in policy.stats.as_dict().items()}
    metrics.update(
        too_short=too_short,
        too_long=too_long,
        duplicates=duplicates,
        unique_sequences=len(seen),
        capped_at_max_records=capped,
        train_sequences=train.num_records,
        train_residues=train.num_residues,
        train_shards=train.num_shards,
        validation_sequences=validation.num_records,
        validation_residues=validation.num_residues,
        validation_shards=validation.num_shards,
    )
    return ArtifactMetadata(
        kind="dataset",
        modality=settings.kind,
        paths={"train": "train", "validation": "validation"},
        metrics=metrics,
        config={**dataclasses.asdict(settings), "split": "blake2b(sequence, key=seed) / 2^64 < validation_fraction"},
        seed=seed,
        scale=scale,
    )
