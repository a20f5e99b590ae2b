"""``bioscale.models.fused.linear_relu`` against the unfused ``relu(linear(x))``: values, gradients, autocast,
compile, and the modules it must not bypass (PEFT LoRA, FP8, hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bioscale.models.fused import linear_relu

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_without(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _linear_and_input(device: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = nn.Linear(48, 96).to(device=device, dtype=dtype)
    x = torch.randn(3, 40, 48, device=device, dtype=dtype, requires_grad=True)
    return linear, x


def _grads(linear: nn.Linear, x: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, (x, linear.weight, linear.bias), grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_equal_the_unfused_relu_bit_for_bit_and_gradients_match(device: str, dtype: torch.dtype) -> None:
    _skip_without(device)
    linear, x = _linear_and_input(device, dtype)
    grad = torch.randn(3, 40, 96, device=device, dtype=dtype)
    expected = F.relu(linear(x))
    fused = linear_relu(linear, x)
    assert fused.shape == expected.shape and fused.dtype == expected.dtype
    # The epilogue's ReLU commutes with rounding: the same bits, not just close values.
    assert torch.equal(fused, expected)
    assert (expected == 0).float().mean() > 0.3  # the ReLU is active on a good share: the test can see a wrong mask
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for got, want in zip(_grads(linear, x, fused, grad), _grads(linear, x, expected, grad)):
        torch.testing.assert_close(got, want, **tol)


def test_gradients_equal_a_float64_computation() -> None:
    linear, x = _linear_and_input("cpu")
    linear.double()
    x = x.detach().double().requires_grad_()
    grad = torch.randn(3, 40, 96, dtype=torch.float64)
    got = _grads(linear, x, linear_relu(linear, x), grad)
    pre = x @ linear.weight.t() + linear.bias
    grad_pre = grad * (pre > 0)
    want = [grad_pre @ linear.weight, grad_pre.flatten(0, 1).t() @ x.flatten(0, 1), grad_pre.sum((0, 1))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_casts_like_linear_and_gradients_reach_float32_parameters(device: str) -> None:
    _skip_without(device)
    linear, x = _linear_and_input(device)
    grad = torch.randn(3, 40, 96, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = F.relu(linear(x))
        fused = linear_relu(linear, x)
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused, expected)
    got, want = _grads(linear, x, fused, grad), _grads(linear, x, expected, grad)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph_equals_eager(device: str) -> None:
    _skip_without(device)
    linear, x = _linear_and_input(device)
    grad = torch.randn(3, 40, 96, device=device)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return linear_relu(linear, inp) * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, fn(x), atol=1e-6, rtol=1e-6)
    for g, w in zip(_grads(linear, x, out, grad), _grads(linear, x, fn(x), grad)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_modules_with_their_own_forward_are_not_bypassed() -> None:
    linear, x = _linear_and_input("cpu")
    calls = []
    handle = linear.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    linear_relu(linear, x)
    handle.remove()
    assert calls == [torch.Size([3, 40, 96])]  # the hook ran: the fused op was not taken

    class ScaledLinear(nn.Linear):  # a subclass (torchao's Float8Linear, a LoRA layer) has its own forward
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(inp)

    scaled = ScaledLinear(48, 96)
    scaled.load_state_dict(linear.state_dict())
    torch.testing.assert_close(linear_relu(scaled, x), F.relu(2.0 * linear(x)))


def test_peft_lora_on_the_geneformer_ffn_is_applied() -> None:
    peft = pytest.importorskip("peft")
    import bioscale.models as bm

    torch.manual_seed(0)
    model = bm.build_model(bm.build_config("geneformer", "debug", hidden_dropout_prob=0.0), device="cpu").eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 16))
    before = model(input_ids=ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["up_proj"], init_lora_weights=False))
    after = lora(input_ids=ids).logits
    # A LoRA update on the FFN's first linear must change the output (a fused call on the wrapped base weight would not).
    assert not torch.allclose(before, after, atol=1e-4)
