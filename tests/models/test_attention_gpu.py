"""GPU: cuDNN's fused attention, which bioscale routes unmasked bidirectional SDPA to on Hopper and newer when
``BIOSCALE_CUDNN_ATTENTION=1`` (``bioscale.models.attention``), equals FA2 forward and backward, eagerly and inside
``torch.compile``; masked and causal attention never take it."""

from __future__ import annotations

import pytest
import torch

from bioscale.models import attention
from bioscale.models.attention import AttentionInputs, attention_forward

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cudnn_routing_on(monkeypatch):
    """The routing is opt-in: these tests switch it on."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cuDNN attention is routed on compute capability >= 9.0 only")
    monkeypatch.setattr(attention, "_cudnn_attention_enabled", lambda: True)


def _qkv(batch: int = 4, length: int = 208, heads: int = 12, dim: int = 64):
    torch.manual_seed(1)
    return [torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]  # fmt: skip


def _forward_backward(fn, q, k, v, grad):
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def _sdpa(q, k, v):
    return attention_forward(q, k, v, AttentionInputs(backend="sdpa", causal=False), scale=0.125)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_unmasked_sdpa_through_cudnn_equals_flash(monkeypatch, compiled) -> None:
    q, k, v = _qkv()
    grad = torch.randn_like(q)
    calls = []
    real = attention._cudnn_attention
    monkeypatch.setattr(attention, "_cudnn_attention", lambda *a: calls.append(1) or real(*a))
    ours = _forward_backward(torch.compile(_sdpa) if compiled else _sdpa, q, k, v, grad)
    assert calls, "unmasked attention did not reach cuDNN"
    monkeypatch.setattr(attention, "cudnn_attention_applies", lambda *a, **kw: False)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        flash = _forward_backward(_sdpa, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, flash):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02, msg=name)


def test_masked_and_causal_attention_keep_sdpa(monkeypatch) -> None:
    q, k, v = _qkv(batch=2, length=64)
    monkeypatch.setattr(attention, "_cudnn_attention", lambda *a: pytest.fail("cuDNN took masked / causal attention"))
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool, device="cuda")
    attention_forward(q, k, v, AttentionInputs(backend="sdpa", causal=False, attention_mask=mask)).sum().backward()
    attention_forward(q, k, v, AttentionInputs(backend="sdpa", causal=True)).sum().backward()
