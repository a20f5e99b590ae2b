"""Model-side pieces of fast autoregressive decoding: a preallocated KV cache with one row per *slot*, the
single-token decode attention that reads it, and the two forwards (packed prefill, one decode step) built from a
causal model's own blocks.

A causal family opts in with the class attribute ``_supports_static_kv_decode = True`` on its ``*ForCausalLM``; it
promises the Llama 3 block contract (``bioscale.models.llama3.modeling``): the base model (``base_model_prefix``) has
``embed_tokens``, ``rotary`` (``(position_ids, dtype) -> (cos, sin)``), ``layers`` and ``norm``; each block is
``block(hidden [B, S, D], rotary, attn_inputs, kv_cache) -> [B, S, D]`` and touches the cache only through
``k, v = kv_cache.update(k [B, H_kv, S, D], v, layer_idx)``, attending with
:func:`bioscale.models.attention.attention_forward`; the head is ``compute_logits(hidden)``. Then
:func:`prefill_forward` and :func:`decode_forward` compute exactly what the model's own ``forward`` computes (the
same modules in the same order: embedding, RoPE from ``position_ids``, blocks, final norm, head), so greedy output
equals ``generate()``'s and that of the same weights as ``transformers.LlamaForCausalLM`` (tested, float32 exact).

:class:`StaticKVCache` holds ``[num_slots, H_kv, max_length, D]`` keys and values per layer, allocated once. Its
``update`` has two modes. *Prefill*: the blocks run on a packed batch ``[1, T]`` of prompts of different lengths
(``cu_seqlens``; the varlen kernel on GPU, so no left padding and no compute on padding); ``update`` scatters each
token's K/V into its slot at its position and hands the packed K/V back for the packed attention. *Decode*: one new
token per slot ``[num_slots, 1]``, each at its own position; ``update`` writes it into the slot's row and returns the
whole buffers, and :func:`kv_decode_attention` attends over them with a per-slot mask (positions ``<=`` the slot's
own). Every shape is fixed by ``(num_slots, max_length)`` and no step reads a tensor value on the host, so a decode
step can be captured once as a CUDA graph and replayed (``bioscale.use.generation_engine``).

Decode attention and grouped-query heads: with one query per slot, the ``H / H_kv`` query heads that share a KV head
are folded into the *query-length* dimension (``[B, H_kv, G, D]`` against ``[B, H_kv, S, D]``) instead of repeating
K/V ``G`` times (``repeat_kv``). The same dot products and softmax rows, but the cache is read once per step rather
than materialised ``G`` times (Llama 3 1B: G = 4, at batch 32 and 768 positions 1.6 GB of copies per step avoided).

Decode attentions (``decode_forward(..., attention=)``, :data:`DECODE_ATTENTION_MODES`). ``"dense"`` reads every
cache position of every slot and masks those beyond the slot's own (SDPA eagerly; under ``torch.compile`` two batched
GEMVs and a masked softmax). ``"flex"`` is FlexAttention with a block mask over :data:`DECODE_KV_BLOCK`-position
blocks: each slot visits only the blocks up to its own position and masks the rest of the last one, so a step reads
what the slots hold, not the whole cache (slots of different lengths, early steps of a long cache). Compiled, that is
FlexAttention's split-KV decoding kernel and its reduction instead of two GEMVs and a softmax (on an H200 at batch 32
and 768 positions the slower of the two, so the engine's default is dense); eagerly it is FlexAttention's dense
reference (same values, no speed). The block mask is built once per cache and updated in place each step, so a
captured graph reads the step's counts (:meth:`StaticKVCache.decode_block_mask`).

The third, ``"varlen"`` (CUDA, fp16 / bf16), is torch's FlashAttention-2 varlen kernel
(``aten._flash_attention_forward``) with ``seqused_k``: every (slot, KV head) pair is one "sequence" whose queries
are the ``G`` query heads of the group and whose keys are that head's cache row — the cache's own ``[B, H_kv, S, D]``
layout flattened, no copy — of which only the first ``position + 1`` are read. One fused kernel per layer (scores,
softmax and values in registers) instead of two GEMVs and a softmax over the whole cache, reading only what each
slot holds (:func:`varlen_decode_inputs`).

Decode linears (``decode_forward(..., linear=)``, :data:`DECODE_LINEAR_MODES`). ``"gemm"`` runs each projection as
the model does (``F.linear``: cuBLAS, or max-autotune's templates when compiled so). ``"reduction"`` spells every
``F.linear`` of the step as a multiply and a float32 sum over the input features (:class:`LinearsAsReductions`).
The same products, and for a step of one or a few rows the same memory-bound matrix-vector work, but compiled it is
an Inductor reduction kernel instead of an opaque GEMM call, so the elementwise work around it fuses into it: the
RMSNorm scaling into the loads of the QKV and gate / up projections, SiLU x up into the loads of the down projection,
the residual add into its output — fewer kernels per layer, each of which costs ~1 us of graph gap. Uncompiled it
materialises the ``[rows, out, in]`` product: for compiled steps only (the engine's rule). Measured on an H100
(2026-12-05, Llama 3 1B, one slot, 256 new tokens) it lost to the GEMMs: 825 tokens/s against 852 for max-autotune's
GEMMs (816 with coordinate descent, 807 with max-autotune on top), so the engine's default stays ``"gemm"``
(``benchmarks/results/2026-12-05-h100-decode-reductions.md``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bioscale.models.attention import ATTENTION_BACKENDS, AttentionInputs, flex_attention_backend, varlen_available
from bioscale.models.batch import prepare_batch
from bioscale.models.common import attention_inputs_for_batch

KV_DECODE_BACKEND = "kv_decode"
DECODE_ATTENTION_MODES = ("dense", "flex", "varlen")
DECODE_LINEAR_MODES = ("gemm", "reduction")
# Positions per FlexAttention KV block of the decode block mask (its default sparse block size).
DECODE_KV_BLOCK = 128


def kv_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    """One query per row against a whole cache row: ``q`` ``[B, 1, H, D]``, ``k``/``v`` ``[B, S_max, H_kv, D]``,
    ``inputs.attention_mask`` bool ``[B, 1, 1, S_max]`` (True = a key of this row); returns ``[B, 1, H, D]``.

    Query head ``h`` uses KV head ``h // G`` (``G = H / H_kv``, the ``repeat_kv`` grouping), folded into the query
    length (module docstring). With ``inputs.block_mask`` (the ``"flex"`` decode attention) instead: FlexAttention over
    each row's blocks up to its position (:meth:`StaticKVCache.decode_block_mask`); ``attention_mask`` is unused.
    """
    batch, seq_len, num_heads, head_dim = q.shape
    assert seq_len == 1, f"kv_decode attention takes one query per row, got {seq_len}"
    if inputs.block_mask is not None:
        return flex_attention_backend(q, k, v, inputs, scale)
    if inputs.seqused_k is not None:
        return _varlen_decode_attention(q, k, v, inputs, scale)
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, num_kv_heads, groups, head_dim)  # [B, 1, H, D] -> [B, H_kv, G, D]: head h = kv * G + g
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if torch.compiler.is_compiling():
        # Compiled (the generation engine's compile_step), the masked SDPA call gave wrong log-probabilities on an H200
        # (torch 2.11: up to 3.3 nats off the eager step, and other tokens on a second call over the same cache, as if
        # stale rows beyond the mask were read). Spelled out, the same attention compiles to two batched
        # GEMVs and one fused masked softmax (at least float32), which is what a one-query decode step needs anyway.
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (
            scale if scale is not None else head_dim**-0.5
        )
        scores = scores.masked_fill(~inputs.attention_mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.attention_mask, scale=scale)
    return out.reshape(batch, 1, num_heads, head_dim)


def varlen_decode_inputs(
    positions: torch.Tensor, *, num_kv_heads: int, groups: int, max_length: int
) -> AttentionInputs:
    """The ``"varlen"`` decode attention's inputs at ``positions`` ``[num_slots]`` (module docstring): sequence
    ``slot * H_kv + kv_head`` has the ``groups`` query heads of that KV head as its queries and keys
    ``[0, position]`` of that head's cache row (``max_length`` rows apart)."""
    rows = positions.shape[0] * num_kv_heads
    boundaries = torch.arange(rows + 1, dtype=torch.int32, device=positions.device)
    return AttentionInputs(
        backend=KV_DECODE_BACKEND, causal=True, cu_seqlens_q=boundaries * groups, cu_seqlens_k=boundaries * max_length,
        max_seqlen_q=groups, max_seqlen_k=max_length,
        seqused_k=(positions + 1).to(torch.int32).repeat_interleave(num_kv_heads),
    )  # fmt: skip


