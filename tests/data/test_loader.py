"""The resumable loader: batch format, sharding over ranks and workers, exact resume (0 and 2 workers), layout
checks, input-policy counts, and config validation."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch

from bioscale.data import (
    DataConfig,
    build_dataloader,
    count_tokens,
    get_policy_stats,
    nucleotide_tokenizer,
    protein_tokenizer,
)
from bioscale.data.tokenizers import PROTEIN_VOCAB

from .helpers import random_proteins, write_fasta

PADDED_KEYS = {"input_ids", "attention_mask", "labels"}
PACKED_KEYS = {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "labels"}


def decode(ids: torch.Tensor | np.ndarray) -> str:
    return "".join(PROTEIN_VOCAB[i] for i in np.asarray(ids).tolist() if len(PROTEIN_VOCAB[i]) == 1)


def sequences_of(batch) -> list[str]:
    """The residue strings of a CLM batch (inputs are unmasked)."""
    if "attention_mask" in batch:
        return [decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    ids, cu = batch["input_ids"][0], batch["cu_seq_lens_q"].tolist()
    return [s for s in (decode(ids[a:b]) for a, b in itertools.pairwise(cu)) if s]


def epoch_sequences(loader, consumer: int, num_consumers: int, epoch: int = 0) -> list[str]:
    """Every sequence one consumer (rank x worker) gets in ``epoch``, straight from the dataset's generator."""
    ds = loader.dataset
    policy = ds._make_policy()
    groups = ds._epoch_groups(epoch, consumer, num_consumers, policy)
    return [decode(ids) for group in groups for ids in group]


def test_batch_format_padded_and_packed(protein_fasta):
    path, _ = protein_fasta
    tok = protein_tokenizer()
    padded = next(iter(build_dataloader(DataConfig(source=str(path), micro_batch_size=4, pad_to_multiple_of=8), tok)))
    assert set(padded) == PADDED_KEYS
    B, S = padded["input_ids"].shape
    assert B == 4 and S % 8 == 0
    assert padded["attention_mask"].shape == padded["labels"].shape == (B, S)
    cfg = DataConfig(source=str(path), use_sequence_packing=True, max_tokens_per_batch=256, pad_to_multiple_of=16,
                     max_seq_length=128)
    packed = next(iter(build_dataloader(cfg, tok)))
    assert set(packed) == PACKED_KEYS
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] <= 256
    assert packed["cu_seq_lens_q"].dtype == torch.int32 and isinstance(packed["max_length_q"], int)
    assert 0 < count_tokens(packed)["num_label_tokens"] < count_tokens(packed)["num_real_tokens"]


def test_padded_batch_runs_through_a_transformers_model(protein_fasta):
    """The reference consumer: transformers' own ESM accepts ``model(**batch)`` and returns a finite loss."""
    from transformers import EsmConfig, EsmForMaskedLM

    path, _ = protein_fasta
    tok = protein_tokenizer()
    model = EsmForMaskedLM(EsmConfig(vocab_size=33, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, pad_token_id=1, mask_token_id=32,
                                     position_embedding_type="rotary", max_position_embeddings=1026))
    batch = next(iter(build_dataloader(DataConfig(source=str(path), micro_batch_size=4), tok)))
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (2, 2), (3, 1), (5, 3)])
def test_units_dealt_out_without_overlap(protein_shards, world_size, num_workers):
    """12 row-group units: whole units per consumer when there are enough, else shared reading with striding."""
    root, seqs = protein_shards
    cfg = DataConfig(source=str(root), objective="clm", shuffle_buffer_size=7)
    loader = build_dataloader(cfg, protein_tokenizer())
    N = world_size * num_workers
    for epoch in (0, 1):
        per_consumer = [epoch_sequences(loader, c, N, epoch) for c in range(N)]
        seen = Counter(itertools.chain.from_iterable(per_consumer))
        assert sorted(seen) == sorted(seqs) and set(seen.values()) == {1}, "each record exactly once per epoch"
        assert all(per_consumer), "every consumer gets data"


