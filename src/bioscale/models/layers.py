"""The building blocks every bioscale model family shares: norms, MLPs and rotary embeddings.

A new family imports its blocks from here rather than from another family's modeling file, so one implementation
(and one set of tests) serves every family:

- :class:`RMSNorm`: computed in float32, cast back before the weight (``LlamaRMSNorm``).
- :class:`SwiGLUMLP`: ``down(silu(gate(x)) * up(x))`` with gate and up fused in one ``gate_up_proj`` (gate first).
- :class:`GeluMLP`: ``down(gelu(up(x)))`` with the exact erf GELU (:func:`gelu`) or its tanh approximation.
- :class:`RotaryEmbedding` and :func:`apply_rotary`: RoPE tables and rotation, rotate-half (transformers, ESM-2,
  Llama) or interleaved (adjacent pairs as complex numbers), with Llama 3 frequency scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bioscale.models.rotary import (
    RotaryEmbedding,
    apply_rotary,
    compute_inv_freq,
    rotate_half,
    rotate_interleaved,
    validate_rope_scaling,
)

__all__ = [
    "GeluMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLUMLP",
    "apply_rotary",
    "compute_inv_freq",
    "gelu",
    "rotate_half",
    "rotate_interleaved",
    "validate_rope_scaling",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back before the weight, as ``LlamaRMSNorm`` does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(input_dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact erf GELU, as in the original ESM code (``transformers`` notes the tanh approximation is subtly wrong)."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class SwiGLUMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up fused into ``gate_up_proj`` (gate first).

    One GEMM instead of two for the input side; checkpoints with separate gate / up (or ``w12``-style packed)
    weights are converted by concatenating them in that order.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """``down(gelu(up(x)))``; ``approximate="tanh"`` for the tanh GELU, ``"none"`` for the exact erf one."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(hidden_states)
        # The erf form is written out (not F.gelu) so compiled and eager runs round like ESM's reference code.
        activated = gelu(up) if self.approximate == "none" else F.gelu(up, approximate="tanh")
        return self.down_proj(activated)
