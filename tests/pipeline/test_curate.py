"""The data stage: input policy, length filter, de-duplication, a split that keeps identical sequences together."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bioscale.pipeline import curate, read_artifact
from bioscale.pipeline.cli import data_main

from .conftest import write_fasta


def _random_proteins(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seqs = ["M" + "".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(8, 40))) for _ in range(n)]
    assert len(set(seqs)) == n
    return seqs


def _split(artifact_dir: Path, name: str) -> list[tuple[str, str]]:
    table = pq.read_table(artifact_dir / name).to_pydict()
    return list(zip(table["id"], table["sequence"], strict=True))


def test_policy_filters_dedup_and_split(tmp_path: Path) -> None:
    # 60 distinct proteins, each present twice (once in lower case with a stop codon: the same after the policy),
    # plus an empty record, a too-short one, a too-long one and one with an out-of-alphabet character.
    distinct = _random_proteins(60, seed=0)
    records = [(f"a{i}", s) for i, s in enumerate(distinct)]
    records += [(f"b{i}", s.lower() + "*") for i, s in enumerate(distinct)]
    records += [("empty", ""), ("short", "MK"), ("long", "M" * 500), ("odd", "MKT#VL")]
    fasta = write_fasta(tmp_path / "in.fasta", records)
    art = curate(fasta, out=tmp_path / "ds", min_length=5, max_length=100, validation_fraction=0.3, seed=7)
    m = art.metadata.metrics
    train, validation = _split(art.path, "train"), _split(art.path, "validation")
    assert m["policy_records_read"] == len(records)
    assert m["policy_skipped_empty"] == 1 and m["too_short"] == 1 and m["too_long"] == 1
    assert m["policy_stop_stripped"] == 60 and m["policy_uppercased"] == 60
    assert m["policy_records_mapped"] == 1 and ("odd", "MKTXVL") in train + validation  # '#' mapped to X
    assert m["duplicates"] == 60 and m["unique_sequences"] == 61
    assert m["train_sequences"] == len(train) and m["validation_sequences"] == len(validation)
    assert len(train) + len(validation) == 61
    assert {s for _, s in train}.isdisjoint({s for _, s in validation})
    assert 0.1 < len(validation) / 61 < 0.5  # expected 0.3
    # The first occurrence (in source order) is the one kept.
    assert all(rid.startswith("a") or rid in ("odd",) for rid, _ in train + validation)
    assert art.metadata.lineage[0].kind == "source" and art.metadata.lineage[0].id.startswith("sha256:")
    assert read_artifact(art.path, "dataset", verify=True).id == art.metadata.id


def test_split_is_a_function_of_the_sequence_and_seed(tmp_path: Path) -> None:
    # The same sequence under different ids, in different files, lands on the same side; another seed moves some.
    seqs = _random_proteins(200, seed=1)
    a = curate(write_fasta(tmp_path / "a.fasta", [(f"x{i}", s) for i, s in enumerate(seqs)]), out=tmp_path / "a")
    reordered = [(f"y{i}", s) for i, s in enumerate(reversed(seqs))]
    b = curate(write_fasta(tmp_path / "b.fasta", reordered), out=tmp_path / "b")
    c = curate(tmp_path / "a.fasta", out=tmp_path / "c", seed=1)
    val = lambda art: {s for _, s in _split(art.path, "validation")}  # noqa: E731
    assert val(a) == val(b)
    assert val(a) != val(c)


def test_curation_is_reproducible(tmp_path: Path) -> None:
    a = curate(None, out=tmp_path / "a", max_records=200)
    b = curate(None, out=tmp_path / "b", max_records=200)
    assert a.metadata.id == b.metadata.id
    assert a.metadata.metrics["unique_sequences"] == 200 and a.metadata.metrics["capped_at_max_records"]
    assert a.metadata.config["source"] == "demo:protein"
    assert a.metadata.lineage[0].path.endswith(".faa")  # the wheel's file, hashed


def test_dna_is_chunked_before_the_split(tmp_path: Path) -> None:
    genome = ("ACGTTGCA" * 40 + "GATTACA" * 30)[:500]
    art = curate(write_fasta(tmp_path / "g.fna", [("chr1", genome.lower())]), out=tmp_path / "dna", kind="dna",
                 chunk_length=50, validation_fraction=0.3)
    pieces = _split(art.path, "train") + _split(art.path, "validation")
    m = art.metadata.metrics
    assert m["policy_windowed"] == 1 and m["policy_sequences"] == 10
    assert all(len(s) == 50 for _, s in pieces)
    assert m["unique_sequences"] + m["duplicates"] == 10
    assert art.metadata.modality == "dna"


def test_sharding(tmp_path: Path) -> None:
    art = curate(None, out=tmp_path / "ds", max_records=50, shard_size=8, validation_fraction=0.2)
    shards = sorted((art.path / "train").glob("*.parquet"))
    assert len(shards) == art.metadata.metrics["train_shards"] == -(-art.metadata.metrics["train_sequences"] // 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
        ({"min_length": 0}, r"min_length must be >= 1"),
        ({"min_length": 10, "max_length": 5}, r"max_length=5 is smaller than min_length=10"),
        ({"chunk_length": 100}, r"chunk_length applies to DNA only"),
        ({"kind": "rna"}, r"unknown kind 'rna'"),
        ({"scale": "huge"}, r"unknown scale 'huge'"),
        ({"source": "/no/such/file.fasta"}, r"data source /no/such/file.fasta"),
        ({"min_length": 100_000}, r"no sequence left for training .* shorter than min_length=100000"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    source = kwargs.pop("source", None)
    with pytest.raises(ValueError, match=message):
        curate(source, out=tmp_path / "ds", max_records=20, **kwargs)
    assert not (tmp_path / "ds").exists()  # a failed curation leaves nothing behind


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    curate(None, out=tmp_path / "ds", max_records=20)
    with pytest.raises(ValueError, match=r"is not empty; choose another --out or pass --overwrite"):
        curate(None, out=tmp_path / "ds", max_records=20)
    curate(None, out=tmp_path / "ds", max_records=30, overwrite=True)
    assert read_artifact(tmp_path / "ds").metrics["unique_sequences"] == 30


def test_data_command_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["--out", str(tmp_path / "ds"), "--max-records", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1
    described = json.loads(lines[0])
    assert described["path"] == str((tmp_path / "ds").resolve()) and described["kind"] == "dataset"
    assert described["seed"] == 3 and described["metrics"]["unique_sequences"] == 40
    assert data_main(["--out", str(tmp_path / "ds")]) == 2  # not empty: a clear error, exit status 2
    captured = capsys.readouterr()
    assert captured.out == "" and "is not empty" in captured.err
