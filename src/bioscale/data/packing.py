"""Sequence packing (THD): packing token sequences into micro-batches of a fixed token budget.

Padding a protein batch to its longest member wastes most of the compute (lengths span 10…1,000+ residues), so the
packed layout puts the sequences of a micro-batch end to end in one row ``input_ids [1, T]`` and tells the attention
kernel where each starts with ``cu_seq_lens`` (flash-attention's varlen convention, as in ``transformers``). Packing
is greedy and in order (:func:`greedy_pack`) or first-fit-decreasing over a bounded lookahead buffer
(:func:`buffered_pack`); both are deterministic functions of the input stream, so a stream can be packed on the fly
and a resumed run packs identically. ``T`` may be
padded up to a multiple (16 for FP8 GEMMs) by one extra segment of ``<pad>`` tokens that has its own ``cu_seq_lens``
entry — attention-isolated from real tokens — and label -100. ``T`` never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bioscale.constants import IGNORE_INDEX, PAD_TOKEN_ID


TokenIds = Sequence[int] | np.ndarray


def _token_array(ids: TokenIds, index: int) -> np.ndarray:
    """``ids`` (a list of ints, a numpy array or a CPU tensor) as a 1-D integer array; ``ValueError`` otherwise."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    try:
        array = np.asarray(ids)
    except ValueError as e:  # ragged nesting
        raise ValueError(f"sequence {index} is not a flat list of token ids ({e})") from e
    if array.ndim != 1:
        raise ValueError(f"sequence {index} must be a 1-D list of token ids, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_)):
        raise ValueError(f"sequence {index} must hold integer token ids, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"sequence {index} has a negative token id {int(array.min())}")
    return array


def check_pack_budget(max_tokens: int, pad_to_multiple_of: int | None, *, key: str = "max_tokens") -> None:
    """Raises ``ValueError`` naming ``key`` unless padding to the multiple can never push ``T`` past the budget."""
    for name, value in ((key, max_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if max_tokens < 1:
        raise ValueError(f"{key} must be >= 1, got {max_tokens}")
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if max_tokens % pad_to_multiple_of:
            raise ValueError(
                f"{key}={max_tokens} must be a multiple of pad_to_multiple_of={pad_to_multiple_of}, so that padding "
                f"a full micro-batch never exceeds the budget"
            )


def greedy_pack(
    sequences: Iterable[np.ndarray], max_tokens: int, *, split_overflow: bool = False
) -> Iterator[list[np.ndarray]]:
    """Groups ``sequences`` in order into lists whose total length is at most ``max_tokens``.

    A sequence that does not fit closes the current group and opens the next one; with ``split_overflow`` it is
    instead cut so that its head fills the current group and its tail continues in the next (every group except
    the last is then exactly full). Without it, a sequence longer than ``max_tokens`` raises ``ValueError``.
    """
    group: list[np.ndarray] = []
    used = 0
    for index, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        if split_overflow:
            while used + n > max_tokens:
                space = max_tokens - used
                if space:
                    group.append(seq[:space])
                    seq = seq[space:]
                    n -= space
                yield group
                group, used = [], 0
        elif used + n > max_tokens:
            if n > max_tokens:
                raise ValueError(
                    f"sequence {index} has {n} tokens, more than max_tokens={max_tokens}; crop it first "
                    f"(the loader's input policy does) or pass split_overflow=True"
                )
            yield group
            group, used = [], 0
        if n:
            group.append(seq)
            used += n
    if group:
        yield group


def buffered_pack(
    sequences: Iterable[np.ndarray], max_tokens: int, buffer_size: int
) -> Iterator[list[np.ndarray]]:
    """Groups ``sequences`` into lists of total length at most ``max_tokens``, looking ahead ``buffer_size`` sequences.

    Sequences wait in a buffer; whenever it holds at least ``buffer_size`` of them and at least ``max_tokens`` tokens
    (and at the end of the stream, until it is empty) one group is taken out of it first-fit-decreasing: the longest buffered sequence, then repeatedly the longest
    that still fits the remaining budget (ties: the earliest). A group keeps its members in stream order. Greedy
    in-order packing closes a group as soon as the next sequence does not fit, so a short sequence between two that
    exactly fill the budget together (a genome window's tail between two full windows) costs half a micro-batch; here
    the two full ones share a group and the short ones gather, so every group but the stream's last few is nearly full.
    Every sequence appears exactly once, and the output depends only on the input order. ``buffer_size <= 1`` is
    :func:`greedy_pack` (in order). A sequence longer than ``max_tokens`` raises ``ValueError``.
    """
    if buffer_size <= 1:
        yield from greedy_pack(sequences, max_tokens)
        return
    buffer: list[np.ndarray] = []
    num_buffered_tokens = 0

    def take_group() -> list[np.ndarray]:
        nonlocal num_buffered_tokens
        # Stable sort: equal lengths keep stream order, so the earliest of them is taken first.
        by_length = sorted(range(len(buffer)), key=lambda i: -len(buffer[i]))
        space = max_tokens
        chosen = []
        for i in by_length:
            n = len(buffer[i])
            if n <= space:
                chosen.append(i)
                space -= n
                if space == 0:
                    break
        chosen.sort()
        group = [buffer[i] for i in chosen]
        keep = set(range(len(buffer))) - set(chosen)
        buffer[:] = [buffer[i] for i in sorted(keep)]
        num_buffered_tokens -= max_tokens - space
        return group

    for index, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        if n > max_tokens:
            raise ValueError(
                f"sequence {index} has {n} tokens, more than max_tokens={max_tokens}; crop it first "
                f"(the loader's input policy does)"
            )
        buffer.append(seq)
        num_buffered_tokens += n
        # Also wait for a budget's worth of tokens: K short sequences alone cannot fill a large budget.
        if len(buffer) >= buffer_size and num_buffered_tokens >= max_tokens:
            yield take_group()
    while buffer:
        yield take_group()


def pack_groups(
    sequences: Iterable[np.ndarray], max_tokens: int, *, split_overflow: bool = False, buffer_size: int = 0
) -> Iterator[list[np.ndarray]]:
    """:func:`greedy_pack` with ``split_overflow`` or ``buffer_size <= 1``, else :func:`buffered_pack`."""
    if split_overflow or buffer_size <= 1:
        return greedy_pack(sequences, max_tokens, split_overflow=split_overflow)
    return buffered_pack(sequences, max_tokens, buffer_size)


def collate_packed(
    pieces: Sequence[TokenIds],
    *,
    pad_to_multiple_of: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    segments_multiple_of: int | None = None,
) -> dict[str, torch.Tensor | int]:
    """One packed micro-batch from ``pieces``: the THD keys of the model contract, labels = inputs (pad: -100).

    Keys: ``input_ids``, ``position_ids`` (restart at 0 per segment), ``labels`` (all ``[1, T]`` int64),
    ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32 ``[N + 1]``, the padding segment included), ``max_length_q`` =
    ``max_length_k`` (python ints). The objective collators rewrite ``labels``.

    ``segments_multiple_of`` appends empty segments (``cu_seq_lens`` repeats its last value) until ``N + 1`` is a
    multiple of it. Every micro-batch then has one of a few ``cu_seq_lens`` lengths instead of a new one for each
    sequence count: what CUDA graphs (``torch.compile`` mode ``reduce-overhead``) need to replay instead of
    recording again. Empty segments hold no tokens, so no output changes.
    """
    if segments_multiple_of is not None and segments_multiple_of < 1:
        raise ValueError(f"segments_multiple_of must be >= 1, got {segments_multiple_of}")
    arrays = [np.asarray(p, dtype=np.int64) for p in pieces]
    lengths = [len(a) for a in arrays]
    if not arrays or min(lengths) == 0:
        raise ValueError(f"collate_packed needs at least one non-empty sequence, got lengths {lengths}")
    num_real = sum(lengths)
    num_pad = (-num_real) % pad_to_multiple_of if pad_to_multiple_of else 0
    if num_pad:
        arrays.append(np.full(num_pad, pad_token_id, dtype=np.int64))
        lengths.append(num_pad)
    input_ids = np.concatenate(arrays)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    # Positions restart at 0 per segment: position = index - start of its segment.
    position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    if segments_multiple_of:
        cu = np.pad(cu, (0, (-len(cu)) % segments_multiple_of), mode="edge")
    labels = input_ids.copy()
    if num_pad:
        labels[num_real:] = IGNORE_INDEX
    cu_t = torch.from_numpy(cu)
    max_len = int(max(lengths))
    return {
        "input_ids": torch.from_numpy(input_ids)[None],
        "position_ids": torch.from_numpy(position_ids)[None],
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t.clone(),
        "max_length_q": max_len,
        "max_length_k": max_len,
        "labels": torch.from_numpy(labels)[None],
    }


def pack_sequences(
    token_id_lists: Iterable[TokenIds],
    max_tokens: int,
    *,
    pad_to_multiple_of: int | None = None,
    split_overflow: bool = False,
    buffer_size: int = 0,
    pad_token_id: int = PAD_TOKEN_ID,
) -> Iterator[dict[str, torch.Tensor | int]]:
    """Packs token sequences into micro-batches of at most ``max_tokens`` tokens: greedily in order, or with
    ``buffer_size > 1`` first-fit-decreasing over a lookahead buffer of that many sequences (:func:`buffered_pack`).

    Yields dicts with ``input_ids [1, T]``, ``position_ids [1, T]``, ``cu_seq_lens_q/k`` (int32 ``[N + 1]``),
    ``max_length_q/k`` (ints) and ``labels [1, T]`` (the inputs, -100 on padding; pass the batch through
    ``MLMCollator.apply`` or ``CLMCollator.apply`` for an objective's labels). With ``pad_to_multiple_of``, ``T``
    is rounded up by a final ``<pad>`` segment (``max_tokens`` must then be a multiple of it, so ``T <= max_tokens``
    always). ``split_overflow`` cuts a sequence that overflows the budget and continues it in the next micro-batch
    as a new segment (positions restart at 0); otherwise it starts the next micro-batch. ``split_overflow`` fills
    every micro-batch already, so it packs in order and ignores ``buffer_size``.
    """
    check_pack_budget(max_tokens, pad_to_multiple_of)
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) or buffer_size < 0:
        raise ValueError(f"buffer_size must be an integer >= 0, got {buffer_size!r}")
    arrays = (_token_array(ids, index) for index, ids in enumerate(token_id_lists))
    for group in pack_groups(arrays, max_tokens, split_overflow=split_overflow, buffer_size=buffer_size):
        yield collate_packed(group, pad_to_multiple_of=pad_to_multiple_of, pad_token_id=pad_token_id)


_VARLEN_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


def _self_attending_pack(batch: dict[str, Any]) -> torch.Tensor | None:
    """``cu_seq_lens_q`` of a packed ``[1, T]`` micro-batch whose queries and keys share the segments (what can be
    laid out as rows); ``None`` for anything else."""
    cu, input_ids = batch.get("cu_seq_lens_q"), batch.get("input_ids")
    if not isinstance(cu, torch.Tensor) or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return None
    cu_k = batch.get("cu_seq_lens_k")
    if input_ids.shape[0] != 1 or (isinstance(cu_k, torch.Tensor) and not torch.equal(cu_k, cu)):
        return None
    return cu


def uniform_pack_as_padded(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed micro-batch whose segments all have one length ``L`` and fill it exactly, as the padded ``[N, L]``
    batch of the same sequences, with no ``attention_mask`` (no key is padding); any other batch unchanged.

    Same tokens, same positions (``position_ids`` restart at 0 per segment, so each row is ``0 .. L-1``), same labels:
    every loss term and gradient is the packed batch's (a CLM label at a segment start is -100 already, so shifting
    within rows drops no target). What changes is the kernel: an unmasked dense batch of one shape runs attention
    through SDPA's dense kernels (cuDNN's fused ones on Hopper with torch 2.11: ``bioscale.models.attention``) instead
    of the varlen kernel, and compiles to one static graph. Geneformer corpora of cells longer than the context are
    such batches every step. Trailing empty segments (``segments_multiple_of``) are ignored; a padding segment makes
    the lengths unequal unless it too has length ``L``, in which case it becomes a row of ``<pad>`` with -100 labels
    (its own sequence either way). Batches with keys of other shapes are left alone.
    """
    cu = _self_attending_pack(batch)
    if cu is None:
        return batch
    lengths = cu.diff()
    lengths = lengths[lengths > 0]
    total = int(batch["input_ids"].shape[1])
    if len(lengths) < 2 or bool((lengths != lengths[0]).any()) or int(lengths[0]) * len(lengths) != total:
        return batch
    rows, width = len(lengths), int(lengths[0])
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in _VARLEN_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            if tuple(value.shape) != (1, total):
                return batch
            value = value.reshape(rows, width)
        out[key] = value
    return out


# At most this many rows of <pad> complete a pack's rows (rows_and_rest): each is a row of wasted compute, against the
# varlen kernel's ~1.7x cost per attention call on the whole pack (H100 / H200, head size 64, torch 2.11).
MAX_PAD_ROWS = 2
_ROW_KEYS = frozenset({"input_ids", "labels", "position_ids"})


def rows_and_rest(
    batch: dict[str, Any], *, max_tokens: int, pad_token_id: int = PAD_TOKEN_ID, multiple: int = 1,
    max_pad_rows: int = MAX_PAD_ROWS,
) -> list[dict[str, Any]]:  # fmt: skip
    """The micro-batches a packed micro-batch runs as, with the same loss terms and gradients (summed over them):

    - a uniform pack (:func:`uniform_pack_as_padded`): its rows, ``[N, L]``;
    - a pack mostly of segments of its longest length ``L`` (Geneformer cells cut to the context, with a few shorter
      cells or an epoch's last cells): those segments as rows ``[max_tokens // L, L]``, completed by at most
      ``max_pad_rows`` rows of ``<pad>`` (labels -100, their own sequences: no loss, no gradient), so the shape is
      the uniform packs' one static shape; and the other segments as a packed micro-batch (``cu_seq_lens`` rebuilt,
      positions as they were), left out when it has no label to score (nothing in the loss depends on it);
    - any other batch: ``[batch]``.

    Attention then runs the dense unmasked kernels on all but a few sequences; the trainer sums the micro-batches'
    loss sums and divides once by the step's label count, so splitting a micro-batch changes no gradient. The rest
    keeps ``T`` a multiple of ``multiple`` (``data.pad_to_multiple_of``) or the batch stays packed. Batches carrying
    tensors other than ``input_ids`` / ``labels`` / ``position_ids`` and the varlen metadata are left alone (there is
    no telling what a padding row of them would be).
    """
    rows = uniform_pack_as_padded(batch)
    if rows is not batch:
        return [rows]
    cu = _self_attending_pack(batch)
    if cu is None:
        return [batch]
    total = int(batch["input_ids"].shape[1])
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in _VARLEN_KEYS}
    if set(tensors) - _ROW_KEYS or "input_ids" not in tensors or any(v.shape != (1, total) for v in tensors.values()):
        return [batch]
    starts, lengths = cu[:-1].long(), cu.diff().long()
    width = int(lengths.max())
    full = (lengths == width).nonzero().squeeze(1)
    count, num_rows = len(full), max_tokens // width
    if count < 2 or count > num_rows or num_rows - count > max_pad_rows or (total - count * width) % max(multiple, 1):
        return [batch]
    token_index = (starts[full, None] + torch.arange(width)).reshape(-1)
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    padding = num_rows - count
    out_rows: dict[str, Any] = {k: v for k, v in batch.items() if k not in _VARLEN_KEYS and k not in tensors}
    for key, value in tensors.items():
        value_rows = value[0, token_index].reshape(count, width)
        if key == "position_ids":
            pad = torch.arange(width, dtype=value.dtype).expand(padding, width)
        else:
            pad = value.new_full((padding, width), fill[key])
        out_rows[key] = torch.cat([value_rows, pad]) if padding else value_rows
    pieces = [out_rows]
    rest_tokens = torch.ones(total, dtype=torch.bool)
    rest_tokens[token_index] = False
    rest_lengths = lengths[(lengths > 0) & (lengths != width)]
    rest_labels = tensors.get("labels", tensors["input_ids"])[0, rest_tokens]
    if len(rest_lengths) and bool((rest_labels != IGNORE_INDEX).any()):
        rest: dict[str, Any] = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
        rest.update({key: value[:, rest_tokens] for key, value in tensors.items()})
        rest_cu = torch.zeros(len(rest_lengths) + 1, dtype=cu.dtype)
        rest_cu[1:] = rest_lengths.cumsum(0)
        rest.update(cu_seq_lens_q=rest_cu, cu_seq_lens_k=rest_cu.clone())
        for key in ("max_length_q", "max_length_k"):
            if key in batch:
                rest[key] = int(rest_lengths.max())
        pieces.append(rest)
    return pieces


def pad_sequences(
    sequences: Sequence[TokenIds], *, pad_token_id: int = PAD_TOKEN_ID, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """A padded (BSHD) batch: ``input_ids`` and ``attention_mask`` ``[B, S]``, S = longest (rounded up to the
    multiple), sequences left-aligned; ``labels`` = inputs with -100 on padding."""
    if not sequences:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max())
    if pad_to_multiple_of:
        width += (-width) % pad_to_multiple_of
    input_ids = np.full((len(sequences), width), pad_token_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
    attention_mask = np.arange(width)[None, :] < lengths[:, None]
    labels = np.where(attention_mask, input_ids, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
    }


def count_tokens(batch: dict[str, torch.Tensor | int], *, pad_token_id: int = PAD_TOKEN_ID) -> dict[str, int]:
    """Token counts of a padded or packed batch, as python ints.

    ``num_tokens``: all positions, padding included (what the GPU computes); ``num_real_tokens``: non-padding
    positions (from ``attention_mask`` when present, else ``input_ids != pad_token_id``: packed batches only pad with
    ``<pad>``); ``num_label_tokens``: ``labels != -100`` (the loss normaliser); ``num_sequences``: real sequences
    (segments, for packed batches).
    """
    if "input_ids" not in batch and isinstance(batch.get("pixel_values"), torch.Tensor):
        # An image batch (bioscale.data.images): each image counts as one token, one sequence of length 1. Every image
        # has the same number of patch tokens, fixed by the model, so images/s is the throughput and the image
        # families' flops_per_token is per image (bioscale.models.vit.spec).
        num_images = int(batch["pixel_values"].shape[0])
        labels = batch.get("labels")
        num_label = int((labels != IGNORE_INDEX).sum()) if isinstance(labels, torch.Tensor) else 0
        return {"num_tokens": num_images, "num_real_tokens": num_images, "num_label_tokens": num_label,
                "num_sequences": num_images}  # fmt: skip
    input_ids = batch["input_ids"]
    assert isinstance(input_ids, torch.Tensor)
    num_tokens = input_ids.numel()
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        num_real = int(mask.sum())
        num_sequences = int((mask.sum(-1) > 0).sum()) if mask.dim() > 1 else 1
    else:
        not_pad = input_ids != pad_token_id
        num_real = int(not_pad.sum())
        cu = batch.get("cu_seq_lens_q")
        # Rows without a mask (uniform_pack_as_padded) are one sequence each: those holding any real token.
        num_sequences = int(not_pad.reshape(input_ids.shape[0], -1).any(-1).sum()) if input_ids.dim() > 1 else 1
        if isinstance(cu, torch.Tensor):
            num_sequences = len(cu) - 1 - int(num_real < num_tokens)  # the last segment is padding if any
    labels = batch.get("labels")
    num_label = int((labels != IGNORE_INDEX).sum()) if isinstance(labels, torch.Tensor) else 0
    return {
        "num_tokens": num_tokens,
        "num_real_tokens": num_real,
        "num_label_tokens": num_label,
        "num_sequences": num_sequences,
    }