def _flash_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    """torch's FlashAttention-2 varlen forward over ``[T, H, D]`` rows (bidirectional within each sequence)."""
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.max_seqlen_q, inputs.max_seqlen_k, 0.0, False, False,
        scale=scale, seqused_k=inputs.seqused_k,
    )  # fmt: skip
    return out


def _varlen_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    if not varlen_available(q.device, q.dtype):
        raise ValueError(f"the varlen decode attention needs CUDA and fp16/bf16 activations (got {q.device}, "
                         f"{q.dtype}); use decode_attention='dense'")  # fmt: skip
    batch, _, num_heads, head_dim = q.shape
    # k / v arrive as the cache's [B, H_kv, S, D] buffers viewed [B, S, H_kv, D]: back to the buffer, each (slot, KV
    # head) row of S keys is contiguous, so [B * H_kv * S, 1, D] is a view; q [B, 1, H, D] -> [B * H, 1, D] puts the
    # G query heads of (slot, KV head) together (head h = kv * G + g), i.e. sequence slot * H_kv + kv.
    keys, values = k.transpose(1, 2), v.transpose(1, 2)
    assert keys.is_contiguous() and values.is_contiguous(), "the varlen decode attention reads the cache as it is"
    out = _flash_varlen_forward(
        q.reshape(batch * num_heads, 1, head_dim), keys.reshape(-1, 1, head_dim), values.reshape(-1, 1, head_dim),
        inputs, scale,
    )  # fmt: skip
    return out.reshape(batch, 1, num_heads, head_dim)


