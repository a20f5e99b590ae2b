"""Shared plumbing of the evaluations: device choice, chunking long sequences, and length-sorted padded batches.

Evaluations run padded (BSHD) batches with an ``attention_mask``, the calling convention every bioscale and
``transformers`` model accepts on every device; sorting by length first keeps padding small. A sequence longer than
the model's context is cut into consecutive non-overlapping chunks, each wrapped in the tokenizer's special tokens
and scored on its own (the same view of a long protein that random cropping gives the model in training).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from bioscale.data.tokenizers import CharTokenEncoder, record_affixes


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def chunk_sequence(sequence: str, max_residues: int) -> list[str]:
    """``sequence`` cut into consecutive pieces of at most ``max_residues`` (the last may be shorter)."""
    if max_residues < 1:
        raise ValueError(f"max_residues must be >= 1; got {max_residues}")
    return [sequence[i : i + max_residues] for i in range(0, len(sequence), max_residues)] or [""]


def special_token_count(tokenizer) -> int:
    """How many special tokens :func:`encode` wraps around one sequence (2 for ``<cls> … <eos>``; 2 for the DNA
    tokenizers too, whose ``<eos>`` the data pipeline adds, as in training: ``record_affixes``)."""
    try:
        prefix, suffix = record_affixes(tokenizer)
        return len(prefix) + len(suffix)
    except ValueError:  # not a character-level tokenizer: what it adds itself
        pass
    with_special = tokenizer("A", add_special_tokens=True)["input_ids"]
    without = tokenizer("A", add_special_tokens=False)["input_ids"]
    return len(with_special) - len(without)


def encode(tokenizer, sequences: Sequence[str]) -> list[np.ndarray]:
    """Token ids (special tokens included) of each sequence, as int64 arrays.

    Uses the data layer's lookup-table encoder for its character-level tokenizers (identical ids, far faster) and the
    tokenizer itself otherwise.
    """

    try:
        encoder = CharTokenEncoder(tokenizer)
    except ValueError:  # not a character-level tokenizer
        ids = tokenizer(list(sequences), add_special_tokens=True)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]
    return [encoder.encode(s).astype(np.int64) for s in sequences]


def padded_batches(
    token_lists: Sequence[np.ndarray], *, max_tokens: int, pad_token_id: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of ``(indices, input_ids [B, S], attention_mask [B, S])``, longest first, with ``B * S <= max_tokens``.

    A single sequence longer than ``max_tokens`` still gets a batch of its own.
    """
    order = sorted(range(len(token_lists)), key=lambda i: (-len(token_lists[i]), i))
    start = 0
    while start < len(order):
        longest = len(token_lists[order[start]])  # sorted descending: the first row sets the width
        rows = max(1, max_tokens // max(longest, 1))
        indices = order[start : start + rows]
        start += rows
        input_ids = torch.full((len(indices), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            ids = torch.from_numpy(np.asarray(token_lists[i], dtype=np.int64))
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        yield indices, input_ids, attention_mask
