"""Coding sequences for codon models: the 69-token tokenizer against CodonFM's reference ``CodonTokenizer`` on the genes
pyrodigal predicts, the fast encoder, every case of the counted CDS policy (and its strict mode), the loader, MLM with
codon-only replacements, and codon-weighted masking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bioscale.data import IGNORE_INDEX, MLMCollator, build_dataloader, demo_corpus, get_policy_stats, read_fasta
from bioscale.data.cds import (
    CdsPolicy,
    CodonTokenEncoder,
    CodonWeightedMLMCollator,
    check_codon_vocabulary,
    codon_weights_from_counts,
    count_codons,
    load_codon_weights,
    write_cds_fasta,
)
from bioscale.data.packing import collate_packed, pad_sequences
from bioscale.data.tokenizers import canonical_token_ids, codon_tokenizer, protein_tokenizer

REFERENCE_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
CLS, SEP, UNK, PAD, MASK = range(5)


@pytest.fixture(scope="module")
def reference_tokenizer():
    """CodonFM's ``CodonTokenizer`` class (``../shared/reference/codonfm_reference/tokenizer.py``)."""
    if not (REFERENCE_ROOT / "codonfm_reference" / "tokenizer.py").is_file():
        pytest.skip(f"CodonFM reference not found at {REFERENCE_ROOT}")
    sys.path.insert(0, str(REFERENCE_ROOT))
    try:
        from codonfm_reference.tokenizer import CodonTokenizer
    finally:
        sys.path.remove(str(REFERENCE_ROOT))
    return CodonTokenizer


@pytest.fixture(scope="module")
def demo_cds() -> list[tuple[str, str]]:
    """The genes pyrodigal predicts on its shipped genome (written once to the cache)."""
    return list(read_fasta(demo_corpus("cds")))


# ---- the tokenizer ---------------------------------------------------------------------------------------------------


def test_vocabulary_is_the_issues_table() -> None:
    vocab = codon_tokenizer().get_vocab()
    assert len(vocab) == 69
    assert [vocab[t] for t in ("<CLS>", "<SEP>", "<UNK>", "<PAD>", "<MASK>")] == [0, 1, 2, 3, 4]
    assert vocab["AAA"] == 5 and vocab["AAC"] == 6 and vocab["ACA"] == 9 and vocab["TTT"] == 68
    bases = "ACGT"
    assert all(vocab[a + b + c] == 5 + 16 * bases.index(a) + 4 * bases.index(b) + bases.index(c)
               for a in bases for b in bases for c in bases)  # fmt: skip


def test_ids_equal_the_reference_tokenizer_on_the_pyrodigal_cds(reference_tokenizer, demo_cds) -> None:
    ours, theirs = codon_tokenizer(), reference_tokenizer()
    sequences = [seq for _, seq in demo_cds]
    assert len(sequences) > 2000 and all(len(s) % 3 == 0 for s in sequences)
    encoded = ours(sequences, add_special_tokens=True, verbose=False)["input_ids"]
    assert all(ids == theirs.encode(seq) for ids, seq in zip(encoded, sequences))
    # Lower case, a trailing partial codon and ambiguous bases too; RNA as the reference's RNA tokenizer reads it.
    messy = [s[:301].lower() for s in sequences[:50]] + [s[:90].replace("G", "N", 3) for s in sequences[:50]]
    assert ours(messy)["input_ids"] == [theirs.encode(s) for s in messy]
    rna = [s[:120].replace("T", "U") for s in sequences[:50]]
    assert ours(rna)["input_ids"] == [reference_tokenizer(seq_type="rna").encode(s) for s in rna]
    assert ours.decode(encoded[0], skip_special_tokens=True) == sequences[0]


def test_the_fast_encoder_equals_the_tokenizer(demo_cds) -> None:
    tokenizer = codon_tokenizer()
    encoder = CodonTokenEncoder(tokenizer)
    samples = [seq for _, seq in demo_cds[:200]] + ["atgNNNtaa", "AUGGCCUAA", "ATGGC", "RYK", "A", ""]
    for seq in samples:
        assert encoder.encode(seq).tolist() == tokenizer(seq)["input_ids"], seq
    assert encoder.num_special == 2


def test_tokenizer_round_trips_and_vocabulary_mismatch_is_refused(tmp_path: Path) -> None:
    codon_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == codon_tokenizer().get_vocab()
    assert loaded("ATGAAA")["input_ids"] == [CLS, 19, 5, SEP]
    check_codon_vocabulary(loaded)
    with pytest.raises(ValueError, match="id 0 is '<cls>', expected '<CLS>'"):
        check_codon_vocabulary(protein_tokenizer())
    with pytest.raises(ValueError, match="codon vocabulary"):
        CodonTokenEncoder(protein_tokenizer())