# Registered by name like every backend; only decode_forward builds inputs for it (no config selects it).
ATTENTION_BACKENDS[KV_DECODE_BACKEND] = kv_decode_attention


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a causal model that :func:`prefill_forward` / :func:`decode_forward` call (module docstring)."""

    embed_tokens: nn.Module
    rotary: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    compute_logits: Callable[[torch.Tensor], torch.Tensor]
    attn_backend: str  # the config's backend: packed prefill routes through it (varlen on GPU, sdpa on CPU)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """``model``'s :class:`DecoderParts`, or ``None`` when its class does not declare
    ``_supports_static_kv_decode`` (then generate with its own ``generate()``)."""
    if not getattr(type(model), "_supports_static_kv_decode", False):
        return None
    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    config = model.config
    assert inner is not None and all(hasattr(inner, n) for n in ("embed_tokens", "rotary", "layers", "norm")), (
        f"{type(model).__name__} declares _supports_static_kv_decode but lacks the decoder parts"
    )
    return DecoderParts(
        embed_tokens=inner.embed_tokens,
        rotary=inner.rotary,
        layers=inner.layers,
        norm=inner.norm,
        compute_logits=_weakly(model.compute_logits),
        attn_backend=str(getattr(config, "attn_backend", "sdpa")),
        num_heads=int(config.num_attention_heads),
        num_kv_heads=int(config.num_key_value_heads),
        head_dim=int(config.head_dim),
        vocab_size=int(config.vocab_size),
    )


def _weakly(method: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``method`` called through a weak reference to its model, so decoder parts kept in a cache (with their KV
    buffers and CUDA graphs) never keep the model itself alive (the submodules they hold do not point back to it)."""
    # A plain weak reference to the owner plus the function (not weakref.WeakMethod, whose call Dynamo cannot trace:
    # a compiled decode step would break its graph here).
    owner, function = weakref.ref(method.__self__), method.__func__  # type: ignore[attr-defined]

    def call(hidden: torch.Tensor) -> torch.Tensor:
        model = owner()
        assert model is not None, "the model of these decoder parts has been garbage-collected"
        return function(model, hidden)

    return call