def test_one_genome_windows_spread_over_consumers(tmp_path):
    genome = "".join(np.random.default_rng(0).choice(list("ACGT"), 5000))
    path = write_fasta(tmp_path / "genome.fna", [("chr", genome)])
    cfg = DataConfig(source=str(path), tokenizer="nucleotide", objective="clm", max_seq_length=102)
    loader = build_dataloader(cfg, nucleotide_tokenizer())
    dna_vocab = nucleotide_tokenizer().convert_ids_to_tokens(list(range(20)))
    ds = loader.dataset
    windows: list[str] = []
    for c in range(4):
        got = ["".join(dna_vocab[i] for i in g.tolist()[1:-1]) for grp in ds._epoch_groups(0, c, 4, ds._make_policy())
               for g in grp]
        assert len(got) in (12, 13)  # 50 windows of 100 bp over 4 consumers
        windows += got
    assert sorted(windows) == sorted(genome[i : i + 100] for i in range(0, 5000, 100))


def _contigs_of_window_plus_tail(tmp_path, num_records: int, max_seq_length: int):
    """Records of exactly ``max_seq_length`` bases: each windows into one full window (``max_seq_length - 2``
    bases) plus a 2-base tail, the pattern of the OpenGenome2 sample's 8,192-bp contigs under 8,192-token windows."""
    rng = np.random.default_rng(5)
    contigs = ["".join(rng.choice(list("ACGT"), max_seq_length)) for _ in range(num_records)]
    path = write_fasta(tmp_path / "contigs.fna", [(f"contig{i}", s) for i, s in enumerate(contigs)])
    window = max_seq_length - 2
    windows = [piece for s in contigs for piece in (s[:window], s[window:])]
    cfg = DataConfig(source=str(path), tokenizer="nucleotide", objective="clm", max_seq_length=max_seq_length,
                     crop="window", use_sequence_packing=True, max_tokens_per_batch=2 * max_seq_length)
    return cfg, windows


@pytest.mark.parametrize("num_consumers", [2, 3, 4, 8])
def test_windows_with_tails_are_balanced_over_consumers(tmp_path, num_consumers):
    """Round robin over windows gave every even consumer the full windows and every odd one only the 2-base tails;
    now each consumer's real tokens are within one window of every other's, and each window is dealt exactly once."""
    cfg, windows = _contigs_of_window_plus_tail(tmp_path, num_records=24, max_seq_length=258)
    tok = nucleotide_tokenizer()
    ds = build_dataloader(cfg, tok).dataset
    dna_vocab = tok.convert_ids_to_tokens(list(range(20)))
    for epoch in (0, 1):
        got, num_real = [], []
        for c in range(num_consumers):
            seqs = [ids for group in ds._epoch_groups(epoch, c, num_consumers, ds._make_policy()) for ids in group]
            num_real.append(sum(len(ids) for ids in seqs))
            got += ["".join(dna_vocab[i] for i in ids.tolist()[1:-1]) for ids in seqs]
        assert Counter(got) == Counter(windows), "every window exactly once per epoch over all consumers"
        assert max(num_real) - min(num_real) <= cfg.max_seq_length, num_real
        assert min(num_real) >= max(num_real) / 2, num_real


def test_workers_micro_batches_alternate_without_starving_one(tmp_path):
    """The measured symptom (L1_llama3_1B, crop=window, 2 workers): the loader alternates workers' batches, and
    every other micro-batch held only tails (~2% of the budget). Both workers' batches must now be comparably full."""
    cfg, _ = _contigs_of_window_plus_tail(tmp_path, num_records=24, max_seq_length=258)
    cfg.num_workers = 2
    batches = _take(iter(build_dataloader(cfg, nucleotide_tokenizer())), 8)
    per_worker = [sum(count_tokens(b)["num_real_tokens"] for b in batches[w::2]) for w in (0, 1)]
    assert min(per_worker) >= max(per_worker) / 2, per_worker


def test_buffered_packing_fills_windows_with_tails(tmp_path):
    """The OpenGenome2 pattern (a full window + a 2-base tail per contig, two windows per budget): greedy in-order
    packing leaves ~2/3 fill, since a tail between two windows stops them sharing a micro-batch; a lookahead buffer
    pairs the windows and gathers the tails. Every window still exactly once, and the budget holds."""
    cfg, windows = _contigs_of_window_plus_tail(tmp_path, num_records=200, max_seq_length=258)
    tok = nucleotide_tokenizer()
    dna_vocab = tok.convert_ids_to_tokens(list(range(20)))
    fills = {}
    for buffer_size in (0, 64):
        cfg.packing_buffer_size = buffer_size
        ds = build_dataloader(cfg, tok).dataset
        groups = list(ds._epoch_groups(0, 0, 1, ds._make_policy()))
        assert all(sum(map(len, g)) <= cfg.max_tokens_per_batch for g in groups)
        got = ["".join(dna_vocab[i] for i in ids.tolist()[1:-1]) for g in groups for ids in g]
        assert Counter(got) == Counter(windows)
        fills[buffer_size] = sum(map(len, itertools.chain(*groups))) / (len(groups) * cfg.max_tokens_per_batch)
    assert fills[0] < 0.8 and fills[64] >= 0.95, fills


