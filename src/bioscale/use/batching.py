"""Micro-batches for inference and fine-tuning: which examples go together, and the model inputs for them.

Training's loader (:mod:`bioscale.data`) packs an endless shuffled stream. Embedding and fine-tuning work on a
finite list of examples whose outputs must be mapped back to their source (an embedding to its sequence id, a logit
row to its label), so they plan batches over indices instead: :func:`plan_batches` groups example indices under a
token budget, and :func:`collate_packed` / :func:`collate_padded` build the two calling conventions of a bioscale
model with :mod:`bioscale.data.packing` (``cu_seq_lens_q/k``, ``max_length_q/k``, ``position_ids`` restarting per
sequence), replacing its language-model labels with the task's.
Both return the per-token example index too, so heads and pooling never mix tokens of different sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bioscale.data import packing as data_packing
from bioscale.models.loss import IGNORE_INDEX


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    padded: bool = False,
    order: Sequence[int] | None = None,
    max_sequences: int | None = None,
) -> list[list[int]]:
    """Group example indices into micro-batches of at most ``max_tokens`` tokens.

    Args:
        lengths: tokens per example.
        max_tokens: budget per batch: the sum of lengths (packed) or ``batch_size * longest`` (padded, counting the
            padding the kernel computes on). An example longer than the budget gets a batch of its own.
        padded: count the budget as a padded batch would.
        order: the order to fill batches in (a shuffled permutation for training). ``None``: longest first, which
            minimises padding and lets the largest batches run first, so an out-of-memory error shows at once.
        max_sequences: optional cap on examples per batch.

    Returns:
        Lists of example indices; every index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    current_longest = 0
    for index in order:
        length = int(lengths[index])
        longest = max(current_longest, length)
        cost = longest * (len(current) + 1) if padded else current_tokens + length
        full = max_sequences is not None and len(current) >= max_sequences
        if current and (cost > max_tokens or full):
            batches.append(current)
            current, current_tokens, longest = [], 0, length
        current.append(index)
        current_tokens += length
        current_longest = longest
    if current:
        batches.append(current)
    return batches


@dataclass
class ModelBatch:
    """Inputs for one forward call plus the bookkeeping to map outputs back.

    Attributes:
        inputs: keyword arguments for ``model(**inputs)`` (packed or padded convention).
        token_example: ``[T]`` position in the batch (0..n-1) of the example each *real* token belongs to, in the
            order of the model's flattened real tokens (packed: all tokens; padded: ``hidden[attention_mask]``).
        token_mask: padded batches: ``[B, S]`` bool mask of real tokens; ``None`` when packed.
    """

    inputs: dict[str, torch.Tensor | int]
    token_example: torch.Tensor
    token_mask: torch.Tensor | None = None

    def flatten(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` (packed) or ``[B, S, ...]`` (padded) model output -> ``[T_real, ...]`` real tokens."""
        if self.token_mask is None:
            return per_token.reshape(-1, *per_token.shape[2:])
        return per_token[self.token_mask]


def collate_packed(
    token_ids: Sequence[Sequence[int]],
    *,
    labels: Sequence[Sequence[int]] | None = None,
    device: torch.device | str | None = None,
) -> ModelBatch:
    """Pack examples back to back into one ``[1, T]`` row with the packed-attention metadata.

    ``labels``, when given, are per-token lists aligned with ``token_ids`` (``-100`` where unlabelled); without them
    the batch has no ``labels`` key (inference).
    """
    if not token_ids:
        raise ValueError("cannot collate an empty batch")
    inputs = data_packing.collate_packed([list(ids) for ids in token_ids])
    lengths = torch.tensor([len(ids) for ids in token_ids])
    inputs.pop("labels")
    if labels is not None:
        inputs["labels"] = _flat_labels(token_ids, labels).unsqueeze(0)
    token_example = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    return ModelBatch(inputs=_to_device(inputs, device), token_example=token_example.to(device))


def collate_padded(
    token_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    device: torch.device | str | None = None,
) -> ModelBatch:
    """Right-pad examples into ``[B, S]`` with an ``attention_mask`` (labels padded with ``-100``)."""
    if not token_ids:
        raise ValueError("cannot collate an empty batch")
    inputs: dict[str, torch.Tensor | int] = dict(
        data_packing.pad_sequences([list(ids) for ids in token_ids], pad_token_id=pad_token_id)
    )
    mask = inputs["attention_mask"].bool()  # type: ignore[union-attr]
    inputs.pop("labels")
    if labels is not None:
        padded_labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long)
        padded_labels[mask] = _flat_labels(token_ids, labels)
        inputs["labels"] = padded_labels
    lengths = mask.sum(dim=1)
    token_example = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)
    return ModelBatch(
        inputs=_to_device(inputs, device), token_example=token_example.to(device), token_mask=mask.to(device)
    )


def _flat_labels(token_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> torch.Tensor:
    assert len(labels) == len(token_ids), (len(labels), len(token_ids))
    for row, (ids, row_labels) in enumerate(zip(token_ids, labels)):
        assert len(ids) == len(row_labels), f"example {row}: {len(ids)} tokens but {len(row_labels)} labels"
    return torch.tensor([t for row in labels for t in row], dtype=torch.long)


def _to_device(
    inputs: dict[str, torch.Tensor | int], device: torch.device | str | None
) -> dict[str, torch.Tensor | int]:
    if device is None:
        return inputs
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
