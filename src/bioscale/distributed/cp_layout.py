"""The dual-chunk layout of context parallelism: which rank holds which token, and how batches are sharded and restored.

Under context parallelism (CP) over ``cp_size`` ranks, every sequence of a micro-batch is padded to a multiple of
``2 * cp_size`` tokens and cut into ``2 * cp_size`` equal chunks; rank ``r`` holds chunks ``r`` and
``2 * cp_size - 1 - r`` of *every* sequence (the "dual chunk" / zig-zag assignment of Megatron-LM and the Llama 3
paper). With causal attention a chunk's cost grows with its index, so pairing an early chunk with its mirror gives every
rank the same attention work, and every rank holds the same number of tokens (collectives need equal sizes).

Padded (BSHD) and packed (THD) batches share one description: a "sequence" is a row of a padded batch or a segment of
a packed one, and both are handled in the flattened token order, so a padded batch ``[B, S]`` is the packed case with
``B`` sequences of ``S`` tokens. :class:`CPLayout` is that description (host-side numpy, built once per micro-batch);
:func:`shard_batch_for_cp` turns a model batch into one rank's shard plus its layout, :func:`unshard_from_cp` restores
the original order from all ranks' shards, and :meth:`CPLayout.attention_plan` gives the index tensors the attention
kernels need (see :mod:`bioscale.distributed.context_parallel`). Nothing here communicates.

Conventions of a sharded batch: ``position_ids`` are the *global* positions (RoPE needs them); padding added for
divisibility is ``pad_token_id`` with label ``-100`` and is never attended to by a real token; causal-LM labels are
shifted *before* sharding (the next token of a chunk's last token lives on another rank) and travel as
``shift_labels``, which the causal-LM model uses as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from bioscale.constants import IGNORE_INDEX, PAD_TOKEN_ID
from bioscale.models.loss import shift_labels as shift_next_token_labels


# Keys of a model batch that shard_batch_for_cp understands (bioscale.data's padded and packed micro-batches).
_TOKEN_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class CPAttentionPlan:
    """Index tensors (on one device) that let a rank's local queries attend to the gathered keys of the CP group.

    The keys of all ranks are all-gathered rank-major into one buffer of ``cp_size * num_local_tokens`` rows (rank
    ``r``'s local tokens at rows ``r * num_local_tokens + t``); each index below selects buffer rows.

    Attributes:
        num_local_tokens: ``T_loc``, tokens per rank (``B * 2C`` for a padded batch), the same on every rank.
        varlen_kv_index: keys in varlen-kernel order: one key segment per query segment (see ``cu_seqlens_k``).
        cu_seqlens_q / cu_seqlens_k: int32 varlen boundaries. Causal: two query segments per sequence (its two local
            chunks), each with the key prefix that ends at the chunk's end (flash-attention aligns a causal mask at the
            bottom-right when there are more keys than queries, so that is exactly causal masking). Bidirectional:
            one query segment per sequence (both chunks), its keys the sequence's attendable tokens.
        max_seqlen_q / max_seqlen_k: the longest segments, as Python ints.
        dense_kv_index: every key in global (padded) order, for the dense-mask and FlexAttention paths.
        q_seq / q_pos: ``[T_loc]`` sequence index and offset within the padded sequence of each local query.
        k_seq / k_pos: ``[T_pad]`` the same for every key in global order.
        k_attendable: ``[T_pad]`` bool, keys that a bidirectional query may see (not padding).
    """

    causal: bool
    num_local_tokens: int
    varlen_kv_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    dense_kv_index: torch.Tensor
    q_seq: torch.Tensor
    q_pos: torch.Tensor
    k_seq: torch.Tensor
    k_pos: torch.Tensor
    k_attendable: torch.Tensor

    def dense_mask(self) -> torch.Tensor:
        """``[1, 1, T_loc, T_pad]`` bool, True where a local query may attend to a key (global order)."""
        same = self.q_seq[:, None] == self.k_seq[None, :]
        if self.causal:
            allowed = self.k_pos[None, :] <= self.q_pos[:, None]
        else:
            allowed = self.k_attendable[None, :].expand_as(same)
        return (same & allowed)[None, None]


@dataclass(frozen=True, eq=False)
class CPLayout:
    """Where every token of one micro-batch lives under context parallelism (host-side; only ``cp_rank`` differs
    between the ranks of a CP group).

    Attributes:
        cp_rank / cp_size: this rank and the CP group size.
        packed: the batch is THD (``[1, T]`` with ``cu_seq_lens``) rather than padded rows.
        input_shape: ``(B, S)`` of the original token tensors (``(1, T)`` when packed).
        seq_lengths: int64 ``[N]`` tokens of each sequence in the original tensors (padded: ``S`` for every row).
        key_lengths: int64 ``[N]`` leading tokens of each sequence that may be attended to (packed: all of them;
            padded: the attention mask's count — rows must be right-padded).
    """

    cp_rank: int
    cp_size: int
    packed: bool
    input_shape: tuple[int, int]
    seq_lengths: np.ndarray
    key_lengths: np.ndarray

    def __post_init__(self) -> None:
        assert 0 <= self.cp_rank < self.cp_size, (self.cp_rank, self.cp_size)
        assert self.seq_lengths.shape == self.key_lengths.shape
        assert int(self.seq_lengths.sum()) == self.input_shape[0] * self.input_shape[1]

    # ---- per-sequence sizes ------------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return len(self.seq_lengths)

    @functools.cached_property
    def chunk_lengths(self) -> np.ndarray:
        """``C_i``: tokens per chunk of sequence ``i`` (its padded length is ``2 * cp_size * C_i``)."""
        num_chunks = 2 * self.cp_size
        return (self.seq_lengths + num_chunks - 1) // num_chunks

    @functools.cached_property
    def padded_lengths(self) -> np.ndarray:
        return self.chunk_lengths * 2 * self.cp_size

    @functools.cached_property
    def padded_starts(self) -> np.ndarray:
        """Offset of each sequence in the padded global token order (``[N + 1]``, last = ``T_pad``)."""
        return np.concatenate([[0], np.cumsum(self.padded_lengths)]).astype(np.int64)

    @property
    def num_padded_tokens(self) -> int:
        return int(self.padded_starts[-1])

    @property
    def num_local_tokens(self) -> int:
        """Tokens each rank holds: ``T_pad / cp_size``."""
        return self.num_padded_tokens // self.cp_size

    @property
    def local_shape(self) -> tuple[int, int]:
        """Shape of this rank's token tensors: ``(1, T_loc)`` packed, ``(B, 2C)`` padded."""
        if self.packed:
            return (1, self.num_local_tokens)
        return (self.input_shape[0], self.num_local_tokens // self.input_shape[0])

    @functools.cached_property
    def local_cu_seqlens(self) -> np.ndarray:
        """int32 ``[N + 1]`` boundaries of the sequences in a rank's local tokens (``2 * C_i`` each)."""
        return np.concatenate([[0], np.cumsum(2 * self.chunk_lengths)]).astype(np.int32)

    # ---- token maps --------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _padded_token_info(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every padded global position: ``(sequence index, offset in the sequence, gathered-buffer row)``."""
        num_chunks = 2 * self.cp_size
        seq = np.repeat(np.arange(self.num_sequences, dtype=np.int64), self.padded_lengths)
        offset = np.arange(self.num_padded_tokens, dtype=np.int64) - self.padded_starts[:-1][seq]
        chunk_len = self.chunk_lengths[seq]
        chunk, within = np.divmod(offset, np.maximum(chunk_len, 1))
        second = chunk >= self.cp_size
        owner = np.where(second, num_chunks - 1 - chunk, chunk)
        local_start = self.padded_starts[:-1][seq] // self.cp_size  # = sum of 2*C_j over earlier sequences
        local_pos = local_start + second * chunk_len + within
        return seq, offset, owner * self.num_local_tokens + local_pos

    @property
    def global_to_buffer(self) -> np.ndarray:
        """``[T_pad]``: row of the rank-major gathered buffer that holds each padded global position."""
        return self._padded_token_info[2]

    @functools.cached_property
    def local_to_global(self) -> np.ndarray:
        """``[cp_size, T_loc]``: padded global position of every local token of every rank (dual-chunk order)."""
        out = np.empty(self.num_padded_tokens, dtype=np.int64)
        out[self.global_to_buffer] = np.arange(self.num_padded_tokens, dtype=np.int64)
        return out.reshape(self.cp_size, self.num_local_tokens)

    @functools.cached_property
    def original_to_padded(self) -> np.ndarray:
        """``[B * S]``: padded global position of every token of the original (flattened) tensors."""
        num_original = int(self.seq_lengths.sum())
        seq = np.repeat(np.arange(self.num_sequences, dtype=np.int64), self.seq_lengths)
        original_starts = np.concatenate([[0], np.cumsum(self.seq_lengths)[:-1]]).astype(np.int64)
        return np.arange(num_original, dtype=np.int64) - original_starts[seq] + self.padded_starts[:-1][seq]

    # ---- sharding ----------------------------------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, fill: float, *, rank: int | None = None) -> torch.Tensor:
        """This rank's (or ``rank``'s) shard of ``x`` ``[*input_shape, ...]``: ``[*local_shape, ...]``.

        Padding positions (added for divisibility) get ``fill``.
        """
        rank = self.cp_rank if rank is None else rank
        if tuple(x.shape[:2]) != self.input_shape:
            raise ValueError(f"tensor of shape {tuple(x.shape)} does not match the batch's tokens {self.input_shape}")
        flat = x.reshape(-1, *x.shape[2:])
        padded = flat.new_full((self.num_padded_tokens, *x.shape[2:]), fill)
        padded[torch.from_numpy(self.original_to_padded).to(x.device)] = flat
        local = padded[torch.from_numpy(self.local_to_global[rank]).to(x.device)]
        return local.reshape(*self.local_shape, *x.shape[2:])

    def unshard(self, shards: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The original tensor ``[*input_shape, ...]`` from every rank's shard (``[cp_size, *local_shape, ...]`` or a
        list of ``cp_size`` shards in rank order); padding added for divisibility is dropped."""
        stacked = torch.stack(list(shards)) if not isinstance(shards, torch.Tensor) else shards
        if tuple(stacked.shape[:3]) != (self.cp_size, *self.local_shape):
            raise ValueError(f"expected {self.cp_size} shards of shape {self.local_shape}, got {tuple(stacked.shape)}")
        buffer = stacked.reshape(self.cp_size * self.num_local_tokens, *stacked.shape[3:])
        rows = self.global_to_buffer[self.original_to_padded]
        original = buffer[torch.from_numpy(rows).to(buffer.device)]
        return original.reshape(*self.input_shape, *stacked.shape[3:])

    # ---- attention metadata ------------------------------------------------------------------------------------------
    def attention_plan(self, causal: bool, device: torch.device | str) -> CPAttentionPlan:
        """The index tensors CP attention needs for this rank (see :class:`CPAttentionPlan`), on ``device``."""
        seq, offset, to_buffer = self._padded_token_info
        chunk = self.chunk_lengths
        starts = self.padded_starts[:-1]
        live = np.flatnonzero(chunk)  # sequences with no token have no segment
        key_lengths = np.maximum(self.key_lengths, 1)  # a row of padding only sees its first token (no empty row)
        if causal:
            first, second = self.cp_rank, 2 * self.cp_size - 1 - self.cp_rank
            q_lengths = np.stack([chunk[live], chunk[live]], axis=1).reshape(-1)
            k_lengths = np.stack([(first + 1) * chunk[live], (second + 1) * chunk[live]], axis=1).reshape(-1)
            k_starts = np.repeat(starts[live], 2)
        else:
            q_lengths = 2 * chunk[live]
            k_lengths = np.minimum(key_lengths, self.padded_lengths)[live]
            k_starts = starts[live]
        key_positions = _ranges(k_starts, k_lengths)
        local_global = self.local_to_global[self.cp_rank]

        def tensor(array: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

        return CPAttentionPlan(
            causal=causal,
            num_local_tokens=self.num_local_tokens,
            varlen_kv_index=tensor(to_buffer[key_positions]),
            cu_seqlens_q=tensor(_cumsum0(q_lengths), torch.int32),
            cu_seqlens_k=tensor(_cumsum0(k_lengths), torch.int32),
            max_seqlen_q=int(q_lengths.max(initial=0)),
            max_seqlen_k=int(k_lengths.max(initial=0)),
            dense_kv_index=tensor(to_buffer),
            q_seq=tensor(seq[local_global]),
            q_pos=tensor(offset[local_global]),
            k_seq=tensor(seq),
            k_pos=tensor(offset),
            k_attendable=tensor(offset < key_lengths[seq], torch.bool),
        )


class CPShard(NamedTuple):
    """One rank's shard of a micro-batch: ``batch`` goes to ``model(**batch)``, ``layout`` to the CP context."""

    batch: dict[str, Any]
    layout: CPLayout


def shard_batch_for_cp(
    batch: Mapping[str, Any],
    cp_rank: int,
    cp_size: int,
    *,
    shift_labels: bool = False,
    pad_token_id: int = PAD_TOKEN_ID,
) -> CPShard:
    """Rank ``cp_rank``'s shard of a padded or packed model batch, and the layout that describes it.

    Args:
        batch: a micro-batch as ``bioscale.data`` builds it: padded (``input_ids [B, S]``, optional
            ``attention_mask``, ``labels``, ``position_ids``) or packed (``input_ids [1, T]``, ``cu_seq_lens_q/k``,
            ``max_length_q/k``, ``position_ids``, ``labels``). Every CP rank passes the same batch.
        cp_rank / cp_size: this rank's index in its CP group and the group size.
        shift_labels: causal LM: shift ``labels`` to next-token targets per sequence *before* sharding and return them
            as ``shift_labels`` (the causal-LM model uses them as they are); masked LM and token tasks: False.
        pad_token_id: token id of the padding added so each sequence splits into ``2 * cp_size`` equal chunks.

    Returns:
        ``CPShard(batch, layout)``: ``batch`` has the same keys (``labels`` renamed ``shift_labels`` when shifted),
        token tensors ``[1, T_pad / cp_size]`` (packed) or ``[B, 2C]`` (padded) with global ``position_ids``, and
        local ``cu_seq_lens_q/k`` / ``max_length_q/k`` describing each sequence's two chunks.

    Raises:
        ValueError: for an unknown key, inconsistent packed metadata, a padded batch that is not right-padded, or
            ``cp_rank`` outside ``[0, cp_size)``.
    """
    if not (isinstance(cp_size, int) and cp_size >= 1 and isinstance(cp_rank, int) and 0 <= cp_rank < cp_size):
        raise ValueError(f"shard_batch_for_cp: need 0 <= cp_rank < cp_size, got cp_rank={cp_rank}, cp_size={cp_size}")
    unknown = sorted(set(batch) - set(_TOKEN_KEYS) - set(_PACKED_KEYS))
    if unknown:
        raise ValueError(
            f"shard_batch_for_cp: batch keys {unknown} are not understood (known: "
            f"{sorted(_TOKEN_KEYS + _PACKED_KEYS)}); context parallelism cannot tell how to split them along the "
            "sequence"
        )
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"shard_batch_for_cp: input_ids must be a [B, S] or [1, T] tensor, got {_describe(input_ids)}")
    for key in _TOKEN_KEYS:
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != input_ids.shape):
            raise ValueError(
                f"shard_batch_for_cp: {key} must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {_describe(value)}"
            )
    packed = batch.get("cu_seq_lens_q") is not None
    if packed:
        layout, cu_seqlens = _packed_layout(batch, input_ids, cp_rank, cp_size)
    else:
        layout, cu_seqlens = _padded_layout(batch, input_ids, cp_rank, cp_size), None

    out: dict[str, Any] = {"input_ids": layout.shard(input_ids, pad_token_id)}
    # Global positions: a sequence's offset in its padded sequence, or the caller's positions where given.
    positions = torch.from_numpy(layout._padded_token_info[1]).to(input_ids.device)
    if batch.get("position_ids") is not None:
        positions[torch.from_numpy(layout.original_to_padded).to(input_ids.device)] = (
            batch["position_ids"].reshape(-1).to(positions.dtype)
        )
    local = positions[torch.from_numpy(layout.local_to_global[cp_rank]).to(input_ids.device)]
    out["position_ids"] = local.reshape(layout.local_shape)
    labels = batch.get("labels")
    if labels is not None:
        if shift_labels:
            out["shift_labels"] = layout.shard(shift_next_token_labels(labels, cu_seqlens), IGNORE_INDEX)
        else:
            out["labels"] = layout.shard(labels, IGNORE_INDEX)
    if packed:
        cu = torch.from_numpy(layout.local_cu_seqlens).to(batch["cu_seq_lens_q"].device)
        max_length = int((2 * layout.chunk_lengths).max(initial=0))
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max_length, max_length_k=max_length)
    elif batch.get("attention_mask") is not None or layout.num_padded_tokens != input_ids.numel():
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        out["attention_mask"] = layout.shard(mask, 0)
    return CPShard(out, layout)