# ---- the CDS policy, case by case -----------------------------------------------------------------------------------


def run(policy: CdsPolicy, seq: str, record: str = "r1") -> list[str]:
    return policy(record, seq, np.random.default_rng(0), where=" in test.fna")


def test_clean_cds_passes_unchanged_and_is_counted_in_codons() -> None:
    policy = CdsPolicy()
    assert run(policy, "ATGGCCAAATAA") == ["ATGGCCAAATAA"]
    s = policy.stats
    assert (s.records_read, s.records_used, s.sequences, s.residues_read, s.residues_used) == (1, 1, 1, 4, 4)
    assert s.cds_not_multiple_of_3 == s.cds_internal_stop == s.cds_no_start == s.codons_unknown == 0


def test_lower_case_and_rna_are_read_as_dna_upper_case() -> None:
    policy = CdsPolicy()
    assert run(policy, "augGCCaaaUAA") == ["ATGGCCAAATAA"]
    assert (policy.stats.uppercased, policy.stats.rna_converted) == (1, 1)
    assert run(policy, "ATG GCC\nTAA") == ["ATGGCCTAA"]  # whitespace is dropped, not counted


def test_length_not_a_multiple_of_3_keep_reject_error() -> None:
    keep = CdsPolicy()
    assert run(keep, "ATGGCCAAATAAGC") == ["ATGGCCAAATAA"]  # the trailing partial codon is dropped
    assert keep.stats.cds_not_multiple_of_3 == 1
    reject = CdsPolicy(cds_checks="reject")
    assert run(reject, "ATGGCCAAATAAG") == []
    assert (reject.stats.cds_rejected, reject.stats.records_used) == (1, 0)
    with pytest.raises(ValueError, match=r"record 'gene7' in test.fna: length 13 is not a multiple of 3 \(a partial "
                                         r"codon of 1 base\(s\) at position 13\)"):  # fmt: skip
        run(CdsPolicy(cds_checks="error"), "ATGGCCAAATAAG", record="gene7")


def test_internal_stop_codon_keep_reject_error() -> None:
    keep = CdsPolicy()
    assert run(keep, "ATGTGAGCCTAA") == ["ATGTGAGCCTAA"]  # kept as tokens (selenocysteine, pseudogenes)
    assert keep.stats.cds_internal_stop == 1
    run(keep, "ATGGCCTAA")  # a terminal stop is normal
    assert keep.stats.cds_internal_stop == 1
    reject = CdsPolicy(cds_checks="reject")
    assert run(reject, "ATGTAGGCCTAA") == [] and reject.stats.cds_rejected == 1
    message = r"record 'r1' in test.fna: in-frame stop codon 'TAG' at position 4 \(codon 2 of 4\) before the last codon"
    with pytest.raises(ValueError, match=message):
        run(CdsPolicy(cds_checks="error"), "ATGTAGGCCTAA")


def test_missing_start_codon_depends_on_the_translation_table() -> None:
    bacterial = CdsPolicy()  # table 11: GTG, TTG, CTG, ATT, ATC, ATA and ATG start
    assert run(bacterial, "GTGGCCTAA") == ["GTGGCCTAA"] and bacterial.stats.cds_no_start == 0
    assert run(bacterial, "AAAGCCTAA") == ["AAAGCCTAA"] and bacterial.stats.cds_no_start == 1
    standard = CdsPolicy(translation_table=1)  # ATG, TTG, CTG only
    run(standard, "GTGGCCTAA")
    assert standard.stats.cds_no_start == 1
    message = r"record 'r1' in test.fna: first codon 'AAA' at position 1 is not a start codon of translation table 11"
    with pytest.raises(ValueError, match=message):
        run(CdsPolicy(cds_checks="error"), "AAAGCCTAA")
    with pytest.raises(ValueError, match="translation_table=4 is not supported"):
        CdsPolicy(translation_table=4)


