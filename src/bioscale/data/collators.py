"""Objective collators: masked-LM (ESM-2/BERT masking) and causal-LM labels, for padded or packed batches.

Each collator is callable on a list of token sequences (it pads them, BSHD) and has ``apply(batch)`` for a batch
built elsewhere (a packed one from packing.py). They hold ids only, never a tokenizer, so they pickle cheaply into
data-loader workers. Randomness comes from an explicit ``numpy.random.Generator``: the loader derives one per batch
from (seed, rank, worker, epoch, batch index), which is what makes a resumed run mask exactly like an uninterrupted
one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bioscale.data.packing import IGNORE_INDEX, TokenIds, pad_sequences
from bioscale.data.tokenizers import canonical_token_ids

Batch = dict[str, "torch.Tensor | int"]


class MLMCollator:
    """Masked-LM labels: each non-special token is selected with probability ``mlm_probability`` (0.15); a
    selected token becomes ``<mask>`` 80% of the time, a random residue 10%, and stays unchanged 10%; labels hold
    the original id at selected positions and -100 elsewhere. Special tokens (``<cls>``, ``<eos>``, ``<pad>`` …)
    are never selected. This is BERT's and ESM-2's recipe (ESM-2 paper, §A.1.1).

    Args:
        tokenizer: supplies ``mask_token_id``, ``pad_token_id`` and the special ids (or pass them explicitly).
        random_token_ids: ids the 10% random replacements are drawn from; default
            ``canonical_token_ids(tokenizer)``: the 20 amino acids / ACGT for the bioscale tokenizers.
        seed: seeds the generator used when a call passes no ``rng``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mlm_probability: float = 0.15,
        *,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        special_token_ids: Sequence[int] | None = None,
        random_token_ids: Sequence[int] | None = None,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if tokenizer is not None:
            mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
            if special_token_ids is None:
                special_token_ids = tokenizer.all_special_ids
            if random_token_ids is None:
                random_token_ids = canonical_token_ids(tokenizer)
        if mask_token_id is None or pad_token_id is None or special_token_ids is None or not random_token_ids:
            raise ValueError("MLMCollator needs a tokenizer with a mask and a pad token, or all ids passed explicitly")
        self.mlm_probability = mlm_probability
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.special_token_ids = np.unique(np.asarray([*special_token_ids, pad_token_id, mask_token_id], np.int64))
        self.random_token_ids = np.asarray(random_token_ids, dtype=np.int64)
        self.pad_to_multiple_of = pad_to_multiple_of
        self._rng = np.random.default_rng(seed)

    def __call__(self, examples: Sequence[TokenIds], rng: np.random.Generator | None = None) -> Batch:
        """Pads ``examples`` (token id sequences, special tokens included) and masks them."""
        batch = pad_sequences(examples, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        return self.apply(batch, rng)

    def apply(self, batch: Batch, rng: np.random.Generator | None = None) -> Batch:
        """Masks ``batch["input_ids"]`` (padded or packed) and sets ``labels``; returns the same dict."""
        rng = self._rng if rng is None else rng
        input_ids = batch["input_ids"]
        assert isinstance(input_ids, torch.Tensor)
        ids = input_ids.numpy().copy()
        selected = (rng.random(ids.shape) < self.mlm_probability) & ~np.isin(ids, self.special_token_ids)
        action = rng.random(ids.shape)  # < 0.8: <mask>; [0.8, 0.9): random residue; >= 0.9: unchanged
        labels = np.where(selected, ids, IGNORE_INDEX)
        ids[selected & (action < 0.8)] = self.mask_token_id
        randomize = selected & (action >= 0.8) & (action < 0.9)
        ids[randomize] = rng.choice(self.random_token_ids, size=int(randomize.sum()))
        batch["input_ids"] = torch.from_numpy(ids)
        batch["labels"] = torch.from_numpy(labels)
        return batch


class CLMCollator:
    """Causal-LM labels: the input ids, unshifted (the ``transformers`` convention: the model shifts), with -100 on
    padding and on the first token of every sequence.

    No position predicts a sequence's first token, so its label never enters an unpacked loss; marking it -100
    changes no loss value but (1) in a packed batch it guarantees that the last token of one sequence is never
    trained to predict the first of the next, even in a model that shifts labels without looking at
    ``cu_seq_lens``, and (2) ``labels != -100`` then counts exactly the loss terms, which is the normaliser the
    trainer needs.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer is not None else None
        if pad_token_id is None:
            raise ValueError("CLMCollator needs a tokenizer with a pad token, or pad_token_id")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TokenIds], rng: np.random.Generator | None = None) -> Batch:
        batch = pad_sequences(examples, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        return self.apply(batch, rng)

    def apply(self, batch: Batch, rng: np.random.Generator | None = None) -> Batch:
        """Sets ``labels`` of a padded or packed batch; ``rng`` is unused (the signature matches ``MLMCollator``)."""
        del rng
        input_ids = batch["input_ids"]
        assert isinstance(input_ids, torch.Tensor)
        labels = input_ids.clone()
        mask = batch.get("attention_mask")
        cu = batch.get("cu_seq_lens_q")
        if isinstance(mask, torch.Tensor):
            labels[mask == 0] = IGNORE_INDEX
            labels[:, 0] = IGNORE_INDEX  # sequences are left-aligned: column 0 is every row's first token
        elif isinstance(cu, torch.Tensor):
            flat = labels.view(-1)
            flat[cu[:-1].long()] = IGNORE_INDEX
            flat[input_ids.view(-1) == self.pad_token_id] = IGNORE_INDEX  # the padding segment, if any
        else:
            raise ValueError("CLMCollator.apply needs a padded batch (attention_mask) or a packed one (cu_seq_lens_q)")
        batch["labels"] = labels
        return batch
