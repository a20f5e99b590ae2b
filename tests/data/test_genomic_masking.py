"""Genomic options of the data pipeline on hand-made sequences: soft-masked (lower-case) bases kept in the inputs as
their own byte-level ids (``data.keep_case``), causal-LM targets upper-cased (``data.uppercase_labels``) and ``N`` /
IUPAC-code targets ignored (``data.ignore_ambiguous_labels``), each counted in the input-policy counts that
``summary.json`` reports as ``data_policy``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bioscale.data import DataConfig, InputPolicy, build_dataloader, get_policy_stats
from bioscale.data.collators import CLMCollator, ambiguous_base_ids, case_label_map
from bioscale.data.packing import collate_packed, pad_sequences
from bioscale.data.tokenizers import CharTokenEncoder, nucleotide_ascii_tokenizer, nucleotide_tokenizer

IGNORE = -100


def test_policy_keeps_soft_masked_bases_with_keep_case() -> None:
    policy = InputPolicy("nucleotide_ascii", keep_case=True)
    assert policy("r", "  ACgtXynN\n") == ["ACgtNynN"]  # x is not a base (mapped to N); y, n are IUPAC / N codes
    stats = policy.stats
    assert (stats.lowercase_kept, stats.uppercased, stats.residues_mapped) == (1, 0, 1)
    default = InputPolicy("nucleotide_ascii")  # keep_case off: as every other tokenizer, upper-cased
    assert default("r", "ACgt") == ["ACGT"] and default.stats.uppercased == 1
    with pytest.raises(ValueError, match="keep_case needs a tokenizer with lower-case tokens of their own"):
        InputPolicy("nucleotide", keep_case=True)


def test_case_and_ambiguity_tables() -> None:
    ascii_tok, compact = nucleotide_ascii_tokenizer(), nucleotide_tokenizer()
    upper = case_label_map(ascii_tok)
    assert upper[97] == 65 and upper[116] == 84 and upper[110] == 78 and 65 not in upper
    assert case_label_map(compact) == {}  # the compact vocabulary has no lower-case tokens
    assert ambiguous_base_ids(compact) == list(range(9, 20))  # N R Y S W K M B D H V
    ascii_ambiguous = ambiguous_base_ids(ascii_tok)
    assert {ord(c) for c in "NRYSWKMBDHVnryswkmbdhv"} == set(ascii_ambiguous)
    assert not {ord(c) for c in "ACGTacgt"} & set(ascii_ambiguous)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_clm_labels_uppercased_and_ambiguous_ignored(layout: str) -> None:
    tok = nucleotide_ascii_tokenizer()
    encoder = CharTokenEncoder(tok)
    records = [encoder.encode("ACgtNr"), encoder.encode("ttAY")]  # <BOS> ... <EOS> (2 ... 0)
    batch = pad_sequences(records, pad_token_id=1) if layout == "padded" else collate_packed(records)
    inputs_before = batch["input_ids"].clone()
    collator = CLMCollator(tok, uppercase_labels=True, ignore_ambiguous_labels=True)
    labels = collator.apply(batch)["labels"]
    assert torch.equal(batch["input_ids"], inputs_before)  # inputs keep their case and their N / R / Y
    flat = labels[labels != IGNORE].tolist() if layout == "packed" else None
    expected = [[IGNORE, 65, 67, 71, 84, IGNORE, IGNORE, 0], [IGNORE, 84, 84, 65, IGNORE, 0, IGNORE, IGNORE]]
    if layout == "padded":
        assert labels.tolist() == expected
    else:
        assert flat == [t for row in expected for t in row if t != IGNORE]
    # g, t, t, t upper-cased (r is ambiguous: ignored, not counted as upper-cased); N, r, Y ignored.
    assert collator.last_label_counts == {"labels_uppercased": 4, "labels_ambiguous_ignored": 3}
    plain = CLMCollator(tok).apply(pad_sequences(records, pad_token_id=1))
    assert plain["labels"][0].tolist() == [IGNORE, 65, 67, 103, 116, 78, 114, 0]  # the default is unchanged


def test_compact_tokenizer_ignores_ambiguous_targets() -> None:
    tok = nucleotide_tokenizer()
    records = [CharTokenEncoder(tok).encode("ACNRT")]
    labels = CLMCollator(tok, ignore_ambiguous_labels=True)(records)["labels"]
    assert labels.tolist() == [[IGNORE, 5, 6, IGNORE, IGNORE, 8, 2]]


def test_loader_end_to_end_counts(tmp_path: Path) -> None:
    fasta = tmp_path / "soft_masked.fasta"
    fasta.write_text(">chr1 soft-masked repeat and a gap\nACGTacgtNNNNACGT\n>chr2\nggccRYAT\n")
    cfg = DataConfig(source=str(fasta), tokenizer="nucleotide_ascii", objective="clm", max_seq_length=64,
                     micro_batch_size=2, shuffle=False, keep_case=True, uppercase_labels=True,
                     ignore_ambiguous_labels=True)  # fmt: skip
    loader = build_dataloader(cfg, nucleotide_ascii_tokenizer())
    batch = next(iter(loader))
    assert batch["input_ids"][0, :9].tolist() == [2, 65, 67, 71, 84, 97, 99, 103, 116]
    assert batch["labels"][0, 5:13].tolist() == [65, 67, 71, 84, IGNORE, IGNORE, IGNORE, IGNORE]
    stats = get_policy_stats(loader)
    assert stats["lowercase_kept"] == 2 and stats["uppercased"] == 0
    assert stats["labels_uppercased"] == 8 and stats["labels_ambiguous_ignored"] == 6


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="data.keep_case=true but data.tokenizer='nucleotide' upper-cases"):
        DataConfig(tokenizer="nucleotide", objective="clm", keep_case=True)
    with pytest.raises(ValueError, match="data.uppercase_labels=true applies to causal-LM labels"):
        DataConfig(tokenizer="nucleotide", objective="mlm", uppercase_labels=True)
    DataConfig(tokenizer="nucleotide", objective="clm", ignore_ambiguous_labels=True)  # fine without keep_case
