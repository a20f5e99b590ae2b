"""The shared building blocks (``bioscale.models.layers``) against float64 / stock references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bioscale.models.layers import GeluMLP, RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary


def test_interleaved_rotary_equals_complex_multiplication() -> None:
    # The original RoPE: adjacent pairs (x0 + i x1) times exp(i * p * theta_j), computed in float64 complex numbers.
    torch.manual_seed(0)
    batch, seq, heads, dim = 2, 7, 3, 8
    q, k = torch.randn(batch, seq, heads, dim), torch.randn(batch, seq, 1, dim)
    positions = torch.arange(seq).expand(batch, seq)
    rotary = RotaryEmbedding(dim, base=10000.0, interleaved=True)
    cos, sin = rotary(positions, torch.float32)
    q_rot, k_rot = apply_rotary(q, k, cos, sin, interleaved=True)

    theta = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions[..., None].double() * theta  # [B, S, D/2]
    phase = torch.polar(torch.ones_like(angle), angle)[:, :, None, :]

    def reference(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * phase).flatten(-2)

    torch.testing.assert_close(q_rot.double(), reference(q), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_rot.double(), reference(k), atol=1e-6, rtol=0)
    # And it is a different layout from rotate-half (the test can tell them apart).
    half = RotaryEmbedding(dim, base=10000.0)
    q_half, _ = apply_rotary(q, k, *half(positions, torch.float32))
    assert not torch.allclose(q_half, q_rot, atol=1e-3)


def test_rotate_half_equals_transformers_convention() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    positions = torch.arange(5)[None]
    cos, sin = RotaryEmbedding(8)(positions, torch.float32)
    q_rot, _ = apply_rotary(q, k, cos, sin)
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angle = positions[..., None].double() * theta
    c, s = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2 = q.double()[..., :4], q.double()[..., 4:]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(q_rot.double(), expected, atol=1e-6, rtol=0)


def test_swiglu_equals_unfused_reference() -> None:
    torch.manual_seed(2)
    mlp = SwiGLUMLP(16, 24)
    x = torch.randn(3, 5, 16)
    gate_w, up_w = mlp.gate_up_proj.weight.chunk(2, dim=0)
    expected = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
    assert mlp.gate_up_proj.bias is None


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mlp_equals_torch_gelu(approximate: str) -> None:
    torch.manual_seed(3)
    mlp = GeluMLP(16, 32, approximate=approximate)
    x = torch.randn(4, 16, dtype=torch.float64)
    mlp = mlp.double()
    expected = mlp.down_proj(F.gelu(mlp.up_proj(x), approximate=approximate))
    torch.testing.assert_close(mlp(x), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="approximate"):
        GeluMLP(4, 8, approximate="sigmoid")


def test_rms_norm_equals_float64_formula() -> None:
    torch.manual_seed(4)
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 12)
    x64 = x.double()
    expected = norm.weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-6, rtol=0)
    assert math.isclose(norm.eps, 1e-5)
