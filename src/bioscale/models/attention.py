"""Attention behind one function signature, with backends registered by name in :data:`ATTENTION_BACKENDS`.

Every backend is ``fn(q, k, v, inputs, scale) -> out`` with ``q`` ``[B, S, H, D]``, ``k``/``v`` ``[B, S_kv, H_kv, D]``
(``H_kv`` divides ``H``: grouped-query attention) and ``out`` ``[B, S, H, D]``; packed batches are ``B = 1``.
Everything a backend needs besides q/k/v (padding mask, ``cu_seqlens``, FlexAttention block mask) travels in one
:class:`AttentionInputs`, built once per forward by :func:`padded_attention_inputs` / :func:`packed_attention_inputs`
in the base model, outside the transformer blocks, so the blocks stay free of mask construction and graph breaks.

Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on padded batches (the reference; runs everywhere).
  Also the CPU / float32 fallback for packed batches, with a block-diagonal mask.
- ``varlen``: packed batches through ``torch.nn.attention.varlen.varlen_attn`` (flash varlen; CUDA, fp16/bf16).
- ``flex``: FlexAttention with a document (packed) or padding mask.

Unmasked bidirectional SDPA (the ViT, Geneformer cells cut to the context, any padded batch without padding) is
left to SDPA's own choice: on Hopper with torch 2.11 (cuDNN 9.19) it runs cuDNN's fused kernels
(``cudnn_generated_fort_native_sdpa_sm90_flash_*``) for these ``[B, S, H, D]`` views of the fused QKV projection,
eagerly and compiled, ~1.6x faster than FA2 at head size 64 (profiled 2026-12-06,
``benchmarks/results/2026-12-06-trainer-late-read-cudnn-attention.md``; an earlier opt-in route to
``aten._scaled_dot_product_cudnn_attention`` changed no kernel and no step time, and was removed).

Routing rule (applied by the builders, from ``config.attn_backend``): a *packed* batch uses ``varlen`` unless the
config asks for ``flex``; where the varlen kernel cannot run (CPU, float32, torch without ``varlen_attn``) it falls
back to ``sdpa`` with a block-diagonal mask. A *padded* batch uses ``sdpa`` unless the config asks for ``flex``.
KV-cache decoding has its own backend (``kv_decode``, :mod:`bioscale.models.decoding`). In every case no query
attends to a key of another sequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

BACKEND_NAMES = ("sdpa", "varlen", "flex")


@dataclass(frozen=True)
class AttentionInputs:
    """Per-batch attention metadata, shared by every layer of one forward.

    Attributes:
        backend: key into :data:`ATTENTION_BACKENDS`.
        causal: causal (Llama) or bidirectional (ESM-2).
        attention_mask: ``sdpa`` only: bool, ``True`` = may attend; ``[B, 1, 1, S_kv]`` or ``[B, 1, S, S_kv]``.
            ``None`` with ``causal`` means plain causal attention aligned at the top-left (no cache, no padding).
        cu_seqlens_q / cu_seqlens_k: ``varlen`` only: int32 ``[N + 1]`` sequence boundaries.
        max_seqlen_q / max_seqlen_k: ``varlen`` only: longest sequence, as a Python int.
        block_mask: ``flex`` only: a FlexAttention ``BlockMask``.
        seqused_k: ``varlen`` decode only: int32 ``[N]``, how many leading keys of each sequence are read (the rest of
            its ``cu_seqlens_k`` span is unused cache).
        dropout_p: attention-probability dropout (training only; ``sdpa`` only).
    """

    backend: str
    causal: bool
    attention_mask: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    block_mask: Any = None
    seqused_k: torch.Tensor | None = None
    dropout_p: float = 0.0


class AttentionBackend(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
    ) -> torch.Tensor: ...


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, *, scale: float | None = None
) -> torch.Tensor:
    """Attention with the backend named in ``inputs``.

    Shapes: ``q`` ``[B, S, H, D]`` (or ``[T, H, D]`` for packed), ``k``/``v`` ``[B, S_kv, H_kv, D]`` (or
    ``[T, H_kv, D]``); returns the shape of ``q``. ``scale`` multiplies ``q @ k^T`` (``None``: ``D ** -0.5``).
    """
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    assert q.shape[2] % k.shape[2] == 0, f"{q.shape[2]} query heads do not divide into {k.shape[2]} kv heads"
    out = ATTENTION_BACKENDS[inputs.backend](q, k, v, inputs, scale)
    return out.squeeze(0) if unbatched else out


def repeat_kv(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, S, H_kv, D] -> [B, S, H_kv * num_groups, D]``, each kv head repeated for its query-head group."""
    if num_groups == 1:
        return x
    batch, seq, heads, dim = x.shape
    return x[:, :, :, None, :].expand(batch, seq, heads, num_groups, dim).reshape(batch, seq, heads * num_groups, dim)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    # K/V are repeated explicitly: SDPA's enable_gqa is not supported by every kernel that takes a mask.
    groups = q.shape[2] // k.shape[2]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=inputs.attention_mask,
        dropout_p=inputs.dropout_p,
        is_causal=inputs.causal and inputs.attention_mask is None,
        scale=scale,
    )
    return out.transpose(1, 2)


