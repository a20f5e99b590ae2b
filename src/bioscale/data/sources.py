"""Sequence sources: FASTA (plain or gzipped), parquet files or shard directories, and Hugging Face ``datasets``.

Every source yields raw ``(id, sequence)`` records lazily and is cut into *units* the loader can deal out to ranks
and workers: one unit per FASTA file, per parquet row group, per block of rows of an in-memory ``datasets.Dataset``;
a streaming ``datasets.IterableDataset`` is split by ``datasets.distributed.split_dataset_by_node`` instead. A file
that is not what it claims to be (no FASTA header, binary content, a missing column) raises ``ValueError`` naming the
file and the line or record. No cleaning happens here: that is the input policy's job (policy.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bioscale.data.demo import demo_corpus
from bioscale.data.policy import InputPolicy

Record = tuple[str, "str | None"]

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fna", ".ffn", ".fas")
PARQUET_SUFFIXES = (".parquet",)
_GZIP_MAGIC = b"\x1f\x8b"
# Bytes no FASTA text contains: NUL and the other ASCII control characters except whitespace (\t \n \v \f \r).
# Binary files without a NUL in the first lines (images, compressed streams) are caught by these, or by bytes
# that are not UTF-8 in a sequence line.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
# Rows per unit of an in-memory HF dataset: large enough that unit boundaries cost nothing, small enough that a
# 60M-row dataset still deals out evenly to hundreds of workers.
_HF_ROWS_PER_UNIT = 65_536
_PARQUET_BATCH_ROWS = 8_192


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    """Opens ``path`` for binary reading, decompressing when it starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _is_fasta_name(path: Path) -> bool:
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


def read_fasta(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Iterates the ``(id, sequence)`` records of a FASTA file, gzipped or not, lazily.

    ``id`` is the header up to the first whitespace; sequence lines are concatenated with surrounding whitespace
    removed and are otherwise untouched (no case change, ``*`` kept). A header without sequence lines gives an
    empty sequence (the input policy skips and counts it). Lines starting with ``;`` are comments. An empty file
    (or one of blank lines and comments only) yields no records; it is not an error here, but every consumer of
    records (the loader, ``bioscale embed``) raises a ``ValueError`` naming the file when it gets no sequences.
    Raises ``ValueError`` naming the file and line for data before the first header, an empty header, binary
    content (NUL or other control bytes anywhere, bytes that are not UTF-8 in a sequence line) or a
    corrupt/truncated gzip stream.
    """
    path = Path(path)
    record_id: str | None = None
    chunks: list[bytes] = []
    line_no = 0
    try:
        with _open_maybe_gzip(path) as f:
            for line_no, line in enumerate(f, start=1):
                bad = _BINARY_BYTES.search(line)
                what = ""
                if bad is not None:
                    what = "NUL bytes" if bad.group() == b"\x00" else f"control byte {bad.group()!r}"
                elif record_id is not None and not line.isascii() and not line.startswith(b">"):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError:
                        what = "bytes that are not UTF-8 text"
                if what:
                    raise ValueError(
                        f"{path}: line {line_no}"
                        + (f" (record {record_id!r})" if record_id is not None else "")
                        + f" contains binary data ({what}): not a FASTA text file"
                    )
                if line.startswith(b">"):
                    if record_id is not None:
                        yield record_id, b"".join(chunks).decode("utf-8", errors="replace")
                    header = line[1:].decode("utf-8", errors="replace").strip()
                    if not header:
                        raise ValueError(f"{path}: line {line_no} is an empty FASTA header '>'")
                    record_id = header.split(maxsplit=1)[0]
                    chunks = []
                    continue
                line = line.strip()
                if not line or line.startswith(b";"):
                    continue
                if record_id is None:
                    preview = line[:40].decode("utf-8", errors="replace")
                    raise ValueError(
                        f"{path}: line {line_no} has data before the first '>' header ({preview!r}): "
                        f"not a FASTA file, or its first header is missing"
                    )
                chunks.append(line)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        where = f"record {record_id!r}, " if record_id is not None else ""
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({where}line {line_no}): {e}") from e
    if record_id is not None:
        yield record_id, b"".join(chunks).decode("utf-8", errors="replace")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise ValueError(f"{path}: directory contains no *.parquet files")
        return files
    return [path]


def _open_parquet(path: Path, column: str, id_column: str | None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    schema = pf.schema_arrow
    for key, name in (("sequence_column", column), ("id_column", id_column)):
        if name is None:
            continue
        if name not in schema.names:
            raise ValueError(f"{path}: no column {name!r} (columns: {schema.names}); set {key}")
    seq_type = schema.field(column).type
    if not (pa.types.is_string(seq_type) or pa.types.is_large_string(seq_type)):
        raise ValueError(f"{path}: column {column!r} has type {seq_type}, expected strings of residues")
    return pf


def read_parquet(
    path: str | os.PathLike[str], column: str = "sequence", id_column: str | None = None
) -> Iterator[tuple[str, str | None]]:
    """Iterates ``(id, sequence)`` from a parquet file or a directory of parquet shards (sorted, recursive), lazily.

    ``id`` is ``id_column``'s value as a string, or ``"<file stem>:<row>"`` without one. Null sequences come out as
    ``None`` (the input policy counts them as empty). A missing column or a non-string sequence column raises
    ``ValueError`` naming the file and column.
    """
    source = ParquetSource(Path(path), column=column, id_column=id_column)
    for unit in source.units():
        yield from source.read_unit(unit)


@dataclass(frozen=True)
class Unit:
    """A piece of a source that one consumer reads whole: a FASTA file, a parquet row group, a block of rows."""

    path: str
    index: int = 0  # row group (parquet) or block (HF) number within ``path``; 0 for FASTA
    num_records: int | None = None  # known without reading for parquet and HF; None for FASTA
    first_row: int = 0  # row of ``path`` the unit starts at (record ids for id-less tables)


class SequenceSource:
    """Base class: a named collection of units that yields raw ``(id, sequence)`` records."""

    name: str = ""
    #: a streaming source cannot be cut into units up front; the loader asks it for a consumer's stream instead
    streaming: bool = False

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def read_unit(self, unit: Unit, start: int = 0, step: int = 1) -> Iterator[Record]:
        """Records ``start, start + step, …`` of ``unit`` (a consumer's stride through a unit it shares)."""
        raise NotImplementedError

    def consumer_stream(self, consumer: int, num_consumers: int) -> Iterator[Record]:
        """For streaming sources: the records of consumer ``consumer`` of ``num_consumers``, disjoint from others."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        if self.streaming:
            yield from self.consumer_stream(0, 1)
            return
        for unit in self.units():
            yield from self.read_unit(unit)


class FastaSource(SequenceSource):
    """One or more FASTA files (each may be gzipped); one unit per file."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"FASTA file not found: {p}")
        self.name = str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} FASTA)"

    def units(self) -> list[Unit]:
        return [Unit(path=str(p)) for p in self.paths]

    def read_unit(self, unit: Unit, start: int = 0, step: int = 1) -> Iterator[Record]:
        for i, record in enumerate(read_fasta(unit.path)):
            if i >= start and (i - start) % step == 0:
                yield record


