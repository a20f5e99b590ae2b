"""Turns the two calling conventions of a bioscale model into one :class:`Batch`, and checks them.

A model is called like its ``transformers`` counterpart, either *padded* (``input_ids [B, S]`` with an optional
``attention_mask [B, S]``) or *packed* (``input_ids [1, T]`` or ``[T]`` holding several sequences back to back, with
``cu_seq_lens_q/k`` int32 ``[N + 1]``, ``max_length_q/k`` and ``position_ids`` that restart at 0 for every sequence;
the names ``DataCollatorWithFlattening`` produces). :func:`prepare_batch` validates the arguments once per forward and
returns a :class:`Batch` that the model's embedding, attention metadata, token-dropout, pooling and loss code all read.
Callers that opt in (``derive_packing=True``) may also pass the collator's other packed forms, a ``[1, T]`` row whose
``position_ids`` restart or that carries ``seq_idx``; the boundaries are then derived (:func:`packing_from_flattening`).

Checks that only need shapes and dtypes always run. Checks that read tensor values (token ids inside the vocabulary,
``cu_seq_lens`` starting at 0, non-decreasing, ending at the token count, position ids agreeing with them) cost one
host synchronisation per forward; they run in eager mode while :func:`input_validation_enabled` is true (the default)
and are skipped while ``torch.compile`` traces, so a compiled steady state never syncs. A trainer that has validated
its data pipeline can switch them off with ``set_input_validation(False)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_VALIDATE_INPUTS = True


def set_input_validation(enabled: bool) -> None:
    """Turn the value checks of :func:`prepare_batch` on or off for the whole process (on by default)."""
    global _VALIDATE_INPUTS
    _VALIDATE_INPUTS = bool(enabled)


def input_validation_enabled() -> bool:
    """Whether value checks run now: enabled and not inside a ``torch.compile`` trace."""
    return _VALIDATE_INPUTS and not torch.compiler.is_compiling()


@contextlib.contextmanager
def input_validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_input_validation` that restores the previous setting."""
    previous = _VALIDATE_INPUTS
    set_input_validation(enabled)
    try:
        yield
    finally:
        set_input_validation(previous)


@dataclass(frozen=True)
class Batch:
    """A validated model input, always 2-D (packed inputs are ``[1, T]``).

    Attributes:
        input_ids: ``[B, S]`` token ids.
        position_ids: ``[B, S]`` positions for RoPE (restarting per sequence when packed).
        attention_mask: padded batches only: ``[B, S_kv]`` with 1 for real tokens (``S_kv`` includes a KV cache);
            ``None`` when every token is real.
        cu_seqlens: packed batches only: int32 ``[N + 1]`` sequence boundaries.
        max_seqlen: packed batches only: the longest sequence (a Python int, as the varlen kernel needs).
        sequence_ids: packed batches only: ``[T]`` index of the sequence each token belongs to.
        unbatched: the caller passed ``input_ids`` of shape ``[T]``; outputs drop the batch dimension again.
        past_length: number of tokens already in the KV cache (decoding), else 0.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    sequence_ids: torch.Tensor | None = None
    unbatched: bool = False
    past_length: int = 0

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_sequences(self) -> int:
        """Number of sequences: ``N`` when packed, ``B`` when padded (known from shapes, no sync)."""
        if self.cu_seqlens is not None:
            return self.cu_seqlens.numel() - 1
        return self.input_ids.shape[0]


def labels_like(labels: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``labels`` shaped like ``batch.input_ids`` (accepts ``[T]`` labels for unbatched packed inputs)."""
    if batch.unbatched and labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.shape != batch.input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input_ids shape {tuple(batch.input_ids.shape)}"
        )
    return labels.to(batch.input_ids.device)


