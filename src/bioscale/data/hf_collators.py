"""Collators for ``transformers``' ``Trainer`` (``data_collator=``): a list of examples in, one model batch out.

bioscale's own loader collates inside its dataset (``bioscale.data.loader``); ``Trainer`` instead draws examples from
a ``datasets.Dataset`` and hands each micro-batch's list to its ``data_collator``. :class:`MLMDataCollator` does
masked-LM there the bioscale way: each example is masked first (``MLMCollator``'s recipe: 15% of the non-special
tokens, 80/10/10), then the batch is laid out padded (``[B, S]`` + ``attention_mask``) or packed (one ``[1, T]`` row
with ``cu_seq_lens_q/k``, ``max_length_q/k`` and restarting ``position_ids``: the boundaries travel with the batch, so
nothing is derived in the model). Masking before the layout means the two layouts of the same examples and seed get
the same masks, so a padded and a packed run can be compared number for number. Examples that already carry
``labels`` (masked offline) are laid out as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bioscale.data.collators import MLMCollator
from bioscale.data.packing import IGNORE_INDEX, collate_packed, pad_sequences


class MLMDataCollator:
    """``Trainer`` data collator for masked LM: mask each example, then pad or flatten (see the module docstring).

    Args:
        tokenizer: supplies the mask, pad and special token ids (or pass them as ``MLMCollator`` keywords).
        mlm_probability: fraction of non-special tokens selected for prediction.
        packed: one ``[1, T]`` packed row per micro-batch instead of a padded ``[B, S]`` batch.
        pad_to_multiple_of: round ``S`` (padded) or ``T`` (packed, with a final ``<pad>`` segment) up to a multiple.
        seed: seeds the masking generator (one stream over the collator's calls, so a run is reproducible).
        **ids: ``mask_token_id``, ``pad_token_id``, ``special_token_ids``, ``random_token_ids`` for ``MLMCollator``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mlm_probability: float = 0.15,
        *,
        packed: bool = True,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        **ids: Any,
    ) -> None:
        self.mlm = MLMCollator(tokenizer, mlm_probability, seed=seed, **ids)
        self.packed = packed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | int]:
        if not features:
            raise ValueError("MLMDataCollator got an empty batch")
        inputs, labels = [], []
        for feature in features:
            ids = np.asarray(feature["input_ids"], dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"each example's input_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
            if "labels" in feature:
                inputs.append(ids)
                labels.append(np.asarray(feature["labels"], dtype=np.int64))
            else:
                masked = self.mlm.apply({"input_ids": torch.from_numpy(ids)[None]})
                inputs.append(masked["input_ids"][0].numpy())
                labels.append(masked["labels"][0].numpy())
        if self.packed:
            pad_id = self.mlm.pad_token_id
            batch = collate_packed(inputs, pad_to_multiple_of=self.pad_to_multiple_of, pad_token_id=pad_id)
            flat = np.full(batch["input_ids"].shape[1], IGNORE_INDEX, dtype=np.int64)  # the padding segment: -100
            flat[: sum(len(x) for x in labels)] = np.concatenate(labels)
            batch["labels"] = torch.from_numpy(flat)[None]
            return batch
        batch = pad_sequences(inputs, pad_token_id=self.mlm.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        padded = np.full(tuple(batch["input_ids"].shape), IGNORE_INDEX, dtype=np.int64)
        for row, row_labels in enumerate(labels):
            padded[row, : len(row_labels)] = row_labels
        batch["labels"] = torch.from_numpy(padded)
        return batch