def test_buffered_packing_is_deterministic_and_leaves_padded_batches_alone(protein_fasta):
    path, _ = protein_fasta
    tok = protein_tokenizer()
    cfg = DataConfig(source=str(path), use_sequence_packing=True, max_seq_length=64, max_tokens_per_batch=128,
                     packing_buffer_size=8,
                     seed=3)
    first, second = (_take(iter(build_dataloader(cfg, tok)), 12) for _ in range(2))
    _assert_same_batches(first, second)
    greedy = _take(iter(build_dataloader(DataConfig(**{**cfg.to_dict(), "packing_buffer_size": 0}), tok)), 12)
    assert any(sequences_of(a) != sequences_of(b) for a, b in zip(first, greedy))
    padded = {k: DataConfig(source=str(path), micro_batch_size=5, packing_buffer_size=k, seed=3) for k in (0, 8)}
    _assert_same_batches(*(_take(iter(build_dataloader(c, tok)), 10) for c in padded.values()))


def test_resume_of_a_state_saved_before_packing_buffer_size(protein_fasta):
    """States saved before the key existed ran greedy packing: they resume with packing_buffer_size=0 only."""
    path, _ = protein_fasta
    tok = protein_tokenizer()
    cfg = DataConfig(source=str(path), use_sequence_packing=True, max_seq_length=128, max_tokens_per_batch=256)
    loader = build_dataloader(cfg, tok)
    _take(iter(loader), 2)
    state = loader.state_dict()
    del state["bioscale"]["config"]["packing_buffer_size"]
    build_dataloader(cfg, tok).load_state_dict(state)
    with pytest.raises(ValueError, match=r"packing_buffer_size: 0 -> 16"):
        build_dataloader(DataConfig(**{**cfg.to_dict(), "packing_buffer_size": 16}), tok).load_state_dict(state)