class ParquetSource(SequenceSource):
    """A parquet file or a directory of parquet shards; one unit per row group."""

    def __init__(self, path: Path, column: str = "sequence", id_column: str | None = None) -> None:
        self.column, self.id_column = column, id_column
        self.files = _parquet_files(Path(path))
        self.name = str(path)
        self._units: list[Unit] = []
        for f in self.files:
            meta = _open_parquet(f, column, id_column).metadata
            row = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                self._units.append(Unit(path=str(f), index=rg, num_records=n, first_row=row))
                row += n

    def units(self) -> list[Unit]:
        return list(self._units)

    def read_unit(self, unit: Unit, start: int = 0, step: int = 1) -> Iterator[Record]:
        import pyarrow as pa

        pf = _open_parquet(Path(unit.path), self.column, self.id_column)
        columns = [self.column] + ([self.id_column] if self.id_column else [])
        stem = Path(unit.path).stem
        row = 0  # row within the unit of the batch's first row
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[unit.index], columns=columns):
            n = batch.num_rows
            # first wanted row (start + k * step) at or after this batch's first row
            first = start if row <= start else row + (-(row - start)) % step
            local = list(range(first - row, n, step))
            row += n
            if not local:
                continue
            if step > 1 or local[0] != 0:
                batch = batch.take(pa.array(local))
            seqs = batch.column(0).to_pylist()
            if self.id_column:
                ids = [str(x) for x in batch.column(1).to_pylist()]
            else:
                base = unit.first_row + row - n
                ids = [f"{stem}:{base + i}" for i in local]
            yield from zip(ids, seqs)