def unbatch(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Drop the batch dimension again when the caller passed ``[T]`` inputs."""
    return x.squeeze(0) if batch.unbatched else x


def sequence_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` index of the sequence each packed token belongs to (sync-free)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` positions restarting at 0 at every sequence boundary (sync-free)."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.long)
    starts = cu_seqlens.long()[sequence_ids_from_cu_seqlens(cu_seqlens, num_tokens)]
    return tokens - starts


def prepare_batch(
    input_ids: torch.Tensor | None,
    *,
    vocab_size: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
    max_length_k: int | torch.Tensor | None = None,
    past_length: int = 0,
    seq_idx: torch.Tensor | None = None,
    derive_packing: bool = False,
) -> Batch:
    """Validate a forward call's inputs and normalise them to a :class:`Batch`.

    ``derive_packing``: a ``[1, T]`` row without ``cu_seq_lens_q/k`` and without ``attention_mask`` whose ``seq_idx``
    is given or whose ``position_ids`` restart is a packed batch (``DataCollatorWithFlattening``'s default output and
    its ``return_seq_idx`` form); its boundaries come from :func:`packing_from_flattening`. ``seq_idx`` given with
    ``cu_seq_lens_q`` must agree with it.

    Raises:
        ValueError: naming the offending argument for wrong shapes or dtypes, packed metadata that is missing or
            inconsistent, a padding mask on a packed batch, or token ids outside ``[0, vocab_size)``.
    """
    if input_ids is None:
        raise ValueError("input_ids is required (inputs_embeds is not supported by bioscale models)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int64 or int32 tensor, got {_describe(input_ids)}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids must be [B, S] (padded) or [1, T] / [T] (packed), got shape {tuple(input_ids.shape)}"
        )
    unbatched = input_ids.dim() == 1
    if unbatched:
        input_ids = input_ids.unsqueeze(0)
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if seq_idx is not None and seq_idx.dim() == 1:
            seq_idx = seq_idx.unsqueeze(0)
    input_ids = input_ids.long()
    batch_size, seq_len = input_ids.shape
    if seq_len == 0:
        raise ValueError("input_ids has no tokens (sequence length 0)")
    if position_ids is not None and tuple(position_ids.shape) != (batch_size, seq_len):
        raise ValueError(
            f"position_ids shape {tuple(position_ids.shape)} does not match input_ids shape {(batch_size, seq_len)}"
        )

    if seq_idx is not None and tuple(seq_idx.shape) != (batch_size, seq_len):
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} does not match input_ids shape {(batch_size, seq_len)}")
    if cu_seq_lens_q is None and cu_seq_lens_k is not None:
        cu_seq_lens_q = cu_seq_lens_k
    if derive_packing and cu_seq_lens_q is None and attention_mask is None and past_length == 0:
        derived = packing_from_flattening(input_ids, position_ids, seq_idx)
        if derived is not None and max_length_q is None and max_length_k is None:
            cu_seq_lens_q, max_length_q = derived
        elif derived is not None:
            cu_seq_lens_q = derived[0]
    if cu_seq_lens_q is None:
        if max_length_q is not None or max_length_k is not None:
            raise ValueError("max_length_q/k were given without cu_seq_lens_q/k; packed batches need both")
        if seq_idx is not None:
            raise ValueError("seq_idx marks the sequences of a flattened [1, T] batch (DataCollatorWithFlattening)")
        return _prepare_padded(input_ids, attention_mask, position_ids, vocab_size, past_length, unbatched)
    batch = _prepare_packed(
        input_ids,
        attention_mask,
        position_ids,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        vocab_size,
        past_length,
        unbatched,
    )
    if seq_idx is not None and input_validation_enabled():
        assert batch.sequence_ids is not None
        _raise_if_any(
            [(seq_idx.reshape(-1).to(batch.sequence_ids.device) != batch.sequence_ids).any()],
            ["seq_idx does not agree with cu_seq_lens_q"],
            input_ids,
        )
    return batch


def packing_from_flattening(
    input_ids: torch.Tensor, position_ids: torch.Tensor | None, seq_idx: torch.Tensor | None
) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens, max_seqlen)`` of a ``[1, T]`` batch flattened without boundary metadata, or ``None``.

    ``DataCollatorWithFlattening`` by default returns ``position_ids`` that restart per sequence and no
    ``cu_seq_lens``; with ``return_seq_idx`` it also returns ``seq_idx`` (the sequence of every token). A sequence
    starts where ``seq_idx`` changes, or else where the positions do not step by 1 (stock ``transformers`` models
    detect packing from position ids the same way). ``None``: a single sequence (or no position information at all,
    which is indistinguishable from one), left to the padded path. Costs one device-to-host copy of ``T`` flags:
    collators that know the boundaries should send ``cu_seq_lens_q/k`` (``return_flash_attn_kwargs=True``) instead.
    """
    if input_ids.shape[0] != 1:
        return None
    num_tokens = input_ids.shape[1]
    if seq_idx is not None:
        marks = seq_idx.reshape(-1)
        starts = torch.ones(num_tokens, dtype=torch.bool, device=marks.device)
        starts[1:] = marks[1:] != marks[:-1]
    elif position_ids is not None:
        positions = position_ids.reshape(-1)
        starts = torch.ones(num_tokens, dtype=torch.bool, device=positions.device)
        starts[1:] = positions[1:] != positions[:-1] + 1
    else:
        return None
    start_index = starts.cpu().nonzero().flatten()
    if start_index.numel() == 1 and seq_idx is None:
        return None
    cu_seqlens = torch.cat([start_index, torch.tensor([num_tokens])]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    return cu_seqlens.to(input_ids.device), max_seqlen


def _prepare_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    vocab_size: int,
    past_length: int,
    unbatched: bool,
) -> Batch:
    batch_size, seq_len = input_ids.shape
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask must be [B, S] = {(batch_size, past_length + seq_len)} for padded inputs, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] != past_length + seq_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens but the batch has {seq_len} new tokens "
                f"after {past_length} cached ones"
            )
    float_mask = attention_mask is not None and attention_mask.dtype.is_floating_point
    if float_mask:
        # transformers accepts a 0/1 float mask (e.g. torch.ones(B, S)); an additive mask (0 / -inf) is refused below.
        float_mask_is_binary = ((attention_mask == 0) | (attention_mask == 1)).all()
        attention_mask = attention_mask != 0
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + seq_len, device=input_ids.device).expand(batch_size, -1)
    if input_validation_enabled():
        checks = [input_ids.min() < 0, input_ids.max() >= vocab_size]
        names = ["token ids < 0", f"token ids >= vocab_size ({vocab_size})"]
        if float_mask:
            checks.append(~float_mask_is_binary)
            names.append("a float attention_mask must hold only 0 and 1 (1 = real token), not an additive mask")
        if attention_mask is None and past_length == 0:
            # Positions that do not step by 1 mean several sequences were packed into a row without boundaries:
            # attention would silently cross them.
            checks.append(
                (position_ids.diff(dim=-1) != 1).any() if seq_len > 1 else input_ids.new_zeros((), dtype=torch.bool)
            )
            names.append(
                "position_ids restart inside a row but cu_seq_lens_q/k were not given (a packed batch needs "
                "cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)"
            )
        _raise_if_any(checks, names, input_ids)
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        unbatched=unbatched,
        past_length=past_length,
    )