def test_ambiguous_bases_make_unk_codons_or_are_rejected_or_fail() -> None:
    mapped = CdsPolicy()
    out = run(mapped, "ATGNNKGCCRTAA"[:12])  # ATG NNK GCC RTA: 4 ambiguous bases in 2 codons
    assert out == ["ATGNNNGCCNTA"]
    s = mapped.stats
    assert (s.records_mapped, s.residues_mapped, s.codons_unknown) == (1, 4, 2)
    assert CodonTokenEncoder(codon_tokenizer()).encode(out[0]).tolist() == [CLS, 19, UNK, 42, UNK, SEP]
    reject = CdsPolicy(unknown_residues="reject")
    assert run(reject, "ATGNNNTAA") == [] and reject.stats.rejected_unknown == 1
    with pytest.raises(ValueError, match=r"record 'r1' in test.fna: base 'Y' at position 5 \(codon 2\) is not A, C, G"):
        run(CdsPolicy(unknown_residues="error"), "ATGAYGTAA")


def test_empty_records_and_crops_in_whole_codons() -> None:
    policy = CdsPolicy(max_length=4)
    assert run(policy, "") == [] and run(policy, "AC") == [] and policy.stats.skipped_empty == 2
    cds = "ATG" + "GCC" * 5 + "AAA" * 3 + "TAA"  # 10 codons
    (crop,) = run(policy, cds)
    assert len(crop) == 12 and crop in cds and cds.index(crop) % 3 == 0 and policy.stats.cropped == 1
    windows = run(CdsPolicy(max_length=4, crop="window", window_stride=3), cds)
    assert [len(w) // 3 for w in windows] == [4, 4, 4] and [cds.index(w) for w in windows] == [0, 9, 18]
    assert windows[0][:9] + windows[1][:9] + windows[2] == cds  # windows every 3 codons cover the record


def test_the_demo_corpus_is_whole_cds_from_start_to_stop(demo_cds) -> None:
    policy = CdsPolicy(cds_checks="error")  # strict: every predicted gene is a clean CDS
    for record_id, seq in demo_cds:
        assert policy(record_id, seq) == [seq]
    assert policy.stats.records_used == len(demo_cds) and all(s[-3:] in ("TAA", "TAG", "TGA") for _, s in demo_cds)


# ---- loader, MLM and codon-weighted masking -------------------------------------------------------------------------


def test_loader_reads_cds_into_codon_batches_with_counted_policy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    codons = ["".join(rng.choice(list("ACGT"), 3)) for _ in range(4000)]
    body = ["".join(codons[i * 40 : i * 40 + 30]).replace("TAA", "CAA") for i in range(60)]
    records = [(f"g{i}", f"ATG{seq}TAA") for i, seq in enumerate(body)]
    records[0] = ("lower", records[0][1].lower())
    records[1] = ("rna", records[1][1].replace("T", "U"))
    records[2] = ("partial", records[2][1] + "GC")
    records[3] = ("ambiguous", records[3][1][:30] + "NNN" + records[3][1][33:])
    path = write_cds_fasta(records, tmp_path / "cds.fna")
    tokenizer = codon_tokenizer()
    for packed in (False, True):
        cfg = dict(source=str(path), tokenizer="codon", max_seq_length=24, micro_batch_size=8,
                   use_sequence_packing=packed, max_tokens_per_batch=96, shuffle=False)  # fmt: skip
        loader = build_dataloader(cfg, tokenizer)
        batches = [batch for _, batch in zip(range(6), loader)]  # less than one epoch: each record counted once
        for batch in batches:
            ids, labels = batch["input_ids"], batch["labels"]
            assert int(ids.max()) < 69 and set(ids[ids < 5].tolist()) <= {CLS, SEP, UNK, PAD, MASK}
            assert ((labels == IGNORE_INDEX) | (labels >= 5)).all()  # only codons are ever targets
        stats = get_policy_stats(loader)
        assert stats["uppercased"] == stats["rna_converted"] == stats["cds_not_multiple_of_3"] == 1
        assert stats["codons_unknown"] == 1 and stats["cropped"] > 0
    with pytest.raises(ValueError, match="codon vocabulary"):
        build_dataloader(dict(source=str(path), tokenizer="codon"), protein_tokenizer())
    with pytest.raises(ValueError, match="codon_weights is set but data.tokenizer='protein'"):
        build_dataloader(dict(source=str(path), tokenizer="protein", codon_weights="w.json"), protein_tokenizer())


def test_mlm_selects_15_percent_of_codons_and_replaces_with_codons_only() -> None:
    tokenizer = codon_tokenizer()
    random_ids = canonical_token_ids(tokenizer)
    assert random_ids == list(range(5, 69))  # the 64 codons, never a special token
    rng = np.random.default_rng(0)
    rows = [[CLS, *rng.integers(5, 69, 498).tolist(), UNK, SEP] for _ in range(64)]
    collator = MLMCollator(tokenizer, random_token_ids=random_ids)
    batch = collator(rows, rng=np.random.default_rng(1))
    original = torch.tensor(rows)
    selected = batch["labels"] != IGNORE_INDEX
    assert not selected[:, 0].any() and not selected[:, -1].any() and not selected[:, -2].any()  # CLS, UNK, SEP
    assert abs(selected.float().mean().item() - 0.15 * 498 / 501) < 0.01
    masked = batch["input_ids"][selected]
    assert abs((masked == MASK).float().mean().item() - 0.8) < 0.03
    replaced = selected & (batch["input_ids"] != MASK) & (batch["input_ids"] != original)
    assert replaced.any() and ((batch["input_ids"][replaced] >= 5) & (batch["input_ids"][replaced] < 69)).all()


def test_codon_weights_follow_the_reference_formula(tmp_path: Path) -> None:
    counts = {"AAA": 10, "AAC": 30, "GCC": 60}
    weights = codon_weights_from_counts(counts)
    # CodonFM's get_group_codon_weights: mean(count) / count over the codons with a count, here mean = 100 / 3.
    mean = 100 / 3
    assert weights[5] == pytest.approx(mean / 10) and weights[6] == pytest.approx(mean / 30)
    assert weights[codon_tokenizer().get_vocab()["GCC"]] == pytest.approx(mean / 60)
    assert np.count_nonzero(weights) == 3 and (weights[:5] == 0).all()
    by_id = np.zeros(69)
    by_id[[5, 6, 42]] = [10, 30, 60]
    np.testing.assert_allclose(codon_weights_from_counts(by_id.tolist()), weights)
    (tmp_path / "w.json").write_text(json.dumps(counts))
    np.testing.assert_allclose(load_codon_weights(tmp_path / "w.json"), weights)
    with pytest.raises(ValueError, match="'XYZ' is not one of the 64 codons"):
        codon_weights_from_counts({"XYZ": 1})
    with pytest.raises(ValueError, match="69 entries"):
        codon_weights_from_counts([1.0, 2.0])
    assert count_codons(["ATGATGNNNTA"]) ["ATG"] == 2


def test_codon_weighted_masking_probabilities_per_sequence_padded_and_packed() -> None:
    tokenizer = codon_tokenizer()
    rng = np.random.default_rng(0)
    codons = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])][5:]
    counts = dict(zip(codons, rng.integers(100, 1000, 64).tolist()))
    weights = codon_weights_from_counts(counts)
    collator = CodonWeightedMLMCollator(tokenizer, codon_weights=weights)
    rows = [[CLS, *rng.integers(5, 69, n).tolist(), SEP] for n in (40, 17, 63)]
    padded = pad_sequences(rows, pad_token_id=PAD)
    ids = padded["input_ids"].numpy()
    prob = collator.selection_probability(ids, np.broadcast_to(np.arange(3)[:, None], ids.shape))
    for row, tokens in enumerate(rows):  # the formula, written out per sequence
        codons = np.asarray(tokens[1:-1])
        expected = np.clip(0.15 * weights[codons] / weights[codons].mean(), 0.05, 0.4)
        np.testing.assert_allclose(prob[row, 1 : len(tokens) - 1], expected)
        assert prob[row, 0] == prob[row, len(tokens) - 1] == 0 and (prob[row, len(tokens) :] == 0).all()
    packed = collate_packed(rows)
    cu = packed["cu_seq_lens_q"].numpy()
    flat = packed["input_ids"].numpy()
    seq_index = np.searchsorted(cu[1:], np.arange(flat.shape[1]), side="right")[None]
    real = padded["attention_mask"].bool().numpy()
    np.testing.assert_allclose(collator.selection_probability(flat, seq_index)[0], prob[real])
    # Rare codons are selected more often than common ones, and the mean rate stays near 15 %.
    many = [[CLS, *rng.integers(5, 69, 500).tolist(), SEP] for _ in range(200)]
    batch = collator(many, rng=np.random.default_rng(2))
    selected = (batch["labels"] != IGNORE_INDEX).numpy()
    original = np.asarray(many)
    rare, common = weights[original] > 2.0, (weights[original] > 0) & (weights[original] < 0.6)
    assert selected[rare].mean() > 2 * selected[common].mean()
    assert 0.1 < selected[:, 1:-1].mean() < 0.2  # near the nominal 15 % (the clipping moves it a little)