class HFSource(SequenceSource):
    """A Hugging Face ``datasets`` dataset: a hub name, a local data directory or a ``save_to_disk`` folder."""

    def __init__(
        self, name: str, *, split: str = "train", streaming: bool = False, column: str = "sequence",
        id_column: str | None = None,
    ) -> None:
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"source 'hf:{name}' needs the `datasets` package: pip install 'bioscale[hf]'")
        import datasets

        self.name, self.split, self.streaming = f"hf:{name}", split, streaming
        self.column, self.id_column = column, id_column
        local = Path(name)
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{self.name}: no split {split!r} (splits: {list(ds)}); set hf_split")
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=max(1, min(1024, len(ds) // _HF_ROWS_PER_UNIT)))
        else:
            try:
                ds = datasets.load_dataset(name, split=split, streaming=streaming)
            except ValueError as e:  # e.g. unknown split: keep the library's words, name the source
                raise ValueError(f"{self.name}: {e}") from e
        columns = ds.column_names
        if columns is None and streaming:  # some streaming datasets only know their columns after one row
            columns = list(next(iter(ds)).keys())
        for key, col in (("sequence_column", column), ("id_column", id_column)):
            if col is not None and col not in columns:
                raise ValueError(f"{self.name}: no column {col!r} (columns: {columns}); set {key}")
        self.dataset = ds

    def units(self) -> list[Unit]:
        if self.streaming:
            raise RuntimeError("a streaming source has no units; use consumer_stream")
        n = len(self.dataset)
        return [
            Unit(path=self.name, index=i, num_records=min(_HF_ROWS_PER_UNIT, n - start), first_row=start)
            for i, start in enumerate(range(0, n, _HF_ROWS_PER_UNIT))
        ]

    def read_unit(self, unit: Unit, start: int = 0, step: int = 1) -> Iterator[Record]:
        assert unit.num_records is not None
        rows = range(unit.first_row + start, unit.first_row + unit.num_records, step)
        if not rows:
            return
        table = self.dataset.select_columns(self._columns()).select(rows).with_format("arrow")[:]
        yield from self._records(table.column(self.column).to_pylist(), table, rows)

    def consumer_stream(self, consumer: int, num_consumers: int) -> Iterator[Record]:
        from datasets.distributed import split_dataset_by_node

        ds = self.dataset.select_columns(self._columns())
        if num_consumers > 1:
            ds = split_dataset_by_node(ds, rank=consumer, world_size=num_consumers)
        for i, row in enumerate(ds):
            rid = str(row[self.id_column]) if self.id_column else f"{consumer}:{i}"
            yield rid, row[self.column]

    def _columns(self) -> list[str]:
        return [self.column] + ([self.id_column] if self.id_column else [])

    def _records(self, seqs: list[Any], table: Any, rows: range) -> Iterator[Record]:
        if self.id_column:
            ids = [str(x) for x in table.column(self.id_column).to_pylist()]
        else:
            ids = [str(r) for r in rows]
        yield from zip(ids, seqs)


def open_source(
    spec: str | os.PathLike[str],
    *,
    sequence_column: str = "sequence",
    id_column: str | None = None,
    hf_split: str = "train",
    hf_streaming: bool = False,
) -> SequenceSource:
    """Opens a source from its spec (the ``data.source`` config value).

    ``spec`` is a FASTA file (``.fasta .fa .faa .fna .ffn .fas``, optionally ``.gz``), a parquet file, a directory of
    parquet shards (or of FASTA files), ``demo:<kind>`` (see demo.py) or ``hf:<dataset name or local path>``.
    """
    text = str(spec)
    if text.startswith("demo:"):
        return FastaSource([demo_corpus(text[len("demo:") :])])
    if text.startswith("hf:"):
        return HFSource(
            text[len("hf:") :], split=hf_split, streaming=hf_streaming, column=sequence_column, id_column=id_column
        )
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if path.is_dir():
        if any(path.rglob("*.parquet")):
            return ParquetSource(path, column=sequence_column, id_column=id_column)
        fasta = sorted(p for p in path.rglob("*") if p.is_file() and _is_fasta_name(p))
        if not fasta:
            raise ValueError(f"{path}: directory has no parquet shards and no FASTA files ({', '.join(FASTA_SUFFIXES)})")
        return FastaSource(fasta)
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        return ParquetSource(path, column=sequence_column, id_column=id_column)
    if _is_fasta_name(path):
        return FastaSource([path])
    raise ValueError(
        f"{path}: unknown source type; expected FASTA ({', '.join(FASTA_SUFFIXES)}, optionally .gz), .parquet, a "
        f"directory of parquet shards, 'demo:<kind>' or 'hf:<dataset>'"
    )


def iter_sequences(
    source: SequenceSource, policy: InputPolicy, rng: Any = None
) -> Iterator[tuple[str, str]]:
    """Every training sequence of ``source`` with ``policy`` applied and counted (``policy.stats``), in order.

    The curation primitive: a record cut into several windows yields ``id/1``, ``id/2``, …; a skipped record
    yields nothing. ``rng`` (a ``numpy.random.Generator``) places random crops.
    """
    where = f" in {source.name}"
    for record_id, seq in source:
        pieces = policy(record_id, seq, rng, where=where)
        if len(pieces) == 1:
            yield record_id, pieces[0]
        else:
            for k, piece in enumerate(pieces, start=1):
                yield f"{record_id}/{k}", piece
