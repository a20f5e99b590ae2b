"""Rotary position embeddings (RoPE) shared by ESM-2 and Llama 3.

Cos/sin tables are computed from ``position_ids`` on every forward rather than sliced from a cached table, so the
same code serves padded batches (positions ``0..S-1``), packed batches (positions restart at 0 for every sequence)
and KV-cache decoding (positions continue after the cache). The inverse frequencies are a non-persistent buffer:
they are never saved in a checkpoint and are recomputed by :meth:`RotaryEmbedding.reset_parameters`, which
``init_weights()`` and the ``transformers`` loading hook both call, so they are right after ``from_pretrained`` and
after ``meta`` → ``to_empty`` → ``init_weights``. The rotation follows the ``rotate_half`` convention of
``transformers`` (the two halves of the head dimension are paired, not interleaved pairs), which is what the ESM-2
and Llama checkpoints on the Hub expect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def validate_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return ``rope_scaling`` normalised to ``None`` or a ``llama3`` dict; ``ValueError`` for anything else.

    Accepts the ``transformers`` spellings: ``{"rope_type": "llama3", ...}`` or the older ``{"type": "llama3", ...}``;
    ``{"rope_type": "default"}`` means no scaling.
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; bioscale implements 'llama3' (or no scaling)"
        )
    missing = [key for key in _LLAMA3_KEYS if key not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' is missing {missing}")
    scaling: dict[str, Any] = {"rope_type": "llama3"}
    scaling.update({key: rope_scaling[key] for key in _LLAMA3_KEYS})
    if float(scaling["high_freq_factor"]) <= float(scaling["low_freq_factor"]):
        raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")
    return scaling


def compute_inv_freq(
    head_dim: int, base: float, rope_scaling: Mapping[str, Any] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in float32, with Llama 3.1 frequency scaling when requested.

    The ``llama3`` rule (Meta's ``apply_scaling``; ``transformers._compute_llama3_parameters``): wavelengths shorter
    than ``original_max_position_embeddings / high_freq_factor`` are kept, those longer than
    ``original / low_freq_factor`` are divided by ``factor``, and the band in between is interpolated smoothly.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    scaling = validate_rope_scaling(rope_scaling)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin)`` of shape ``[B, S, head_dim]`` from ``position_ids`` ``[B, S]``.

    Args:
        head_dim: size of one attention head (the rotation covers all of it for ESM-2 and Llama 3).
        base: RoPE theta (10000 for ESM-2, ``rope_theta`` for Llama).
        rope_scaling: ``None`` or a ``llama3`` scaling dict (see :func:`validate_rope_scaling`).
    """

    inv_freq: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        *,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        # Table layout: rotate-half pairs dimension i with i + D/2 (transformers, ESM-2, Llama); interleaved pairs
        # 2i with 2i + 1 (the complex-number form of the original RoPE paper, AMPLIFY). See apply_rotary.
        self.interleaved = interleaved
        self.base = float(base)
        self.rope_scaling = validate_rope_scaling(rope_scaling)
        # Non-persistent: recomputed from the config, never loaded, so a checkpoint cannot carry a stale table.
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill ``inv_freq`` (a no-op on the ``meta`` device, where there is nothing to fill)."""
        if self.inv_freq.device.type == "meta":
            return
        self.inv_freq.copy_(compute_inv_freq(self.head_dim, self.base, self.rope_scaling, device=self.inv_freq.device))

    def materialize_buffers(self, device: torch.device) -> None:
        """Allocate and fill ``inv_freq`` on ``device`` (a model built on ``meta`` whose weights were loaded: the
        table is in no state dict; ``bioscale.models.hf_utils.build_bioscale_from_state_dict``)."""
        self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=device)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        before = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            # model.to(torch.bfloat16) would round the frequencies, and the angle at position p would drift by about
            # p * 2**-8 radians: keep the table in float32 whatever dtype the model is cast to.
            if before.dtype == torch.float32 and before.device == self.inv_freq.device:
                # A cast on the same device keeps the very tensor: a no-op model.to(dtype) (generate_dna makes one per
                # call) must not move a buffer that a captured CUDA graph reads (it would read freed memory).
                self.inv_freq = before
            else:
                self.inv_freq = torch.empty(self.inv_freq.shape, dtype=torch.float32, device=self.inv_freq.device)
                self.reset_parameters()
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 whatever the model dtype: bf16 positions * frequencies lose whole radians past ~256.
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(torch.float32)
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        # Cast like transformers does, so bf16 runs round the tables the same way the reference does.
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        layout = ", interleaved" if self.interleaved else ""
        return f"head_dim={self.head_dim}, base={self.base}, rope_scaling={self.rope_scaling}{layout}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (the ``transformers`` RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]``: multiplication by ``i`` of adjacent pairs read as complex
    numbers ``x0 + i x1`` (the interleaved RoPE layout)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    compute_in_float32: bool = False,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[B, S, H, D]`` and ``k`` ``[B, S, H_kv, D]`` by tables ``cos``/``sin`` ``[B, S, D]``.

    ``compute_in_float32`` reproduces ESM's reference (``transformers`` ESM upcasts q/k for the rotation); Llama's
    reference rotates in the activation dtype. ``interleaved`` rotates adjacent pairs (tables from
    ``RotaryEmbedding(interleaved=True)``) instead of the two halves.
    """
    rotate = rotate_interleaved if interleaved else rotate_half
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    if compute_in_float32:
        q_dtype, k_dtype = q.dtype, k.dtype
        q, k = q.float(), k.float()
        q_rot = q * cos + rotate(q) * sin
        k_rot = k * cos + rotate(k) * sin
        return q_rot.to(q_dtype), k_rot.to(k_dtype)
    # The tables are float32; under autocast q/k are bf16, and the product would silently promote to float32 (so the
    # attention kernel would see float32). Rotate at the tables' precision and hand back the activation dtype.
    return (q * cos + rotate(q) * sin).to(q.dtype), (k * cos + rotate(k) * sin).to(k.dtype)
