"""Sources: FASTA (plain, gzipped), parquet files and shard directories, HF datasets, and every malformed-file error."""

from __future__ import annotations

import functools
import gzip
import operator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bioscale.data import InputPolicy, demo_corpus, iter_sequences, open_source, read_fasta, read_parquet
from bioscale.data.sources import FastaSource, ParquetSource

from .helpers import random_proteins, write_fasta, write_parquet


def test_read_fasta_multiline_gzip_and_comments(tmp_path):
    records = [(f"s{i}", s) for i, s in enumerate(random_proteins(5, low=50, high=200))]
    plain = write_fasta(tmp_path / "a.fasta", records, width=7)
    gz = write_fasta(tmp_path / "a.fasta.gz", records, gz=True)
    # gzip is detected by content, not name
    disguised = write_fasta(tmp_path / "disguised.fa", records, gz=True)
    for path in (plain, gz, disguised):
        assert list(read_fasta(path)) == records
    odd = tmp_path / "odd.fa"
    odd.write_text("\n;comment\n>x1 desc\nMKV\r\n\n  LLA \n>empty\n>x2\nmk*\n")
    assert list(read_fasta(odd)) == [("x1", "MKVLLA"), ("empty", ""), ("x2", "mk*")]


def test_fasta_without_header(tmp_path):
    path = tmp_path / "noheader.fasta"
    path.write_text("MKVLLA\n>x\nMKV\n")
    with pytest.raises(ValueError, match=r"noheader\.fasta: line 1 has data before the first '>' header \('MKVLLA'\)"):
        list(read_fasta(path))


def test_fasta_binary_content(tmp_path):
    path = tmp_path / "binary.fa"
    path.write_bytes(b">ok\nMKV\n>second\nMK\x00\x01\x02V\n")
    with pytest.raises(ValueError, match=r"binary\.fa: line 4 \(record 'second'\) contains binary data"):
        list(read_fasta(path))
    png = tmp_path / "image.fa"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"image\.fa: line 1 has data before the first '>' header"):
        list(read_fasta(png))


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b">s\nMK\x01\x02V\n", r"control byte b'\\x01'"),  # binary without a NUL byte
        (b">s\nMK\x80\x81\xfeV\n", r"bytes that are not UTF-8 text"),
    ],
)
def test_fasta_binary_content_without_nul_bytes(tmp_path, content, what):
    path = tmp_path / "blob.fa"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"blob\.fa: line 2 \(record 's'\) contains binary data \({what}\)"):
        list(read_fasta(path))
    # valid UTF-8 is text: the character reaches the input policy, which maps or rejects it
    path.write_bytes(">s\nMKé\n".encode())
    assert list(read_fasta(path)) == [("s", "MKé")]


def test_empty_fasta_yields_nothing_and_the_loader_names_it(tmp_path):
    from bioscale.data import DataConfig, build_dataloader, protein_tokenizer

    for name, content in (("empty.fasta", b""), ("blank.fa.gz", gzip.compress(b"\n;only a comment\n"))):
        path = tmp_path / name
        path.write_bytes(content)
        assert list(read_fasta(path)) == []  # documented: no records, no error at this level
        loader = build_dataloader(DataConfig(source=str(path)), protein_tokenizer())
        with pytest.raises(ValueError, match=rf"received no training sequences in epoch 0 from .*{name}"):
            next(iter(loader))


def test_fasta_empty_header_and_truncated_gzip(tmp_path):
    path = tmp_path / "emptyhdr.fa"
    path.write_text(">a\nMKV\n>\nLLA\n")
    with pytest.raises(ValueError, match=r"emptyhdr\.fa: line 3 is an empty FASTA header"):
        list(read_fasta(path))
    records = [(f"s{i}", s) for i, s in enumerate(random_proteins(200, low=100, high=300))]
    data = gzip.compress("".join(f">{r}\n{s}\n" for r, s in records).encode())
    cut = tmp_path / "cut.fa.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.fa\.gz: corrupt or truncated gzip stream \(record 's\d+', line \d+\)"):
        list(read_fasta(cut))


