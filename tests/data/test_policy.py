"""The input policy: each rule, its count, and the error text for rejected input."""

from __future__ import annotations

import numpy as np
import pytest

from bioscale.data import InputPolicy, PolicyStats


def test_stop_case_empty_and_counts():
    policy = InputPolicy("protein")
    assert policy("a", "mkvL*") == ["MKVL"]
    assert policy("b", "  MKV**\n") == ["MKV"]
    assert policy("c", "") == []
    assert policy("d", "*") == []
    assert policy("e", None) == []
    s = policy.stats
    assert (s.records_read, s.records_used, s.sequences) == (5, 2, 2)
    assert (s.stop_stripped, s.uppercased, s.skipped_empty) == (3, 1, 3)
    assert (s.residues_read, s.residues_used) == (7, 7)


def test_unknown_residues_map_reject_error():
    mapped = InputPolicy("protein", unknown_residues="map")
    assert mapped("r1", "MK*J1V") == ["MKXXXV"]  # internal stop and out-of-alphabet characters -> X
    assert mapped("r2", "MKé") == ["MKX"]  # non-ASCII too
    assert (mapped.stats.records_mapped, mapped.stats.residues_mapped) == (2, 4)

    dna = InputPolicy("nucleotide")
    assert dna("g", "acgtUx-") == ["ACGTNNN"]

    rejected = InputPolicy("protein", unknown_residues="reject")
    assert rejected("r1", "MKJV") == []
    assert rejected("r2", "MKV") == ["MKV"]
    assert (rejected.stats.rejected_unknown, rejected.stats.records_used) == (1, 1)

    strict = InputPolicy("protein", unknown_residues="error")
    with pytest.raises(ValueError, match=r"record 'bad_one' in x\.fasta: character 'J' at position 3 is not in the protein"):
        strict("bad_one", "MKJV", where=" in x.fasta")


def test_random_crop_is_uniform_and_seeded():
    seq = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 100))
    policy = InputPolicy("protein", max_length=30, crop="random")
    starts = []
    for i in range(400):
        (piece,) = policy(str(i), seq, np.random.default_rng(i))
        assert len(piece) == 30
        starts.append(seq.index(piece))
    assert policy.stats.cropped == 400
    assert min(starts) == 0 and max(starts) == 70  # every start 0..70 reachable, ends included
    assert 25 < np.mean(starts) < 45  # uniform: mean 35
    again = InputPolicy("protein", max_length=30)
    assert again("x", seq, np.random.default_rng(7)) == policy("x", seq, np.random.default_rng(7))
    assert again("short", "MKV", np.random.default_rng(0)) == ["MKV"]


@pytest.mark.parametrize(("length", "window", "stride"), [(10, 4, 4), (10, 4, 2), (8, 4, 4), (9, 4, 3), (4, 4, 1)])
def test_windows_cover_the_record(length, window, stride):
    seq = "ACGT" * 3
    seq = (seq * 3)[:length]
    policy = InputPolicy("nucleotide", max_length=window, crop="window", window_stride=stride)
    pieces = policy("g", seq)
    starts = list(range(0, length, stride))
    expected = []
    for start in starts:
        expected.append(seq[start : start + window])
        if start + window >= length:
            break
    assert pieces == expected
    assert all(len(p) <= window for p in pieces)
    assert "".join(p[:stride] for p in pieces[:-1]) + pieces[-1] == seq  # nothing skipped, nothing invented
    assert policy.stats.windowed == (length > window)


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="unknown alphabet kind 'rna'"):
        InputPolicy("rna")
    with pytest.raises(ValueError, match="unknown_residues must be"):
        InputPolicy("protein", unknown_residues="drop")
    with pytest.raises(ValueError, match="window_stride must be in 1..max_length=4"):
        InputPolicy("nucleotide", max_length=4, crop="window", window_stride=5)


def test_stats_add_and_from_dict():
    a = PolicyStats(records_read=2, cropped=1)
    a.add({"records_read": 3})
    a.add(PolicyStats(cropped=4))
    assert (a.records_read, a.cropped) == (5, 5)
    assert PolicyStats.from_dict(a.as_dict()) == a
    with pytest.raises(ValueError, match="unknown policy stats keys"):
        PolicyStats.from_dict({"nope": 1})
