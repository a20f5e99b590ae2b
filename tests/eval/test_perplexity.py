"""Masked-LM perplexity and causal NLL against the stock ``transformers`` models, and the fixed masking's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bioscale.data.tokenizers import canonical_token_ids
from bioscale.eval import causal_lm_nll, fixed_mlm_masking, masked_lm_perplexity
from bioscale.eval.scoring_inputs import chunk_sequence
from bioscale.models import to_hf

from .conftest import DNA, PROTEINS


def _masking_kwargs(tokenizer) -> dict:
    return dict(
        special_token_ids=tokenizer.all_special_ids, mask_token_id=tokenizer.mask_token_id,
        random_token_ids=canonical_token_ids(tokenizer, "protein"),
    )


def test_fixed_masking_is_a_pure_function_with_training_statistics(esm) -> None:
    _, tokenizer = esm
    ids = np.asarray(tokenizer("A" * 2000)["input_ids"])
    a_inputs, a_labels = fixed_mlm_masking(ids, seed=5, index=3, **_masking_kwargs(tokenizer))
    b_inputs, b_labels = fixed_mlm_masking(ids, seed=5, index=3, **_masking_kwargs(tokenizer))
    c_inputs, _ = fixed_mlm_masking(ids, seed=5, index=4, **_masking_kwargs(tokenizer))
    assert torch.equal(a_inputs, b_inputs) and torch.equal(a_labels, b_labels)
    assert not torch.equal(a_inputs, c_inputs)
    selected = a_labels != -100
    assert not selected[0] and not selected[-1]  # <cls>, <eos> never selected
    assert 0.12 < selected.float().mean() < 0.18
    masked = (a_inputs == tokenizer.mask_token_id) & selected
    assert 0.7 < masked.sum() / selected.sum() < 0.9
    assert torch.equal(a_labels[selected], torch.from_numpy(ids)[selected])


def _reference_perplexity(model, tokenizer, sequences, *, max_length: int, seed: int) -> float:
    """One unpadded sequence at a time through transformers' EsmForMaskedLM, with the same masks."""
    hf = to_hf(model).eval()
    chunks = [c for s in sequences for c in chunk_sequence(s, max_length - 2)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            ids = np.asarray(tokenizer(chunk)["input_ids"])
            inputs, labels = fixed_mlm_masking(ids, seed=seed, index=i, **_masking_kwargs(tokenizer))
            n = int((labels != -100).sum())
            if n:
                loss = hf(input_ids=inputs[None], labels=labels[None]).loss
                total += loss.item() * n
                count += n
    return math.exp(total / count)


def test_masked_lm_perplexity_matches_transformers(esm) -> None:
    model, tokenizer = esm
    # max_length 40: the two globins are cut into chunks, the short peptides are not; batches mix lengths.
    ours = masked_lm_perplexity(model, PROTEINS, tokenizer, max_length=40, seed=3, max_tokens_per_batch=120,
                                progress=False)
    reference = _reference_perplexity(model, tokenizer, PROTEINS, max_length=40, seed=3)
    assert ours["num_chunks"] == sum(len(chunk_sequence(s, 38)) for s in PROTEINS)
    assert ours["perplexity"] == pytest.approx(reference, rel=1e-5)
    # A random model is near-uniform over the 33 tokens: a sanity range that a broken scorer would leave.
    assert 15 < ours["perplexity"] < 60


def test_perplexity_does_not_depend_on_batching(esm) -> None:
    model, tokenizer = esm
    small = masked_lm_perplexity(model, PROTEINS * 3, tokenizer, max_length=64, max_tokens_per_batch=64,
                                 progress=False)
    large = masked_lm_perplexity(model, PROTEINS * 3, tokenizer, max_length=64, max_tokens_per_batch=100_000,
                                 progress=False)
    assert small["num_masked_tokens"] == large["num_masked_tokens"]
    assert small["perplexity"] == pytest.approx(large["perplexity"], rel=1e-5)
    other_seed = masked_lm_perplexity(model, PROTEINS * 3, tokenizer, max_length=64, seed=1, progress=False)
    assert other_seed["perplexity"] != pytest.approx(large["perplexity"], rel=1e-6)


def test_causal_nll_matches_transformers(llama) -> None:
    model, tokenizer = llama
    ours = causal_lm_nll(model, DNA, tokenizer, max_length=32, max_tokens_per_batch=70, progress=False)
    hf = to_hf(model).eval()
    special = torch.tensor(tokenizer.all_special_ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in (c for s in DNA for c in chunk_sequence(s, 30)):
            ids = torch.tensor(tokenizer(chunk)["input_ids"])[None]
            labels = ids.masked_fill(torch.isin(ids, special), -100)  # <eos> is not scored, as in causal_lm_nll
            n = int((labels[:, 1:] != -100).sum())
            total += hf(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert ours["num_tokens"] == count == sum(len(s) for s in DNA)
    assert ours["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert ours["bits_per_base"] == pytest.approx(total / count / math.log(2), rel=1e-5)


def test_bad_inputs(esm) -> None:
    model, tokenizer = esm
    with pytest.raises(ValueError, match=r"max_length=2 leaves no room"):
        masked_lm_perplexity(model, PROTEINS, tokenizer, max_length=2, progress=False)
    with pytest.raises(ValueError, match=r"no sequences to evaluate"):
        masked_lm_perplexity(model, [""], tokenizer, progress=False)
