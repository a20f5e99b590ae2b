"""Token-level cross-entropy shared by the language-model and token-classification heads.

Every head returns the loss *and* the number of label tokens it was computed over (``num_label_tokens``). With
``loss_reduction="mean"`` (the default, what ``transformers`` returns) ``loss`` is the mean over label tokens; with
``"sum"`` it is the sum, so a trainer can add sums and counts over gradient-accumulation micro-batches and
data-parallel ranks and divide once by the global count — the normalisation masked LM needs, because the number of
masked tokens differs from batch to batch (torchtitan normalises the same way). Positions whose label is
:data:`IGNORE_INDEX` (-100) do not count. Logits are upcast to float32 for the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bioscale.constants import IGNORE_INDEX
from bioscale.models.batch import sequence_ids_from_cu_seqlens

LOSS_REDUCTIONS = ("mean", "sum")


def check_loss_reduction(reduction: str) -> str:
    """Return ``reduction`` if valid, else raise ``ValueError``."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    return reduction


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits`` ``[..., V]`` against ``labels`` ``[...]``, ignoring :data:`IGNORE_INDEX`.

    Returns:
        ``(loss, num_label_tokens)``; ``loss`` is the mean (0 when there is no label token, rather than NaN) or the
        sum, ``num_label_tokens`` an int64 scalar tensor (no host sync).
    """
    check_loss_reduction(reduction)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the logits' leading shape {tuple(logits.shape[:-1])}"
        )
    labels = labels.to(logits.device)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    num_label_tokens = (labels != IGNORE_INDEX).sum()
    if reduction == "sum":
        return loss_sum, num_label_tokens
    return loss_sum / num_label_tokens.clamp(min=1), num_label_tokens


def select_label_positions(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``hidden_states`` ``[..., D]`` (and ``labels``) where a label is set: ``[N_label, D]``, ``[N_label]``.

    Used to run an LM head only where the loss needs it. One host sync (the count decides the output shape): the
    positions are found once and both tensors gathered at them, so the backward is a gather's ``index_add`` rather
    than boolean indexing's ``index_put`` (which finds the positions again, a second sync, and sorts them).
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the hidden states' leading shape "
            f"{tuple(hidden_states.shape[:-1])}"
        )
    labels = labels.reshape(-1)
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    return hidden_states.index_select(0, positions), labels.index_select(0, positions)


def shift_labels(
    labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Next-token targets: ``out[..., i] = labels[..., i + 1]``, ``ignore_index`` at the end of every sequence.

    Args:
        labels: ``[B, S]`` padded, or ``[1, T]`` / ``[T]`` packed, unshifted (aligned with ``input_ids``).
        cu_seqlens: packed batches: int32 ``[N + 1]`` boundaries; the last token of each sequence gets
            ``ignore_index`` so no target crosses into the next sequence. ``None`` for padded batches (each row is one
            sequence; padding carries ``ignore_index`` already).

    Sync-free; usable by collators and context-parallel code as well as by the model.
    """
    shifted = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if cu_seqlens is None:
        return shifted
    num_tokens = labels.shape[-1]
    if labels.dim() == 2 and labels.shape[0] != 1:
        raise ValueError(f"packed labels must be [1, T] or [T], got {tuple(labels.shape)}")
    sequence_ids = sequence_ids_from_cu_seqlens(cu_seqlens.to(labels.device), num_tokens)
    is_last = torch.ones(num_tokens, dtype=torch.bool, device=labels.device)
    is_last[:-1] = sequence_ids[1:] != sequence_ids[:-1]
    return shifted.masked_fill(is_last.view(shifted.shape), ignore_index)


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None, num_labels: int, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of a per-sequence head, as ``transformers``' sequence-classification heads compute it.

    ``problem_type`` ``"regression"`` (MSE; the default when ``num_labels == 1``), ``"single_label_classification"``
    (cross-entropy; default for integer labels) or ``"multi_label_classification"`` (BCE with logits; default for
    float labels). Returns ``(loss, number of sequences)``; ``reduction="sum"`` sums over sequences.
    """
    num_sequences = logits.shape[0]
    if labels.shape[0] != num_sequences:
        raise ValueError(f"labels has {labels.shape[0]} rows but the batch has {num_sequences} sequences")
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    count = torch.tensor(num_sequences, device=logits.device)
    if problem_type == "single_label_classification":
        return token_cross_entropy(logits, labels.view(-1), reduction=reduction)
    logits = logits.float()
    if problem_type == "regression":
        target = labels.float().view_as(logits)
        loss = F.mse_loss(logits, target, reduction="sum") / num_labels
    elif problem_type == "multi_label_classification":
        loss = F.binary_cross_entropy_with_logits(logits, labels.float().view_as(logits), reduction="sum")
        loss = loss / num_labels
    else:
        raise ValueError(f"unknown config.problem_type {problem_type!r}")
    return (loss if reduction == "sum" else loss / num_sequences), count
