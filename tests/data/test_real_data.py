"""End to end on real data from ../shared/data (skipped cleanly where it is absent)."""

from __future__ import annotations

import pyarrow.parquet as pq

from bioscale.data import (
    DataConfig,
    InputPolicy,
    build_dataloader,
    count_tokens,
    get_policy_stats,
    iter_sequences,
    nucleotide_tokenizer,
    open_source,
    protein_tokenizer,
    read_fasta,
    read_parquet,
)


def test_uniref90_parquet_end_to_end(shared_data):
    path = shared_data / "uniref90_sample.parquet"
    table = pq.read_table(path)
    records = list(read_parquet(path, id_column="id"))
    assert len(records) == table.num_rows == 9000
    assert records[0] == (table.column("id")[0].as_py(), table.column("sequence")[0].as_py())

    cfg = DataConfig(source=str(path), id_column="id", use_sequence_packing=True, max_tokens_per_batch=16384,
                     pad_to_multiple_of=16, shuffle_buffer_size=9000)
    loader = build_dataloader(cfg, protein_tokenizer())
    it = iter(loader)
    real = total = 0
    for _ in range(20):
        batch = next(it)
        counts = count_tokens(batch)
        assert batch["input_ids"].shape[1] <= 16384 and batch["max_length_q"] <= 1024
        real += counts["num_real_tokens"]
        total += counts["num_tokens"]
        assert 0.12 < counts["num_label_tokens"] / counts["num_real_tokens"] < 0.18  # ~15% of residues masked
    assert real / total > 0.97  # packing wastes little
    stats = get_policy_stats(loader)
    assert stats["records_read"] == 9000  # whole-epoch shuffle block read
    assert stats["cropped"] > 0 and stats["skipped_empty"] == 0


def test_opengenome2_fasta_end_to_end(shared_data):
    path = shared_data / "opengenome2_metagenomics_sample.fasta"
    records = list(read_fasta(path))
    assert len(records) == 80 and all(len(s) > 0 for _, s in records)
    policy = InputPolicy("nucleotide", max_length=1000, crop="window")
    pieces = list(iter_sequences(open_source(path), policy))
    assert sum(len(s) for _, s in pieces) == sum(len(s) for _, s in records)  # non-overlapping windows cover all
    assert policy.stats.records_read == 80

    cfg = DataConfig(source=str(path), tokenizer="nucleotide", objective="clm", max_seq_length=1002,
                     use_sequence_packing=True, max_tokens_per_batch=8192, num_workers=2)
    batch = next(iter(build_dataloader(cfg, nucleotide_tokenizer())))
    counts = count_tokens(batch)
    assert counts["num_label_tokens"] == counts["num_real_tokens"] - counts["num_sequences"]
    assert batch["max_length_q"] <= 1002
