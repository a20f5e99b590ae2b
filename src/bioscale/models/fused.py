"""Fused operators the model files call where a fusion is exact and ``torch.compile`` cannot make it on its own.

:func:`linear_relu` is ``relu(linear(x))`` as one GEMM whose epilogue adds the bias and applies the ReLU (cuBLASLt's
``RELU_BIAS`` epilogue, through ``torch._addmm_activation``). Inductor leaves matrix multiplications to cuBLAS and
cannot move a pointwise op into them, so a compiled ``relu(linear(x))`` writes the GEMM's output, reads it back in a
separate ReLU kernel, writes the ReLU's output and a boolean mask for the backward: on Geneformer V2-104M's FFN
(``[65536, 3072]`` per layer) that kernel is ~0.34 ms of each layer's forward on an H100. Fused, the GEMM writes the
activation once; the backward recovers the mask from the saved activation (``out > 0`` is ``pre > 0``), as ReLU's own
backward does, and Inductor fuses it with the bias-gradient sum.

The result equals ``F.relu(F.linear(x, weight, bias))`` bit for bit: the epilogue applies the ReLU to the float32
accumulator before rounding, and ReLU commutes with rounding to bf16 / fp16 (it is monotone and keeps 0). Gradients are
the same formulas as the unfused autograd graph.

The op is a ``torch.library`` custom op, so Inductor calls it as one kernel instead of decomposing it; autocast casts
its inputs as it casts ``F.linear``'s. :func:`linear_relu` takes the fused route only for a plain ``nn.Linear`` with
a bias and no hooks: a PEFT LoRA wrapper, an FP8 ``Float8Linear`` or a module with forward hooks runs its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_relu"]


@torch.library.custom_op("bioscale::linear_relu", mutates_args=())
def _linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_relu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output)


def _backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN202
    x, weight, out = ctx.saved_tensors
    # ReLU's own backward: the gradient where the output is positive (aten's relu derivative is exactly this call).
    grad_pre = torch.ops.aten.threshold_backward(grad_out, out, 0).reshape(-1, weight.shape[0])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_pre @ weight).view(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = grad_pre.t() @ x.reshape(-1, x.shape[-1])
    if ctx.needs_input_grad[2]:
        grad_b = grad_pre.sum(0)
    return grad_x, grad_w, grad_b


_linear_relu.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the op sees what F.linear would: every floating input cast to the autocast dtype (the casts stay in
# the autograd graph, so gradients reach the float32 parameters as they do through F.linear).
for _device_type, _dtype in (("cuda", torch.bfloat16), ("cpu", torch.bfloat16)):
    torch.library.register_autocast("bioscale::linear_relu", _device_type, _dtype)


def _fusable(linear: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass such as torchao's ``Float8Linear``, not PEFT's wrapper) with a bias and no
    forward hooks: calling the fused op instead of its forward then skips nothing."""
    return (
        type(linear) is nn.Linear
        and linear.bias is not None
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def linear_relu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``relu(linear(x))``, as one fused GEMM where that skips nothing (see the module docstring)."""
    # The fused kernel exists for CUDA and CPU tensors (meta ones, as PEFT's and accelerate's shape passes make, take
    # the plain ops). The autocast registration above casts to bf16; an autocast region of another dtype (fp16) goes
    # through the plain ops, which cast to that dtype themselves.
    device_type = x.device.type
    if (
        not _fusable(linear)
        or device_type not in ("cuda", "cpu")
        or (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != torch.bfloat16)
    ):
        return F.relu(linear(x))
    return _linear_relu(x, linear.weight, linear.bias)
