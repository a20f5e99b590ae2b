"""Packing (THD) and padding (BSHD): every token exactly once, consistent metadata, the budget, isolated padding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bioscale.constants import PAD_TOKEN_ID
from bioscale.data import IGNORE_INDEX, buffered_pack, count_tokens, pack_sequences, pad_sequences


def random_token_lists(n: int, seed: int, high: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # values 4..32 with a unique "serial" per sequence so each token can be traced back to its sequence and offset
    return [rng.integers(4, 33, size=int(rng.integers(1, high))) for _ in range(n)]


def unpack(batch) -> list[np.ndarray]:
    ids = batch["input_ids"][0].numpy()
    cu = batch["cu_seq_lens_q"].numpy()
    return [ids[a:b] for a, b in itertools.pairwise(cu)]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("multiple", [None, 16])
@pytest.mark.parametrize("max_tokens", [320, 1024])
def test_every_token_once_and_budget(split, multiple, max_tokens):
    seqs = random_token_lists(200, seed=max_tokens + bool(split))
    batches = list(pack_sequences(seqs, max_tokens=max_tokens, pad_to_multiple_of=multiple, split_overflow=split))
    pieces: list[np.ndarray] = []
    for b in batches:
        T = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["position_ids"].shape == b["labels"].shape == (1, T)
        assert b["input_ids"].dtype == b["position_ids"].dtype == b["labels"].dtype == torch.int64
        cu = b["cu_seq_lens_q"]
        assert cu.dtype == torch.int32 and torch.equal(cu, b["cu_seq_lens_k"])
        assert cu[0] == 0 and cu[-1] == T and bool((cu[1:] > cu[:-1]).all())
        lengths = (cu[1:] - cu[:-1]).tolist()
        assert b["max_length_q"] == b["max_length_k"] == max(lengths)
        assert T <= max_tokens, "budget exceeded"
        if multiple:
            assert T % multiple == 0
        # positions restart at 0 in every segment
        expected_pos = np.concatenate([np.arange(n) for n in lengths])
        assert np.array_equal(b["position_ids"][0].numpy(), expected_pos)
        segs = unpack(b)
        num_real = sum(len(s) for s in segs)
        counts = count_tokens(b)
        if counts["num_real_tokens"] < T:  # padding: exactly one final segment of <pad>, label -100, own segment
            pad = segs.pop()
            assert (pad == 1).all() and len(pad) < (multiple or 1)
            assert (b["labels"][0, -len(pad):] == IGNORE_INDEX).all()
            num_real -= len(pad)
        assert counts == {"num_tokens": T, "num_real_tokens": num_real, "num_label_tokens": num_real,
                          "num_sequences": len(segs)}
        pieces += segs
    if split:  # every batch but the last is full (apart from padding to the multiple)
        assert all(count_tokens(b)["num_real_tokens"] == max_tokens for b in batches[:-1])
        rebuilt = np.concatenate(pieces)
        assert np.array_equal(rebuilt, np.concatenate(seqs))
    else:
        assert len(pieces) == len(seqs)
        for got, want in zip(pieces, seqs):
            assert np.array_equal(got, want)


def test_greedy_is_in_order_and_closes_on_overflow():
    seqs = [np.full(n, 5) for n in (3, 4, 2, 6, 1)]
    sizes = [[len(s) for s in unpack(b)] for b in pack_sequences(seqs, max_tokens=8)]
    assert sizes == [[3, 4], [2, 6], [1]]
    sizes = [[len(s) for s in unpack(b)] for b in pack_sequences(seqs, max_tokens=8, split_overflow=True)]
    assert sizes == [[3, 4, 1], [1, 6, 1]]  # 16 tokens: exactly two full micro-batches


def test_pack_errors():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than max_tokens=8"):
        list(pack_sequences([[5, 5], [5] * 9], max_tokens=8))
    with pytest.raises(ValueError, match="max_tokens=100 must be a multiple of pad_to_multiple_of=16"):
        list(pack_sequences([[5]], max_tokens=100, pad_to_multiple_of=16))


def test_pack_accepts_lists_arrays_tensors_and_generators():
    seqs = [[0, 5, 6, 2], [0, 7, 2], [0, 8, 9, 10, 11, 2], [0, 4, 2]]

    def packed(inputs):
        return [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in pack_sequences(inputs, max_tokens=8)]

    expected = packed(seqs)
    assert [b["input_ids"] for b in expected] == [[[0, 5, 6, 2, 0, 7, 2]], [[0, 8, 9, 10, 11, 2]], [[0, 4, 2]]]
    assert [b["cu_seq_lens_q"] for b in expected] == [[0, 4, 7], [0, 6], [0, 3]]
    for dtype in (np.uint8, np.int32, np.int64):
        assert packed([np.asarray(s, dtype=dtype) for s in seqs]) == expected
    assert packed([torch.tensor(s, dtype=torch.int32) for s in seqs]) == expected
    assert packed(iter(seqs)) == expected


@pytest.mark.parametrize(
    ("seqs", "max_tokens", "message"),
    [
        ([[5, 5], [[5, 5]]], 8, r"sequence 1 must be a 1-D list of token ids, got shape \(1, 2\)"),
        ([[5], None], 8, r"sequence 1 must be a 1-D list of token ids"),
        ([[5.5, 6.0]], 8, r"sequence 0 must hold integer token ids, got dtype float64"),
        (["MKV"], 8, r"sequence 0 must be a 1-D list of token ids"),
        ([[5, -1]], 8, r"sequence 0 has a negative token id -1"),
        ([[5]], 8.5, r"max_tokens must be an integer, got 8.5"),
        ([[5]], 0, r"max_tokens must be >= 1, got 0"),
    ],
)
def test_pack_rejects_bad_input(seqs, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        list(pack_sequences(seqs, max_tokens=max_tokens))


def test_pad_sequences_and_counts():
    seqs = [[0, 5, 6, 2], [0, 7, 2], [0, 2]]
    b = pad_sequences(seqs, pad_token_id=1, pad_to_multiple_of=8)
    assert b["input_ids"].tolist() == [[0, 5, 6, 2, 1, 1, 1, 1], [0, 7, 2, 1, 1, 1, 1, 1], [0, 2, 1, 1, 1, 1, 1, 1]]
    assert b["attention_mask"].sum(1).tolist() == [4, 3, 2]
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert count_tokens(b) == {"num_tokens": 24, "num_real_tokens": 9, "num_label_tokens": 9, "num_sequences": 3}


@pytest.mark.parametrize("buffer_size", [2, 8, 64])
@pytest.mark.parametrize("multiple", [None, 16])
@pytest.mark.parametrize("max_tokens", [320, 1024])
def test_buffered_packing_every_token_once_and_budget(buffer_size, multiple, max_tokens):
    seqs = random_token_lists(300, seed=buffer_size + max_tokens)
    batches = list(pack_sequences(seqs, max_tokens, pad_to_multiple_of=multiple, buffer_size=buffer_size))
    got = [seg for b in batches for seg in unpack(b) if not (multiple and (seg == 1).all())]
    assert sorted(map(tuple, got)) == sorted(map(tuple, seqs))  # each sequence exactly once, whole
    assert all(b["input_ids"].shape[1] <= max_tokens for b in batches)
    greedy = list(pack_sequences(seqs, max_tokens, pad_to_multiple_of=multiple))
    assert len(batches) <= len(greedy)
    again = list(pack_sequences(seqs, max_tokens, pad_to_multiple_of=multiple, buffer_size=buffer_size))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_buffered_packing_pairs_windows_across_tails():
    window, tail = np.full(510, 5), np.full(4, 6)
    stream = [window, tail] * 40
    groups = list(buffered_pack(stream, 1020, buffer_size=16))
    # 40 windows in 20 full groups; the tails gather in the buffer and leave together at the end of the stream
    assert [sum(map(len, g)) for g in groups] == [1020] * 20 + [160]
    assert [len(g) for g in buffered_pack(stream, 1020, buffer_size=1)] == [len(g) for g in
                                                                          pack_sequences_groups(stream, 1020)]
    with pytest.raises(ValueError, match="sequence 1 has 1021 tokens"):
        list(buffered_pack([window, np.ones(1021)], 1020, buffer_size=4))


def pack_sequences_groups(stream, max_tokens):
    return [unpack(b) for b in pack_sequences(stream, max_tokens)]


def test_empty_segments_give_a_fixed_cu_seqlens_length_and_change_no_output():
    """``segments_multiple_of`` pads ``cu_seq_lens`` with empty segments (for CUDA graphs); the model's outputs and
    loss on the padded batch equal those on the plain one."""
    from bioscale.data import collate_packed
    from bioscale.models import build_config, build_model

    pieces = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    plain = collate_packed(pieces, pad_to_multiple_of=16)
    padded = collate_packed(pieces, pad_to_multiple_of=16, segments_multiple_of=8)
    assert plain["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 16]
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 16, 16, 16, 16]
    assert torch.equal(padded["cu_seq_lens_k"], padded["cu_seq_lens_q"])
    for key in ("input_ids", "position_ids", "labels"):
        assert torch.equal(plain[key], padded[key]), key
    assert collate_packed(pieces, segments_multiple_of=4)["cu_seq_lens_q"].tolist() == [0, 5, 8, 15]
    with pytest.raises(ValueError, match="segments_multiple_of must be >= 1"):
        collate_packed(pieces, segments_multiple_of=0)

    torch.manual_seed(0)
    model = build_model(build_config("esm2", "debug"), device="cpu").eval()
    with torch.no_grad():
        reference, out = model(**plain), model(**padded)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)


def test_uniform_pack_becomes_rows_without_a_mask_and_other_packs_stay():
    from bioscale.data import collate_packed, uniform_pack_as_padded

    pieces = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    packed = collate_packed(pieces, pad_to_multiple_of=4)
    packed["labels"][0, 1] = IGNORE_INDEX  # an objective's labels travel with their tokens
    rows = uniform_pack_as_padded(packed)
    assert set(rows) == {"input_ids", "position_ids", "labels"}  # no mask, no varlen metadata
    assert rows["input_ids"].tolist() == pieces
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert rows["labels"][0].tolist() == [5, IGNORE_INDEX, 7, 8]
    assert count_tokens(rows) == {**count_tokens(packed)}

    # a padding segment as long as the sequences is a row of <pad> without targets (its own sequence either way)
    with_pad_row = uniform_pack_as_padded(collate_packed(pieces, pad_to_multiple_of=16))
    assert with_pad_row["input_ids"][3].eq(PAD_TOKEN_ID).all() and with_pad_row["labels"][3].eq(IGNORE_INDEX).all()
    assert count_tokens(with_pad_row)["num_sequences"] == 3
    # trailing empty segments (segments_multiple_of) do not count as sequences
    assert uniform_pack_as_padded(collate_packed(pieces, segments_multiple_of=8))["input_ids"].shape == (3, 4)
    # unequal lengths, a padding segment of another length, one sequence, a padded batch: unchanged
    for batch in (
        collate_packed([[5, 6, 7, 8], [9, 10]]),
        collate_packed(pieces, pad_to_multiple_of=32),
        collate_packed([[5, 6, 7, 8]]),
        pad_sequences(pieces),
    ):
        assert uniform_pack_as_padded(batch) is batch
    # a tensor of another shape riding along: unchanged rather than guessed at
    odd = {**collate_packed(pieces), "extra": torch.zeros(3)}
    assert uniform_pack_as_padded(odd) is odd


@pytest.mark.parametrize("family", ["geneformer", "llama3"])
def test_uniform_pack_as_rows_gives_the_packed_loss_and_gradients(family, request):
    """The rows are the packed batch's sequences: loss and every gradient equal (float32, CPU), for a bidirectional
    model with absolute positions and for a causal one (labels shifted within rows)."""
    from bioscale.data import CLMCollator, MLMCollator, collate_packed, uniform_pack_as_padded
    from bioscale.data.tokenizers import get_tokenizer
    from bioscale.models import build_config, build_model

    if family == "geneformer":
        request.getfixturevalue("shared_data")  # the Geneformer tokenizer's gene vocabulary lives there
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model(build_config(family, "debug"), device="cpu")
    vocab = model.config.vocab_size
    pieces = [rng.integers(5, min(vocab, 20), size=32) for _ in range(4)]
    packed = collate_packed(pieces)
    if family == "llama3":
        packed = CLMCollator(get_tokenizer("nucleotide")).apply(packed)
    else:
        packed = MLMCollator(get_tokenizer("geneformer"), mlm_probability=0.3).apply(packed, np.random.default_rng(1))
    rows = uniform_pack_as_padded(packed)
    assert rows["input_ids"].shape == (4, 32)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()  # no dropout: the two layouts draw their masks in another order
    loss_packed, grads_packed = loss_and_grads(packed)
    loss_rows, grads_rows = loss_and_grads(rows)
    torch.testing.assert_close(loss_rows, loss_packed, rtol=1e-5, atol=1e-6)
    assert grads_rows.keys() == grads_packed.keys()
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grads_rows[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_pack_mostly_of_one_length_becomes_static_rows_plus_a_packed_rest():
    from bioscale.data import collate_packed, rows_and_rest

    full = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    packed = collate_packed([full[0], [20, 21, 22], full[1], full[2]], pad_to_multiple_of=16)  # T 16: 15 + pad 1
    packed["labels"][0, 5] = IGNORE_INDEX
    rows, rest = rows_and_rest(packed, max_tokens=16, pad_token_id=PAD_TOKEN_ID, multiple=1)
    # the three 4-token sequences and one row of <pad> (the uniform packs' [16 // 4, 4] shape), no varlen metadata
    assert set(rows) == {"input_ids", "position_ids", "labels"}
    assert rows["input_ids"].tolist() == [*full, [PAD_TOKEN_ID] * 4]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3]] * 4
    assert rows["labels"].tolist() == [full[0], full[1], full[2], [IGNORE_INDEX] * 4]
    # the short sequence and the padding segment, packed, positions as they were
    assert rest["input_ids"].tolist() == [[20, 21, 22, PAD_TOKEN_ID]]
    assert rest["labels"].tolist() == [[20, IGNORE_INDEX, 22, IGNORE_INDEX]]
    assert rest["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert rest["cu_seq_lens_q"].tolist() == rest["cu_seq_lens_k"].tolist() == [0, 3, 4]
    assert rest["cu_seq_lens_q"].dtype == packed["cu_seq_lens_q"].dtype and rest["max_length_q"] == 3
    # every label once, nothing else scored
    assert sorted(torch.cat([rows["labels"].flatten(), rest["labels"].flatten()]).tolist()) == sorted(
        packed["labels"].flatten().tolist() + [IGNORE_INDEX] * 4)

    # uniform: its rows alone; a rest without a label to score is left out
    assert [p["input_ids"].shape for p in rows_and_rest(collate_packed(full), max_tokens=12)] == [(3, 4)]
    no_labels = collate_packed([full[0], [20, 21, 22], full[1], full[2]], pad_to_multiple_of=16)
    no_labels["labels"][0, 4:7] = IGNORE_INDEX
    assert [p["input_ids"].shape for p in rows_and_rest(no_labels, max_tokens=16)] == [(4, 4)]
    # unchanged: too many padding rows, one long sequence, a rest off the multiple, another tensor, a padded batch
    for batch, kwargs in (
        (packed, {"max_tokens": 32}),  # 8 rows of 4 for 3 sequences
        (collate_packed([full[0], [20, 21]]), {"max_tokens": 8}),
        (packed, {"max_tokens": 16, "multiple": 16}),  # a 4-token rest
        ({**packed, "token_type_ids": torch.zeros_like(packed["input_ids"])}, {"max_tokens": 16}),
        (pad_sequences(full), {"max_tokens": 16}),
    ):
        assert rows_and_rest(batch, **kwargs) == [batch]


@pytest.mark.parametrize("family", ["geneformer", "llama3"])
def test_rows_and_rest_give_the_packed_loss_sum_and_gradients(family, request):
    """What the trainer runs: the micro-batches' summed loss sums and gradients equal the packed batch's (float32)."""
    from bioscale.data import CLMCollator, MLMCollator, collate_packed, rows_and_rest
    from bioscale.data.tokenizers import get_tokenizer
    from bioscale.models import build_config, build_model

    if family == "geneformer":
        request.getfixturevalue("shared_data")  # the Geneformer tokenizer's gene vocabulary lives there
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model(build_config(family, "debug"), device="cpu").eval()  # eval: no dropout
    vocab = model.config.vocab_size
    pieces = [rng.integers(5, min(vocab, 20), size=32) for _ in range(5)]
    pieces.insert(2, rng.integers(5, min(vocab, 20), size=21))  # one shorter sequence
    packed = collate_packed(pieces, pad_to_multiple_of=16)  # 181 tokens + a padding segment of 11
    if family == "llama3":
        packed = CLMCollator(get_tokenizer("nucleotide")).apply(packed)
    else:
        packed = MLMCollator(get_tokenizer("geneformer"), mlm_probability=0.3).apply(packed, np.random.default_rng(1))
    pieces_out = rows_and_rest(packed, max_tokens=192, pad_token_id=PAD_TOKEN_ID, multiple=16)
    assert [tuple(p["input_ids"].shape) for p in pieces_out] == [(6, 32), (1, 32)]

    def loss_sum_and_grads(batches):
        model.zero_grad()
        total = sum(model(**b, loss_reduction="sum").loss for b in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_packed, grads_packed = loss_sum_and_grads([packed])
    loss_split, grads_split = loss_sum_and_grads(pieces_out)
    torch.testing.assert_close(loss_split, loss_packed, rtol=1e-5, atol=1e-5)
    assert grads_split.keys() == grads_packed.keys()
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-5, msg=name)