class StaticKVCache:
    """Keys and values of ``num_slots`` sequences of up to ``max_length`` tokens, per layer, allocated once.

    ``k[layer]`` / ``v[layer]``: ``[num_slots, H_kv, max_length, D]``. Use :meth:`prefilling` around a packed
    prefill forward and :meth:`decoding` around a decode step (module docstring); ``update`` is what the blocks call.
    Positions of a slot beyond its current length hold stale values of an earlier occupant: the decode mask never
    reads them. ``flex_decode=True`` also builds the decode block mask of the ``"flex"`` decode attention
    (:meth:`decode_block_mask`; ``max_length`` a multiple of :data:`DECODE_KV_BLOCK`).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        flex_decode: bool = False,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_length = max_length
        self._slots = torch.arange(num_slots, device=device)
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # (slot [T], position [T]) per packed token
        self._decode_positions: torch.Tensor | None = None  # [num_slots]
        self._block_mask = self._build_decode_block_mask(device) if flex_decode else None

    def _build_decode_block_mask(self, device: torch.device) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        if self.max_length % DECODE_KV_BLOCK:
            raise ValueError(f"the flex decode attention needs a cache length that is a multiple of {DECODE_KV_BLOCK}, "
                             f"got {self.max_length}")  # fmt: skip
        num_blocks = self.max_length // DECODE_KV_BLOCK
        # The tensors the mask reads: updated in place by decode_block_mask, never reallocated (graph-safe).
        self._mask_positions = torch.zeros(self.num_slots, dtype=torch.long, device=device)
        self._visited_blocks = torch.ones(self.num_slots, 1, 1, dtype=torch.int32, device=device)
        block_order = torch.arange(num_blocks, dtype=torch.int32, device=device)
        block_order = block_order.expand(self.num_slots, 1, 1, num_blocks).contiguous()
        positions = self._mask_positions

        def up_to_own_position(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
            return kv_idx <= positions[b]

        return BlockMask.from_kv_blocks(
            self._visited_blocks, block_order, BLOCK_SIZE=(DECODE_KV_BLOCK, DECODE_KV_BLOCK),
            mask_mod=up_to_own_position, seq_lengths=(1, self.max_length), compute_q_blocks=False,
        )  # fmt: skip

    def decode_block_mask(self, positions: torch.Tensor) -> Any:
        """The FlexAttention ``BlockMask`` of a decode step at ``positions`` ``[num_slots]``: slot ``b`` visits
        blocks ``0 .. positions[b] // DECODE_KV_BLOCK`` and, inside the last, positions ``<= positions[b]``. The
        same object every step (its count and position tensors are overwritten in place)."""
        assert self._block_mask is not None, "StaticKVCache(flex_decode=True) builds the decode block mask"
        self._mask_positions.copy_(positions)
        self._visited_blocks.copy_((positions // DECODE_KV_BLOCK + 1).to(torch.int32)[:, None, None])
        return self._block_mask

    def prefilling(self, token_slots: torch.Tensor, token_positions: torch.Tensor) -> StaticKVCache:
        """Prefill mode: packed token ``t`` goes to slot ``token_slots[t]`` at ``token_positions[t]``."""
        self._prefill, self._decode_positions = (token_slots, token_positions), None
        return self

    def decoding(self, positions: torch.Tensor) -> StaticKVCache:
        """Decode mode: slot ``b``'s new token goes to ``positions[b]`` (a static tensor under CUDA graphs)."""
        self._prefill, self._decode_positions = None, positions
        return self

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``/``v`` ``[B, H_kv, S, D]``; return what attention reads (see the modes)."""
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        if self._prefill is not None:
            slots, positions = self._prefill
            # buffer[slots, :, positions] indexes [T, H_kv, D] (the two index tensors are split by a slice).
            k_cache[slots, :, positions] = k[0].transpose(0, 1)
            v_cache[slots, :, positions] = v[0].transpose(0, 1)
            return k, v
        assert self._decode_positions is not None, "StaticKVCache.update outside prefilling()/decoding()"
        k_cache[self._slots, :, self._decode_positions] = k[:, :, 0]
        v_cache[self._slots, :, self._decode_positions] = v[:, :, 0]
        return k_cache, v_cache


@torch.no_grad()
def prefill_forward(
    parts: DecoderParts,
    cache: StaticKVCache,
    prompts: list[list[int]],
    slots: list[int],
    *,
    device: torch.device,
) -> torch.Tensor:
    """Run ``prompts`` (token ids, ``<bos>`` included) packed in one ``[1, T]`` row, filling slot ``slots[i]`` of
    ``cache`` with prompt ``i``'s keys and values at positions ``0 .. len - 1``.

    Returns the logits ``[N, vocab_size]`` (float32) at each prompt's last token: the distribution of its first new
    token.
    """
    lengths = [len(p) for p in prompts]
    assert lengths and min(lengths) > 0 and len(slots) == len(prompts)
    cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths])
    token_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))
    input_ids = flat.to(device, non_blocking=True)[None]
    position_ids = positions.to(device, non_blocking=True)[None]
    cu = cu.to(device, non_blocking=True)
    batch = prepare_batch(
        input_ids,
        vocab_size=parts.vocab_size,
        position_ids=position_ids,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lengths),
        max_length_k=max(lengths),
    )
    hidden = parts.embed_tokens(batch.input_ids)
    rotary = parts.rotary(batch.position_ids, hidden.dtype)
    attn_inputs = attention_inputs_for_batch(batch, hidden, backend=parts.attn_backend, causal=True, dropout_p=0.0)
    cache.prefilling(token_slots.to(device, non_blocking=True), position_ids[0])
    for block in parts.layers:
        hidden = block(hidden, rotary, attn_inputs, cache)
    last = hidden[0, cu[1:].long() - 1]  # [N, D]: each prompt's last token
    return parts.compute_logits(parts.norm(last)).float()


class LinearsAsReductions(TorchFunctionMode):
    """While active, ``F.linear(x, w, b)`` (every ``nn.Linear``) computes ``sum_k x[..., k] * w[:, k]`` in float32
    plus ``b``, cast back to ``x``'s dtype: the decode ``"reduction"`` linears (module docstring). Other functions
    run as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - TorchFunctionMode's signature
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        # [..., 1, in] * [out, in] -> [..., out, in], summed over in: w is read along its rows, contiguous.
        out = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)