def unshard_from_cp(shards: Sequence[torch.Tensor] | torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """Inverse of the sharding: every rank's shard (rank order) → the tensor in the original batch's token order."""
    return layout.unshard(shards)


# ---- helpers --------------------------------------------------------------------------------------------------------


def _packed_layout(
    batch: Mapping[str, Any], input_ids: torch.Tensor, cp_rank: int, cp_size: int
) -> tuple[CPLayout, torch.Tensor]:
    if input_ids.shape[0] != 1:
        raise ValueError(f"shard_batch_for_cp: a packed batch must be [1, T], got input_ids {tuple(input_ids.shape)}")
    if batch.get("attention_mask") is not None:
        raise ValueError("shard_batch_for_cp: a packed batch (cu_seq_lens_q given) must not have an attention_mask")
    cu_q = batch["cu_seq_lens_q"]
    cu_k = batch.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor) or cu_q.dim() != 1 or cu_q.numel() < 2:
        raise ValueError(f"shard_batch_for_cp: cu_seq_lens_q must be a 1-D tensor [N + 1], got {_describe(cu_q)}")
    cu = cu_q.detach().cpu().numpy().astype(np.int64)
    if cu_k is not None and not np.array_equal(cu, cu_k.detach().cpu().numpy()):
        raise ValueError("shard_batch_for_cp: cu_seq_lens_k differs from cu_seq_lens_q (self-attention needs one set)")
    lengths = np.diff(cu)
    if cu[0] != 0 or (lengths < 0).any() or cu[-1] != input_ids.shape[1]:
        raise ValueError(
            f"shard_batch_for_cp: cu_seq_lens_q must start at 0, be non-decreasing and end at the token count "
            f"{input_ids.shape[1]}; got {cu.tolist()[:8]}{'...' if len(cu) > 8 else ''}"
        )
    layout = CPLayout(cp_rank, cp_size, True, (1, int(input_ids.shape[1])), lengths, lengths.copy())
    return layout, cu_q


