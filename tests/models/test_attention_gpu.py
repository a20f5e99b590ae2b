"""GPU: unmasked bidirectional SDPA in the layout the models give it (``[B, S, H, D]`` views, transposed), whatever
kernel SDPA picks for it (cuDNN's on Hopper with torch 2.11), equals FA2 forward and backward, eagerly and inside
``torch.compile``; masked and causal attention equal the float32 math kernel."""

from __future__ import annotations

import pytest
import torch

from bioscale.models.attention import AttentionInputs, attention_forward

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _qkv(batch: int = 4, length: int = 208, heads: int = 12, dim: int = 64):
    torch.manual_seed(1)
    return [torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]  # fmt: skip


def _forward_backward(fn, q, k, v, grad):
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def _sdpa(q, k, v, **inputs):
    return attention_forward(q, k, v, AttentionInputs(backend="sdpa", **{"causal": False, **inputs}), scale=0.125)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_unmasked_sdpa_equals_flash(compiled) -> None:
    q, k, v = _qkv()
    grad = torch.randn_like(q)
    ours = _forward_backward(torch.compile(_sdpa) if compiled else _sdpa, q, k, v, grad)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        flash = _forward_backward(_sdpa, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, flash):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02, msg=name)


@pytest.mark.parametrize("case", ["masked", "causal"])
def test_masked_and_causal_sdpa_equal_float32_math(case) -> None:
    q, k, v = _qkv(batch=2, length=64)
    grad = torch.randn_like(q)
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool, device="cuda")
    mask[1, ..., 40:] = False  # the second row's last 24 keys are padding
    inputs = {"attention_mask": mask} if case == "masked" else {"causal": True}
    ours = _forward_backward(lambda *t: _sdpa(*t, **inputs), q, k, v, grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        exact = _forward_backward(lambda *t: _sdpa(*t, **inputs), q64, k64, v64, grad.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(a.double(), b, rtol=0.02, atol=0.02, msg=name)