def test_epochs_reshuffle_and_loop_forever(protein_fasta):
    path, seqs = protein_fasta
    cfg = DataConfig(source=str(path), objective="clm", micro_batch_size=5)
    it = iter(build_dataloader(cfg, protein_tokenizer()))
    epoch0 = [s for _ in range(8) for s in sequences_of(next(it))]
    epoch1 = [s for _ in range(8) for s in sequences_of(next(it))]
    epoch2 = [s for _ in range(8) for s in sequences_of(next(it))]
    assert sorted(epoch0) == sorted(epoch1) == sorted(epoch2) == sorted(seqs)
    assert epoch0 != epoch1 != epoch2


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(("packing", "packing_buffer_size"), [(False, 0), (True, 0), (True, 8)])
def test_resume_gives_the_uninterrupted_batches(protein_fasta, num_workers, packing, packing_buffer_size):
    path, _ = protein_fasta
    cfg = DataConfig(source=str(path), num_workers=num_workers, use_sequence_packing=packing, micro_batch_size=3,
                     max_seq_length=128, max_tokens_per_batch=256, pad_to_multiple_of=16, shuffle_buffer_size=16, seed=7,
                     packing_buffer_size=packing_buffer_size)
    tok = protein_tokenizer()
    reference = build_dataloader(cfg, tok, rank=1, world_size=2)
    it = iter(reference)
    _take(it, 11)
    state = reference.state_dict()
    expected = _take(it, 14)  # crosses at least one epoch boundary of every worker
    stats_expected = get_policy_stats(reference)

    resumed = build_dataloader(cfg, tok, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = _take(iter(resumed), 14)
    _assert_same_batches(got, expected)
    assert get_policy_stats(resumed) == stats_expected


def test_resume_refuses_a_different_layout_or_config(protein_fasta):
    path, _ = protein_fasta
    tok = protein_tokenizer()
    cfg = DataConfig(source=str(path), micro_batch_size=4)
    loader = build_dataloader(cfg, tok, rank=0, world_size=2)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"saved with rank=0, world_size=2, num_workers=0, this run has rank=0, "
                                         r"world_size=4, num_workers=0"):
        build_dataloader(cfg, tok, rank=0, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"this run has rank=0, world_size=2, num_workers=2"):
        build_dataloader(DataConfig(source=str(path), micro_batch_size=4, num_workers=2), tok,
                         world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"this run has rank=1, world_size=2"):
        build_dataloader(cfg, tok, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data config changed since the checkpoint \(micro_batch_size: 4 -> 8\)"):
        build_dataloader(DataConfig(source=str(path), micro_batch_size=8), tok, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a bioscale data-loader state"):
        loader.load_state_dict({"_snapshot": {}})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_policy_stats_survive_workers(tmp_path, num_workers):
    records = [(f"p{i}", s.lower() + "*") for i, s in enumerate(random_proteins(30, seed=4))]
    records += [("empty1", ""), ("empty2", ""), ("odd", "MKJJV"), ("long", "M" * 300)]
    path = write_fasta(tmp_path / "mixed.faa", records)
    cfg = DataConfig(source=str(path), num_workers=num_workers, max_seq_length=102, shuffle_buffer_size=1000)
    loader = build_dataloader(cfg, protein_tokenizer())
    it = iter(loader)
    _take(it, max(1, num_workers))  # one batch per worker: the whole-epoch shuffle block has been read
    stats = get_policy_stats(loader)
    assert stats["records_read"] == 34  # counted once although both workers read the shared file
    assert (stats["skipped_empty"], stats["stop_stripped"], stats["uppercased"]) == (2, 30, 30)
    assert (stats["records_mapped"], stats["residues_mapped"], stats["cropped"]) == (1, 2, 1)
    assert stats["sequences"] == 32


def test_too_few_records_for_the_consumers(tmp_path):
    """One record for two ranks: one rank trains on it, the other fails naming itself and the source."""
    path = write_fasta(tmp_path / "one.faa", [("only", "MKVLLA")])
    failed = []
    for rank in (0, 1):
        loader = build_dataloader(DataConfig(source=str(path)), protein_tokenizer(), rank=rank, world_size=2)
        try:
            next(iter(loader))
        except ValueError as error:
            assert re.search(rf"rank {rank} worker 0 received no training sequences in epoch 0 .*one\.faa", str(error))
            failed.append(rank)
    assert len(failed) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "span"}, r"data\.objective='span': expected one of 'mlm', 'clm'"),
        ({"tokenizer": "rna"}, r"data\.tokenizer='rna'"),
        ({"max_seq_length": 2}, r"data\.max_seq_length=2: expected an integer >= 3"),
        ({"micro_batch_size": 0}, r"data\.micro_batch_size=0"),
        ({"mlm_probability": 0.0}, r"data\.mlm_probability=0\.0"),
        ({"window_stride": 2000}, r"data\.window_stride=2000: must not exceed the window length"),
        ({"use_sequence_packing": True, "max_tokens_per_batch": 512}, r"data\.max_tokens_per_batch=512 is smaller"),
        ({"packing_buffer_size": -1}, r"data\.packing_buffer_size=-1"),
        ({"use_sequence_packing": True, "max_tokens_per_batch": 4100, "pad_to_multiple_of": 16},
         r"data\.max_tokens_per_batch=4100 must be a multiple of data\.pad_to_multiple_of=16"),
        ({"unknown_residues": "drop"}, r"data\.unknown_residues='drop'"),
    ],
)
def test_config_validation_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**overrides)


def test_config_from_mapping_rejects_unknown_keys():
    assert DataConfig.from_dict({"seed": 3}).seed == 3
    with pytest.raises(ValueError, match=r"unknown data config keys \['batch_size'\]"):
        DataConfig.from_dict({"batch_size": 3})
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        build_dataloader(DataConfig(), protein_tokenizer(), rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"data\.tokenizer='nucleotide' but the tokenizer given has no <bos>"):
        build_dataloader(DataConfig(tokenizer="nucleotide"), protein_tokenizer())


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_dealt_out_without_overlap(protein_shards, streaming):
    pytest.importorskip("datasets")
    root, seqs = protein_shards
    cfg = DataConfig(source=f"hf:{root}", hf_streaming=streaming, objective="clm")
    loader = build_dataloader(cfg, protein_tokenizer())
    per_consumer = [epoch_sequences(loader, c, 3) for c in range(3)]
    assert all(per_consumer)
    assert sorted(itertools.chain.from_iterable(per_consumer)) == sorted(seqs)