def _load_varlen_kernel() -> tuple[Callable[..., torch.Tensor] | None, frozenset[str]]:
    """``varlen_attn`` and the names of its parameters (``None`` on torch < 2.10, which has no varlen kernel)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Resolved once at import, so nothing inside a compiled block has to import or inspect.
_VARLEN_ATTN, _VARLEN_PARAMS = _load_varlen_kernel()


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the flash varlen kernel can run for activations of ``dtype`` on ``device``."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _VARLEN_ATTN is not None


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    if not varlen_available(q.device, q.dtype):
        raise ValueError(
            f"the varlen attention kernel needs CUDA, fp16/bf16 activations and torch>=2.10 (got {q.device}, "
            f"{q.dtype}); build the metadata with packed_attention_inputs(), which falls back to sdpa"
        )
    assert _VARLEN_ATTN is not None
    params = _VARLEN_PARAMS
    assert inputs.cu_seqlens_q is not None and inputs.max_seqlen_q is not None
    q, k, v = q.squeeze(0), k.squeeze(0), v.squeeze(0)
    kwargs: dict[str, Any] = {}
    # The keyword set of varlen_attn changed between torch releases: probe it instead of pinning a version.
    if inputs.causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)  # the kernel applies D ** -0.5 itself
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k[None], groups)[0], repeat_kv(v[None], groups)[0]
    out = _VARLEN_ATTN(
        q,
        k,
        v,
        inputs.cu_seqlens_q,
        inputs.cu_seqlens_k if inputs.cu_seqlens_k is not None else inputs.cu_seqlens_q,
        inputs.max_seqlen_q,
        inputs.max_seqlen_k if inputs.max_seqlen_k is not None else inputs.max_seqlen_q,
        **kwargs,
    )
    return out.unsqueeze(0)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises the full score matrix; compiled, it is a fused kernel (as torchtitan does).
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if inputs.block_mask is None:
        raise ValueError("the flex backend needs a block mask; build AttentionInputs with the attention_inputs helpers")
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        fn = _compiled_flex_attention()
    enable_gqa = q.shape[2] != k.shape[2]
    out = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=inputs.block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flex": flex_attention_backend,
}


# ---- Hook for context parallelism (bioscale.distributed.context_parallel) ------------------------------------------
# Under context parallelism the batch a model sees is one rank's shard of longer sequences (global positions, queries
# attending to keys held by other ranks); only the sharding code knows the global layout, so while it is active it
# builds the AttentionInputs itself. Outside that context the builders below behave as documented.
_ATTENTION_INPUTS_OVERRIDE: contextvars.ContextVar[Callable[..., AttentionInputs] | None] = contextvars.ContextVar(
    "bioscale_attention_inputs_override", default=None
)


@contextlib.contextmanager
def attention_inputs_override(build: Callable[..., AttentionInputs]) -> Iterator[None]:
    """While active, :func:`padded_attention_inputs` and :func:`packed_attention_inputs` return
    ``build(backend=..., causal=..., dropout_p=..., device=...)`` instead of their own metadata."""
    token = _ATTENTION_INPUTS_OVERRIDE.set(build)
    try:
        yield
    finally:
        _ATTENTION_INPUTS_OVERRIDE.reset(token)


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is a registered backend, else raise ``ValueError`` listing the valid ones."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    return name


def padded_attention_inputs(
    *,
    backend: str,
    causal: bool,
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int = 0,
    batch_size: int,
    device: torch.device,
    dropout_p: float = 0.0,
) -> AttentionInputs:
    """Metadata for a padded batch ``[B, S]`` (optionally after ``past_length`` cached tokens).

    ``attention_mask`` ``[B, past_length + S]`` marks real tokens with 1. Queries that would see no key at all
    (padding rows) are allowed to see themselves, so no softmax row is empty (an empty row is NaN in some kernels);
    their outputs are never read.
    """
    check_backend_name(backend)
    if (override := _ATTENTION_INPUTS_OVERRIDE.get()) is not None:
        return override(backend=backend, causal=causal, dropout_p=dropout_p, device=device)
    kv_length = past_length + query_length
    key_valid = attention_mask.bool() if attention_mask is not None else None
    if backend == "flex" and past_length == 0:
        _check_no_dropout("flex", dropout_p)
        return AttentionInputs(
            backend="flex",
            causal=causal,
            block_mask=_padded_block_mask(key_valid, causal, batch_size, query_length, device),
        )
    if key_valid is None and past_length == 0:
        return AttentionInputs(backend="sdpa", causal=causal, dropout_p=dropout_p)
    if not causal:
        assert key_valid is not None
        # A row of padding only would have no valid key: let it see key 0.
        empty_row = ~key_valid.any(dim=-1, keepdim=True)
        key_valid = key_valid.clone()
        key_valid[:, :1] |= empty_row
        return AttentionInputs(
            backend="sdpa", causal=False, attention_mask=key_valid[:, None, None, :], dropout_p=dropout_p
        )
    q_pos = torch.arange(past_length, kv_length, device=device)[:, None]
    k_pos = torch.arange(kv_length, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, S, S_kv], aligned at the bottom-right for a KV cache
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return AttentionInputs(
        backend="sdpa",
        causal=True,
        attention_mask=mask.expand(batch_size, 1, query_length, kv_length),
        dropout_p=dropout_p,
    )


def packed_attention_inputs(
    *,
    backend: str,
    causal: bool,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sequence_ids: torch.Tensor,
    dtype: torch.dtype,
    dropout_p: float = 0.0,
) -> AttentionInputs:
    """Metadata for a packed batch ``[1, T]`` with boundaries ``cu_seqlens`` (see the routing rule above).

    ``dtype`` is the activation dtype the kernel will see (under autocast, the autocast dtype); the varlen kernel
    needs fp16/bf16, so float32 runs take the sdpa fallback.
    """
    check_backend_name(backend)
    device = cu_seqlens.device
    if (override := _ATTENTION_INPUTS_OVERRIDE.get()) is not None:
        return override(backend=backend, causal=causal, dropout_p=dropout_p, device=device)
    if backend == "flex":
        _check_no_dropout("flex", dropout_p)
        return AttentionInputs(backend="flex", causal=causal, block_mask=_document_block_mask(sequence_ids, causal))
    _check_no_dropout("varlen", dropout_p)
    if varlen_available(device, dtype):
        return AttentionInputs(
            backend="varlen",
            causal=causal,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
        )
    if device.type == "cuda":
        _warn_varlen_fallback(dtype)
    # Block-diagonal mask: O(T^2) memory, fine for the CPU / float32 path it serves.
    mask = sequence_ids[:, None] == sequence_ids[None, :]
    if causal:
        mask = mask.tril()
    return AttentionInputs(backend="sdpa", causal=causal, attention_mask=mask[None, None])


def _check_no_dropout(backend: str, dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise ValueError(
            f"attention dropout ({dropout_p}) is not supported by the {backend} attention path (packed batches and "
            "flex have no dropout); set the config's attention dropout to 0 or train with padded sdpa batches"
        )


@functools.cache
def _warn_varlen_fallback(dtype: torch.dtype) -> None:
    warnings.warn(
        f"packed batch on CUDA with {dtype} activations: the varlen kernel needs fp16/bf16 and torch>=2.10, "
        "falling back to sdpa with a dense block-diagonal mask (slow, O(T^2) memory)",
        stacklevel=3,
    )


def _create_block_mask(
    mask_mod: Callable[..., torch.Tensor], batch: int | None, q_len: int, kv_len: int, device: torch.device
) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    kwargs: dict[str, Any] = {}
    if "_compile" in inspect.signature(create_block_mask).parameters and device.type == "cuda":
        kwargs["_compile"] = True  # avoids materialising a [Q, KV] mask on long packed batches
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device, **kwargs)


def _document_block_mask(sequence_ids: torch.Tensor, causal: bool) -> Any:
    def document_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        same = sequence_ids[q_idx] == sequence_ids[kv_idx]
        return same & (kv_idx <= q_idx) if causal else same

    num_tokens = sequence_ids.numel()
    return _create_block_mask(document_mask, None, num_tokens, num_tokens, sequence_ids.device)


def _padded_block_mask(
    key_valid: torch.Tensor | None, causal: bool, batch_size: int, seq_len: int, device: torch.device
) -> Any:
    if key_valid is None:
        key_valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)

    def padding_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        valid = key_valid[b, kv_idx] | (kv_idx == q_idx)
        return valid & (kv_idx <= q_idx) if causal else valid

    return _create_block_mask(padding_mask, batch_size, seq_len, seq_len, device)
