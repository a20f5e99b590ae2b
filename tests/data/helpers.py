"""Tiny corpora written on the fly for the data-pipeline tests (no third-party data in the repository)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bioscale.data.tokenizers import PROTEIN_CANONICAL


def random_proteins(n: int, *, seed: int = 0, low: int = 5, high: int = 60) -> list[str]:
    """``n`` distinct random protein sequences (distinct so that a sequence identifies its record)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    alphabet = np.array(list(PROTEIN_CANONICAL))
    while len(out) < n:
        seq = "".join(rng.choice(alphabet, size=int(rng.integers(low, high))))
        if seq not in seen:
            seen.add(seq)
            out.append(seq)
    return out


def write_fasta(path: Path, records: list[tuple[str, str]], *, width: int = 60, gz: bool = False) -> Path:
    lines = []
    for rid, seq in records:
        lines.append(f">{rid} some description")
        lines += [seq[i : i + width] for i in range(0, len(seq), width)] or []
    text = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def write_parquet(path: Path, seqs: list[str | None], *, row_group_size: int | None = None, ids: bool = True) -> Path:
    columns = {"sequence": pa.array(seqs, pa.string())}
    if ids:
        columns = {"id": pa.array([f"r{i}" for i in range(len(seqs))]), **columns}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
