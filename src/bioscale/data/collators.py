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
from bioscale.data.tokenizers import NUCLEOTIDE_AMBIGUOUS, canonical_token_ids

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


def case_label_map(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """``{lower-case letter id: its upper-case id}`` for the letters that are tokens in both cases (the byte-level
    ``nucleotide_ascii`` vocabulary: ``a`` 97 -> ``A`` 65); empty for an upper-casing tokenizer."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    return {
        i: vocab[t.upper()]
        for t, i in vocab.items()
        if len(t) == 1 and t.islower() and t.upper() in vocab and t not in special and vocab[t.upper()] != i
    }


def ambiguous_base_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of ``N`` and the IUPAC ambiguity codes (``R Y S W K M B D H V``), in either case where the vocabulary has
    both."""
    vocab = tokenizer.get_vocab()
    return sorted({vocab[c] for code in NUCLEOTIDE_AMBIGUOUS for c in (code, code.lower()) if c in vocab})


class CLMCollator:
    """Causal-LM labels: the input ids, unshifted (the ``transformers`` convention: the model shifts), with -100 on
    padding and on the first token of every sequence.

    No position predicts a sequence's first token, so its label never enters an unpacked loss; marking it -100
    changes no loss value but (1) in a packed batch it guarantees that the last token of one sequence is never
    trained to predict the first of the next, even in a model that shifts labels without looking at
    ``cu_seq_lens``, and (2) ``labels != -100`` then counts exactly the loss terms, which is the normaliser the
    trainer needs.

    Genomic label options (the reference's genomic collator; both off by default, inputs are never changed):

    - ``uppercase_labels``: a lower-case (soft-masked repeat) base is predicted as its upper-case id, so the model
      learns the sequence, not where a repeat masker ran. Only meaningful with inputs that keep case (the byte-level
      ``nucleotide_ascii`` tokenizer and ``data.keep_case``, where ``a`` is input 97 and target 65).
    - ``ignore_ambiguous_labels``: ``N`` and IUPAC ambiguity codes (``R Y S W K M B D H V``, either case) are -100
      as targets: an assembly gap or an ambiguous call is no base to learn. They stay in the inputs. Unlike the
      reference, which ignores every non-ACGT target, ``<eos>`` is still a target, so the model learns to stop.

    After each :meth:`apply`, ``last_label_counts`` holds that batch's ``labels_uppercased`` and
    ``labels_ambiguous_ignored``; the loader adds them to its input-policy counts (``summary.json``'s
    ``data_policy``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        pad_token_id: int | None = None,
        pad_to_multiple_of: int | None = None,
        uppercase_labels: bool = False,
        ignore_ambiguous_labels: bool = False,
        case_map: dict[int, int] | None = None,
        ambiguous_token_ids: Sequence[int] | None = None,
    ) -> None:
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer is not None else None
        if pad_token_id is None:
            raise ValueError("CLMCollator needs a tokenizer with a pad token, or pad_token_id")
        if uppercase_labels and case_map is None:
            if tokenizer is None:
                raise ValueError("CLMCollator(uppercase_labels=True) needs a tokenizer or case_map")
            case_map = case_label_map(tokenizer)
        if ignore_ambiguous_labels and ambiguous_token_ids is None:
            if tokenizer is None:
                raise ValueError("CLMCollator(ignore_ambiguous_labels=True) needs a tokenizer or ambiguous_token_ids")
            ambiguous_token_ids = ambiguous_base_ids(tokenizer)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.uppercase_labels = bool(uppercase_labels)
        self.ignore_ambiguous_labels = bool(ignore_ambiguous_labels)
        # Lookup tables indexed by token id (ids here are < 256 for every bioscale vocabulary, but any size works).
        self._upper: torch.Tensor | None = None
        self._ambiguous: torch.Tensor | None = None
        if self.uppercase_labels:
            assert case_map is not None
            size = max([self.pad_token_id, *case_map, *case_map.values()]) + 1
            self._upper = torch.arange(size)
            for lower, upper in case_map.items():
                self._upper[lower] = upper
        if self.ignore_ambiguous_labels:
            assert ambiguous_token_ids is not None
            ids = [int(i) for i in ambiguous_token_ids]
            self._ambiguous = torch.zeros(max([self.pad_token_id, *ids]) + 1, dtype=torch.bool)
            self._ambiguous[ids] = True
        self.last_label_counts: dict[str, int] = {"labels_uppercased": 0, "labels_ambiguous_ignored": 0}

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
        counts = {"labels_uppercased": 0, "labels_ambiguous_ignored": 0}
        if self._upper is not None or self._ambiguous is not None:
            labels = self._genomic_labels(labels, counts)
        self.last_label_counts = counts
        batch["labels"] = labels
        return batch

    def _genomic_labels(self, labels: torch.Tensor, counts: dict[str, int]) -> torch.Tensor:
        """``labels`` with the upper-casing and ambiguity options applied (see the class docstring), counted: an
        ambiguous target is only counted as ignored, even when it was lower case."""
        scored = labels != IGNORE_INDEX
        ambiguous = torch.zeros_like(scored)
        if self._ambiguous is not None:
            inside = scored & (labels < self._ambiguous.numel())
            ambiguous[inside] = self._ambiguous[labels[inside]]
            counts["labels_ambiguous_ignored"] = int(ambiguous.sum())
        if self._upper is not None:
            inside = scored & (labels < self._upper.numel())
            mapped = labels.clone()
            mapped[inside] = self._upper[labels[inside]]
            counts["labels_uppercased"] = int(((mapped != labels) & ~ambiguous).sum())
            labels = mapped
        return labels.masked_fill(ambiguous, IGNORE_INDEX) if self._ambiguous is not None else labels