def _padded_layout(batch: Mapping[str, Any], input_ids: torch.Tensor, cp_rank: int, cp_size: int) -> CPLayout:
    rows, width = (int(n) for n in input_ids.shape)
    for key in ("max_length_q", "max_length_k", "cu_seq_lens_k"):
        if batch.get(key) is not None:
            raise ValueError(f"shard_batch_for_cp: {key} was given without cu_seq_lens_q; a packed batch needs both")
    mask = batch.get("attention_mask")
    if mask is None:
        key_lengths = np.full(rows, width, dtype=np.int64)
    else:
        valid = mask.detach().cpu().numpy() != 0
        key_lengths = valid.sum(axis=1).astype(np.int64)
        right_padded = np.arange(width)[None, :] < key_lengths[:, None]
        bad = np.flatnonzero((valid != right_padded).any(axis=1))
        if bad.size:
            raise ValueError(
                f"shard_batch_for_cp: attention_mask row {int(bad[0])} is not right-padded (ones, then zeros); "
                "context parallelism supports right-padded rows (what bioscale's collators build) or packed batches"
            )
    return CPLayout(cp_rank, cp_size, False, (rows, width), np.full(rows, width, dtype=np.int64), key_lengths)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start, start + length)`` for each pair (vectorised)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    segment = np.repeat(np.arange(len(lengths)), lengths)
    begin = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts[segment] + np.arange(total, dtype=np.int64) - begin[segment]


def _cumsum0(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__