def _prepare_packed(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor | None,
    max_length_q: int | torch.Tensor | None,
    max_length_k: int | torch.Tensor | None,
    vocab_size: int,
    past_length: int,
    unbatched: bool,
) -> Batch:
    batch_size, num_tokens = input_ids.shape
    if batch_size != 1:
        raise ValueError(
            f"packed inputs (cu_seq_lens_q given) must be [1, T] or [T], got input_ids {tuple(input_ids.shape)}"
        )
    if past_length:
        raise ValueError("packed inputs cannot be combined with a KV cache (past_key_values)")
    if attention_mask is not None:
        raise ValueError("attention_mask must be None for packed inputs: sequence boundaries come from cu_seq_lens_q/k")
    for name, cu in (("cu_seq_lens_q", cu_seq_lens_q), ("cu_seq_lens_k", cu_seq_lens_k)):
        if cu is None:
            continue
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor [N + 1] with at least 2 entries, got {_describe(cu)}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (as flash-attention kernels need), got {cu.dtype}")
        if cu.device != input_ids.device:
            raise ValueError(f"{name} is on {cu.device} but input_ids is on {input_ids.device}")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and cu_seq_lens_k.shape != cu_seq_lens_q.shape:
        raise ValueError(
            f"cu_seq_lens_k {tuple(cu_seq_lens_k.shape)} differs from cu_seq_lens_q {tuple(cu_seq_lens_q.shape)}; "
            "self-attention needs the same boundaries for queries and keys"
        )
    cu_seqlens = cu_seq_lens_q
    max_seqlen = _as_int(max_length_q if max_length_q is not None else max_length_k, "max_length_q")
    if max_length_q is not None and max_length_k is not None and _as_int(max_length_k, "max_length_k") != max_seqlen:
        raise ValueError(f"max_length_k ({max_length_k}) differs from max_length_q ({max_length_q})")

    expected_positions = position_ids_from_cu_seqlens(cu_seqlens, num_tokens).unsqueeze(0)
    if position_ids is None:
        position_ids = expected_positions

    if input_validation_enabled():
        lengths = cu_seqlens.diff()
        checks = [
            input_ids.min() < 0,
            input_ids.max() >= vocab_size,
            cu_seqlens[0] != 0,
            (lengths < 0).any(),
            cu_seqlens[-1] != num_tokens,
            (position_ids != expected_positions).any(),
        ]
        names = [
            "token ids < 0",
            f"token ids >= vocab_size ({vocab_size})",
            "cu_seq_lens_q does not start at 0",
            "cu_seq_lens_q is not non-decreasing",
            f"cu_seq_lens_q does not end at the number of tokens ({num_tokens})",
            "position_ids do not restart at 0 at every cu_seq_lens_q boundary",
        ]
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:
            checks.append((cu_seq_lens_k != cu_seq_lens_q).any())
            names.append("cu_seq_lens_k differs from cu_seq_lens_q (self-attention needs the same boundaries)")
        if max_seqlen is not None:
            checks.append(lengths.max() > max_seqlen)
            names.append(f"a sequence is longer than max_length_q ({max_seqlen})")
        _raise_if_any(checks, names, input_ids)
    if max_seqlen is None:
        # Costs one sync; collators should pass max_length_q/k (DataCollatorWithFlattening does).
        max_seqlen = int(cu_seqlens.diff().max().item())
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        sequence_ids=sequence_ids_from_cu_seqlens(cu_seqlens, num_tokens),
        unbatched=unbatched,
    )


