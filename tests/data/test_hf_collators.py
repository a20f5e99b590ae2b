"""``MLMDataCollator``, the ``Trainer`` data collator: mask each example, then pad or pack (issue 22)."""

from __future__ import annotations

import torch

from bioscale.data import get_tokenizer
from bioscale.data.hf_collators import MLMDataCollator
from bioscale.models import build_config, build_model

from .helpers import random_proteins


def _features(tokenizer, n: int = 6) -> list[dict[str, list[int]]]:
    return [{"input_ids": tokenizer(seq)["input_ids"]} for seq in random_proteins(n, seed=3, low=5, high=30)]


def test_padded_and_packed_layouts_get_the_same_masks() -> None:
    tokenizer = get_tokenizer("protein")
    features = _features(tokenizer)
    padded = MLMDataCollator(tokenizer, packed=False, seed=7)(features)
    packed = MLMDataCollator(tokenizer, packed=True, seed=7)(features)
    lengths = [len(f["input_ids"]) for f in features]
    mask = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][mask])
    assert torch.equal(packed["labels"][0], padded["labels"][mask])
    assert (padded["labels"][~mask] == -100).all()
    assert packed["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert packed["max_length_q"] == max(lengths)
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    # Special tokens are never selected; about 15% of the residues are.
    special = torch.isin(padded["input_ids"], torch.tensor(tokenizer.all_special_ids)) & (padded["labels"] == -100)
    originals = torch.tensor([t for f in features for t in f["input_ids"]])
    assert not torch.isin(originals[packed["labels"][0] != -100], torch.tensor(tokenizer.all_special_ids)).any()
    assert special.any() and 0 < int((packed["labels"] != -100).sum()) < len(originals)


def test_packed_batches_give_the_padded_loss_and_pad_to_a_multiple() -> None:
    tokenizer = get_tokenizer("protein")
    features = _features(tokenizer)
    torch.manual_seed(0)
    model = build_model(build_config("esm2", "debug"), device="cpu").eval()
    padded = MLMDataCollator(tokenizer, packed=False, seed=1)(features)
    packed = MLMDataCollator(tokenizer, packed=True, seed=1, pad_to_multiple_of=16)(features)
    real = sum(len(f["input_ids"]) for f in features)
    assert packed["input_ids"].shape[1] % 16 == 0 and (packed["labels"][0, real:] == -100).all()  # padding: no label
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, rtol=1e-5, atol=1e-6)


def test_examples_with_labels_are_laid_out_as_they_are() -> None:
    tokenizer = get_tokenizer("protein")
    features = [{"input_ids": [0, 5, 32, 7, 2], "labels": [-100, -100, 6, -100, -100]}, {"input_ids": [0, 9, 2],
                "labels": [-100, 9, -100]}]  # fmt: skip
    packed = MLMDataCollator(tokenizer, packed=True)(features)
    assert packed["input_ids"][0].tolist() == [0, 5, 32, 7, 2, 0, 9, 2]
    assert packed["labels"][0].tolist() == [-100, -100, 6, -100, -100, -100, 9, -100]
