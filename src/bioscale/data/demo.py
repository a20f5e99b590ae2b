"""Offline demo corpora: real sequence files that ship inside PyPI wheels bioscale already depends on.

The project commits no third-party data, yet its first command must run with no network. ``pyhmmer`` ships the
2,100 predicted proteins of one bacterial genome and ``pyrodigal`` a complete 2.46 Mbp *Corynebacterium diphtheriae*
chromosome (and its first 100 kb), found here with ``importlib.resources``.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

# kind -> (package, resource path inside it, what it is)
DEMO_CORPORA: dict[str, tuple[str, str, str]] = {
    "protein": (
        "pyhmmer",
        "tests/data/seqs/938293.PRJEB85.HG003687.faa",
        "2,100 predicted proteins of one bacterial genome (each ends with a '*' stop, stripped by the input policy)",
    ),
    "dna": (
        "pyrodigal",
        "tests/data/GCF_001457455.1_NCTC11397_genomic.fna.gz",
        "C. diphtheriae NCTC11397 chromosome, one 2.46 Mbp record (windowed by the input policy)",
    ),
    "dna-small": (
        "pyrodigal",
        "tests/data/GCF_001457455.1_NCTC11397_genomic_100kb.fna.gz",
        "the first 100 kb of the same chromosome, for tiny smoke tests",
    ),
}
# Corpora derived from the shipped files on first use (kind -> what it is); written to a cache by their module.
GENERATED_DEMO_CORPORA: dict[str, str] = {
    "cds": "the genes pyrodigal predicts on the dna corpus, as coding sequences (bioscale.data.cds.demo_cds_corpus)",
}


def demo_corpus(kind: str) -> Path:
    """Path of the demo FASTA file ``kind`` (``"protein"``, ``"dna"``, ``"dna-small"`` or ``"cds"``).

    Raises ``ValueError`` for an unknown kind or when the package that ships the file is not installed.
    """
    if kind == "cds":
        from bioscale.data.cds import demo_cds_corpus  # cds.py reads the dna corpus through this module

        return demo_cds_corpus()
    if kind not in DEMO_CORPORA:
        raise ValueError(
            f"unknown demo corpus {kind!r}: expected one of {sorted([*DEMO_CORPORA, *GENERATED_DEMO_CORPORA])}"
        )
    package, resource, _ = DEMO_CORPORA[kind]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"demo corpus {kind!r} ships with the {package!r} package, which is not installed: "
                         f"pip install {package}")
    path = Path(str(importlib.resources.files(package).joinpath(resource)))
    if not path.is_file():
        raise ValueError(f"demo corpus {kind!r}: {package!r} is installed but has no {resource} "
                         f"(a build without its test data?); reinstall it from the PyPI wheel")
    return path