def _raise_if_any(checks: list[torch.Tensor], names: list[str], like: torch.Tensor) -> None:
    # One device->host copy for all checks instead of one per check.
    failed = torch.stack([c.to(device=like.device, dtype=torch.bool).reshape(()) for c in checks]).tolist()
    problems = [name for name, bad in zip(names, failed, strict=True) if bad]
    if problems:
        raise ValueError("invalid model inputs: " + "; ".join(problems))


def _as_int(value: int | torch.Tensor | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int or a 1-element tensor, got shape {tuple(value.shape)}")
        value = int(value.item())
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def mean_pool(hidden_states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of each sequence's non-padding hidden states: ``[num_sequences, D]``."""
    if batch.is_packed:
        assert batch.sequence_ids is not None and batch.cu_seqlens is not None
        sums = hidden_states.new_zeros(batch.num_sequences, hidden_states.shape[-1], dtype=torch.float32)
        sums.index_add_(0, batch.sequence_ids, hidden_states[0].float())
        lengths = batch.cu_seqlens.diff().clamp(min=1).to(torch.float32)
        return (sums / lengths[:, None]).to(hidden_states.dtype)
    if batch.attention_mask is None:
        return hidden_states.float().mean(dim=1).to(hidden_states.dtype)
    weights = batch.attention_mask.to(torch.float32).unsqueeze(-1)
    sums = (hidden_states.float() * weights).sum(dim=1)
    return (sums / weights.sum(dim=1).clamp(min=1)).to(hidden_states.dtype)