def decode_forward(
    parts: DecoderParts, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor, *,
    attention: str = "dense", linear: str = "gemm",
) -> torch.Tensor:  # fmt: skip
    """One decoding step for every slot: ``tokens`` ``[num_slots]`` at ``positions`` ``[num_slots]``; returns the
    logits ``[num_slots, vocab_size]`` (float32) of the next token. Writes the step's keys and values into the
    cache. Fixed shapes and no host synchronisation: safe to capture in a CUDA graph. ``attention``: one of
    :data:`DECODE_ATTENTION_MODES` (module docstring; ``"flex"`` needs ``StaticKVCache(flex_decode=True)``);
    ``linear``: one of :data:`DECODE_LINEAR_MODES`."""
    if attention not in DECODE_ATTENTION_MODES:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION_MODES}, got {attention!r}")
    if linear not in DECODE_LINEAR_MODES:
        raise ValueError(f"decode linear must be one of {DECODE_LINEAR_MODES}, got {linear!r}")
    hidden = parts.embed_tokens(tokens[:, None])  # [B, 1, D]
    rotary = parts.rotary(positions[:, None], hidden.dtype)
    if attention == "flex":
        attn_inputs = AttentionInputs(backend=KV_DECODE_BACKEND, causal=True,
                                      block_mask=cache.decode_block_mask(positions))  # fmt: skip
    elif attention == "varlen":
        attn_inputs = varlen_decode_inputs(positions, num_kv_heads=parts.num_kv_heads,
                                           groups=parts.num_heads // parts.num_kv_heads, max_length=cache.max_length)
    else:
        key_positions = torch.arange(cache.max_length, device=positions.device)
        mask = (key_positions[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, S_max]
        attn_inputs = AttentionInputs(backend=KV_DECODE_BACKEND, causal=True, attention_mask=mask)
    cache.decoding(positions)
    with LinearsAsReductions() if linear == "reduction" else contextlib.nullcontext():
        for block in parts.layers:
            hidden = block(hidden, rotary, attn_inputs, cache)
        logits = parts.compute_logits(parts.norm(hidden[:, 0]))
    return logits.float()
