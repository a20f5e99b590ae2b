"""Objective collators: masked-LM statistics and reproducibility; causal-LM labels never cross a packed boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bioscale.data import (
    IGNORE_INDEX,
    CLMCollator,
    MLMCollator,
    canonical_token_ids,
    count_tokens,
    nucleotide_tokenizer,
    pack_sequences,
    protein_tokenizer,
)
from bioscale.data.tokenizers import CharTokenEncoder

from .helpers import random_proteins


@pytest.fixture(scope="module")
def tok():
    return protein_tokenizer()


@pytest.fixture(scope="module")
def token_lists(tok):
    encoder = CharTokenEncoder(tok)
    return [encoder.encode(s).astype(np.int64) for s in random_proteins(400, seed=3, low=20, high=400)]


@pytest.mark.parametrize("packed", [False, True])
def test_mlm_masking_statistics(tok, token_lists, packed):
    collator = MLMCollator(tok, random_token_ids=canonical_token_ids(tok, "protein"))
    special = set(tok.all_special_ids)
    rng = np.random.default_rng(0)
    n_candidates = n_selected = n_mask = n_random = n_kept = 0
    for _ in range(3):  # many batches, ~220k candidate tokens
        if packed:
            batches = [collator.apply(b, rng) for b in pack_sequences(token_lists, max_tokens=4096)]
            originals = [torch.from_numpy(np.concatenate(token_lists))]
            inputs = [torch.cat([b["input_ids"][0] for b in batches])]
            labels = [torch.cat([b["labels"][0] for b in batches])]
        else:
            chunks = [token_lists[i : i + 16] for i in range(0, len(token_lists), 16)]
            batches = [collator(c, rng) for c in chunks]
            originals = [
                torch.nn.utils.rnn.pad_sequence([torch.from_numpy(x) for x in c], batch_first=True, padding_value=1)
                for c in chunks
            ]
            inputs = [b["input_ids"] for b in batches]
            labels = [b["labels"] for b in batches]
        for orig, inp, lab in zip(originals, inputs, labels):
            is_special = torch.isin(orig, torch.tensor(sorted(special)))
            selected = lab != IGNORE_INDEX
            assert not (selected & is_special).any(), "a special token was selected"
            assert torch.equal(lab[selected], orig[selected]), "labels must hold the original ids"
            assert torch.equal(inp[~selected], orig[~selected]), "unselected tokens must be untouched"
            n_candidates += int((~is_special).sum())
            n_selected += int(selected.sum())
            n_mask += int((inp[selected] == tok.mask_token_id).sum())
            changed = selected & (inp != tok.mask_token_id) & (inp != orig)
            assert set(inp[changed].tolist()) <= set(range(4, 24)), "random replacements are canonical residues"
            n_random += int(changed.sum())
            n_kept += int((selected & (inp == orig)).sum())
    assert abs(n_selected / n_candidates - 0.15) < 0.005
    assert abs(n_mask / n_selected - 0.80) < 0.01
    # a random replacement equals the original 1 time in 20 (20 canonical residues): 10% * 19/20 changed
    assert abs(n_random / n_selected - 0.10 * 19 / 20) < 0.008
    assert abs(n_kept / n_selected - (0.10 + 0.10 / 20)) < 0.008


def test_mlm_is_seeded_and_reproducible(tok, token_lists):
    collator = MLMCollator(tok)
    first = collator(token_lists[:8], np.random.default_rng(123))
    again = collator(token_lists[:8], np.random.default_rng(123))
    other = collator(token_lists[:8], np.random.default_rng(124))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"], other["labels"])
    a, b = MLMCollator(tok, seed=5), MLMCollator(tok, seed=5)
    assert torch.equal(a(token_lists[:8])["labels"], b(token_lists[:8])["labels"])


def test_mlm_bad_probability(tok):
    with pytest.raises(ValueError, match="mlm_probability must be in"):
        MLMCollator(tok, mlm_probability=1.5)


def _bigram_loss(input_ids: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of a toy bigram model with the transformers shift (logits[:-1] vs labels[1:])."""
    logits = table[input_ids]  # [B, S, V]
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, table.shape[1]), shift_labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)
    return loss, int((shift_labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("multiple", [None, 16])
def test_clm_packed_loss_equals_per_sequence_loss(multiple):
    """The reference: every sequence scored alone. Packed labels must give the same summed loss and count."""
    tok = nucleotide_tokenizer()
    encoder = CharTokenEncoder(tok)
    rng = np.random.default_rng(0)
    seqs = [encoder.encode("".join(rng.choice(list("ACGT"), int(n)))).astype(np.int64)
            for n in rng.integers(1, 50, size=40)]
    table = torch.randn(len(tok), len(tok), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    collator = CLMCollator(tok)

    ref_loss = torch.zeros((), dtype=torch.float64)
    ref_count = 0
    for s in seqs:
        ids = torch.from_numpy(s)[None]
        loss, count = _bigram_loss(ids, ids, table)
        ref_loss += loss
        ref_count += count
    assert ref_count == sum(len(s) - 1 for s in seqs)

    packed_loss = torch.zeros((), dtype=torch.float64)
    packed_count = label_tokens = 0
    for batch in pack_sequences(seqs, max_tokens=128, pad_to_multiple_of=multiple):
        batch = collator.apply(batch)
        cu = batch["cu_seq_lens_q"].long()
        assert (batch["labels"][0, cu[:-1]] == IGNORE_INDEX).all()  # no position predicts a sequence start
        loss, count = _bigram_loss(batch["input_ids"], batch["labels"], table)
        packed_loss += loss
        packed_count += count
        label_tokens += count_tokens(batch)["num_label_tokens"]
    assert packed_count == ref_count == label_tokens  # num_label_tokens counts exactly the loss terms
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-12, atol=1e-12)

    padded = collator(seqs[:5])
    loss, count = _bigram_loss(padded["input_ids"], padded["labels"], table)
    assert count == sum(len(s) - 1 for s in seqs[:5]) == count_tokens(padded)["num_label_tokens"]