def test_read_parquet_file_and_shard_directory(tmp_path, protein_shards):
    root, seqs = protein_shards
    assert [s for _, s in read_parquet(root)] == seqs
    ids = [i for i, _ in read_parquet(root, id_column="id")]
    assert ids[:2] == ["r0", "r1"] and len(ids) == 120
    no_ids = write_parquet(tmp_path / "noid.parquet", ["MKV", None, "LL"], ids=False)
    assert list(read_parquet(no_ids)) == [("noid:0", "MKV"), ("noid:1", None), ("noid:2", "LL")]


def test_parquet_units_and_strided_reads(protein_shards):
    root, seqs = protein_shards
    source = ParquetSource(root)
    units = source.units()
    assert len(units) == 12 and all(u.num_records == 10 for u in units)
    assert [s for u in units for _, s in source.read_unit(u)] == seqs
    unit = units[5]
    everything = list(source.read_unit(unit))
    for start, step in ((0, 3), (2, 3), (1, 4), (9, 2), (10, 1)):
        assert list(source.read_unit(unit, start, step)) == everything[start::step]
    assert next(i for i, _ in source.read_unit(unit)) == "part-001:10"  # ids name file and row


def test_parquet_errors(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ["MKV"])
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'seq' \(columns: \['id', 'sequence'\]\); set sequence_column"):
        list(read_parquet(path, column="seq"))
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'name' .*; set id_column"):
        open_source(path, id_column="name")
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"sequence": pa.array([[1, 2], [3]])}), ints)
    with pytest.raises(ValueError, match=r"ints\.parquet: column 'sequence' has type list<\w+: int64>, expected strings"):
        open_source(ints)
    fake = tmp_path / "fake.parquet"
    fake.write_text(">not parquet\nMKV\n")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        open_source(fake)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=r"empty: directory has no parquet shards and no FASTA files"):
        open_source(empty_dir)


def test_open_source_dispatch(tmp_path, protein_fasta, protein_shards):
    fasta, _ = protein_fasta
    assert isinstance(open_source(fasta), FastaSource)
    assert isinstance(open_source(protein_shards[0]), ParquetSource)
    assert isinstance(open_source("demo:protein"), FastaSource)
    weird = tmp_path / "seqs.txt"
    weird.write_text("MKV")
    with pytest.raises(ValueError, match=r"seqs\.txt: unknown source type"):
        open_source(weird)
    with pytest.raises(FileNotFoundError, match="data source not found"):
        open_source(tmp_path / "missing.fasta")
    with pytest.raises(ValueError, match="unknown demo corpus 'rna'"):
        open_source("demo:rna")


def test_demo_corpora():
    proteins = list(read_fasta(demo_corpus("protein")))
    assert len(proteins) == 2100 and all(s.endswith("*") for _, s in proteins[:10])
    genome = list(read_fasta(demo_corpus("dna-small")))
    assert len(genome) == 1 and len(genome[0][1]) == 100_000
    assert demo_corpus("dna").name == "GCF_001457455.1_NCTC11397_genomic.fna.gz"


def test_iter_sequences_applies_and_counts_policy(tmp_path):
    path = tmp_path / "mixed.fa"
    path.write_text(">a\nacgx*\n>empty\n>long\n" + "A" * 25 + "\n")
    policy = InputPolicy("nucleotide", max_length=10, crop="window")
    out = list(iter_sequences(open_source(path), policy))
    assert out == [("a", "ACGN"), ("long/1", "A" * 10), ("long/2", "A" * 10), ("long/3", "A" * 5)]
    s = policy.stats
    assert (s.records_read, s.skipped_empty, s.windowed, s.residues_mapped, s.sequences) == (3, 1, 1, 1, 4)


def test_hf_datasets_local(tmp_path, protein_shards):
    pytest.importorskip("datasets")
    root, seqs = protein_shards
    eager = open_source(f"hf:{root}")
    assert [s for _, s in eager] == seqs
    streaming = open_source(f"hf:{root}", hf_streaming=True)
    assert streaming.streaming
    assert [s for _, s in streaming] == seqs
    halves = [[s for _, s in streaming.consumer_stream(c, 3)] for c in range(3)]
    assert sorted(functools.reduce(operator.iadd, halves, [])) == sorted(seqs) and all(halves)
    with pytest.raises(ValueError, match=r"no column 'residues'"):
        open_source(f"hf:{root}", sequence_column="residues")
