"""Fixtures for the data-pipeline tests: tiny FASTA and parquet corpora written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import random_proteins, write_fasta, write_parquet


@pytest.fixture
def protein_fasta(tmp_path: Path) -> tuple[Path, list[str]]:
    seqs = random_proteins(40, seed=1)
    return write_fasta(tmp_path / "prot.fasta", [(f"p{i}", s) for i, s in enumerate(seqs)]), seqs


@pytest.fixture
def protein_shards(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory of 3 parquet shards with 4 row groups each (12 units), 120 distinct proteins."""
    seqs = random_proteins(120, seed=2)
    root = tmp_path / "shards"
    root.mkdir()
    for k in range(3):
        write_parquet(root / f"part-{k:03d}.parquet", seqs[k * 40 : (k + 1) * 40], row_group_size=10)
    return root, seqs
