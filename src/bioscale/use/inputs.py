"""Reading what users hand to ``bioscale embed`` / ``finetune``: sequences from FASTA, parquet or CSV, with ids.

Embedding accepts a path or in-memory sequences; fine-tuning reads a table with a sequence column and a label
column. Both come here so that every entry point reports a bad input the same way: a ``ValueError`` naming the file,
the column or the record (an empty FASTA, a missing column, an empty sequence, a duplicated id), never a silent
drop. FASTA parsing itself is :func:`bioscale.data.read_fasta`; tables are read with ``pyarrow``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from bioscale.data import read_fasta

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fna", ".ffn", ".fas")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
# Column names tried, in order, when the caller names none (Porter6 uses "Sequence", UniRef90 "sequence").
DEFAULT_SEQUENCE_COLUMNS = ("sequence", "Sequence", "seq", "sequences")
DEFAULT_ID_COLUMNS = ("id", "ID", "name", "Name", "accession")

SequencesLike = str | Path | Sequence[str] | Sequence[tuple[str, str]] | Mapping[str, str]


def _is_fasta(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES


def read_table(path: str | Path) -> Any:
    """A parquet, CSV or TSV file as a ``pyarrow.Table`` (``ValueError`` for a missing file or unknown suffix)."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pq.read_table(path)
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    raise ValueError(
        f"cannot read {str(path)!r}: expected one of {FASTA_SUFFIXES + TABLE_SUFFIXES} (optionally .gz for FASTA)"
    )


def pick_column(
    table: Any, requested: str | None, candidates: Sequence[str], what: str, path: str | Path
) -> str | None:
    """The column to use for ``what``: ``requested`` (must exist) or the first present name in ``candidates``."""
    names = list(table.column_names)
    if requested is not None:
        if requested not in names:
            raise ValueError(f"{what} column {requested!r} not found in {str(path)!r}; columns are {names}")
        return requested
    for name in candidates:
        if name in names:
            return name
    return None


def read_sequences(
    source: SequencesLike,
    *,
    sequence_column: str | None = None,
    id_column: str | None = None,
) -> tuple[list[str], list[str]]:
    """``(ids, sequences)`` from a FASTA / parquet / CSV path, a list of sequences, ``(id, seq)`` pairs or a dict.

    Sequences without ids get ``seq<index>``. Sequences are stripped of whitespace and upper-cased (the ESM-2 and
    nucleotide vocabularies are upper case).

    Raises:
        ValueError: no sequences, an empty sequence (named by id), a duplicated id, a missing column or file.
    """
    origin: str
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise ValueError(f"input file {origin!r} does not exist")
        if _is_fasta(path):

            records = list(read_fasta(path))
        else:
            table = read_table(path)
            seq_col = pick_column(table, sequence_column, DEFAULT_SEQUENCE_COLUMNS, "sequence", path)
            if seq_col is None:
                raise ValueError(
                    f"no sequence column in {origin!r} (tried {list(DEFAULT_SEQUENCE_COLUMNS)}); "
                    f"pass sequence_column=... (columns are {table.column_names})"
                )
            id_col = pick_column(table, id_column, DEFAULT_ID_COLUMNS, "id", path)
            seqs = [str(s) if s is not None else "" for s in table.column(seq_col).to_pylist()]
            ids = (
                [str(i) for i in table.column(id_col).to_pylist()] if id_col else [f"seq{i}" for i in range(len(seqs))]
            )
            records = list(zip(ids, seqs))
    elif isinstance(source, Mapping):
        origin = "the given dict"
        records = [(str(k), str(v)) for k, v in source.items()]
    elif isinstance(source, Iterable):
        origin = "the given sequences"
        records = []
        for index, item in enumerate(source):
            if isinstance(item, str):
                records.append((f"seq{index}", item))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                records.append((str(item[0]), str(item[1])))
            else:
                raise ValueError(
                    f"sequence {index} must be a string or an (id, sequence) pair, got {type(item).__name__}"
                )
    else:
        raise ValueError(f"cannot read sequences from a {type(source).__name__}")

    if not records:
        raise ValueError(f"no sequences found in {origin}")
    ids: list[str] = []
    sequences: list[str] = []
    seen: set[str] = set()
    for record_id, sequence in records:
        sequence = "".join(sequence.split()).upper()
        if not sequence:
            raise ValueError(f"sequence {record_id!r} in {origin} is empty")
        if record_id in seen:
            raise ValueError(f"sequence id {record_id!r} appears more than once in {origin}")
        seen.add(record_id)
        ids.append(record_id)
        sequences.append(sequence)
    return ids, sequences
