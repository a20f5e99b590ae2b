"""Megatron-FSDP on CPU: what can be checked without a GPU (the package itself needs CUDA to wrap a model).

The GPU tests in ``test_megatron_fsdp_gpu.py`` train with it against one process; here: the key handling, the
detection of the wrapper, and the errors a user gets on a machine that cannot run it.
"""

from __future__ import annotations

import sys

import pytest
import torch

from bioscale.distributed import unwrap_model
from bioscale.distributed.megatron_fsdp import check_megatron_fsdp_available, is_megatron_fsdp, strip_prefix


def test_state_dict_keys_lose_only_the_wrapper_prefix():
    state = {"module.layers.0.attn.qkv.weight": 1, "module.embed.weight": 2, "other.module.x": 3}
    assert strip_prefix(state) == {"layers.0.attn.qkv.weight": 1, "embed.weight": 2, "other.module.x": 3}


def test_plain_modules_are_not_taken_for_the_wrapper():
    class MegatronFSDP(torch.nn.Module):  # same class name, but not the package's wrapper (no buffers)
        pass

    assert not is_megatron_fsdp(torch.nn.Linear(2, 2))
    assert not is_megatron_fsdp(MegatronFSDP())
    linear = torch.nn.Linear(2, 2)
    assert unwrap_model(linear) is linear


def test_cpu_and_a_missing_package_give_config_errors(monkeypatch):
    with pytest.raises(ValueError, match="NVIDIA GPUs only"):
        check_megatron_fsdp_available(torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "megatron_fsdp", None)  # import now fails as if not installed
    with pytest.raises(ValueError, match=r"pip install 'bioscale\[mfsdp\]'"):
        check_megatron_fsdp_available(torch.device("cuda"))


def test_shard_optimizer_creates_state_without_a_step(monkeypatch):
    """Megatron-FSDP's optimizer hook runs one eager AdamW step on zero gradients to create the state; ours runs it at
    lr 0 and resets the step counters, so weights, learning rates and Adam's bias correction are those of a fresh
    optimizer (the other strategies')."""
    import types

    from bioscale.distributed import megatron_fsdp

    def fully_shard_optimizer(optimizer, preproc_state_dict_for_dcp_ckpt=True):
        # What the package does before hooking step/zero_grad (megatron_fsdp/fully_shard.py).
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad()
        return optimizer

    fake = types.SimpleNamespace(fully_shard_optimizer=fully_shard_optimizer)
    monkeypatch.setattr(megatron_fsdp, "_import_megatron_fsdp", lambda: fake)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}], lr=0.5
    )
    optimizer = megatron_fsdp.shard_optimizer(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no weight decay was applied
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())

    # The next real step is Adam's first: the same update as a fresh optimizer's.
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict({k: v for k, v in zip(("weight", "bias"), before)})
    fresh = torch.optim.AdamW(
        [{"params": [reference.weight], "weight_decay": 0.1}, {"params": [reference.bias], "weight_decay": 0.0}],
        lr=0.5,
    )
    x = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (reference, fresh)):
        net(x).square().sum().backward()
        opt.step()
    assert torch.allclose(model.weight, reference.weight) and torch.allclose(model.bias, reference.bias)


def test_clip_grad_norm_from_local_shards_matches_torch_in_one_process():
    from bioscale.distributed.megatron_fsdp import clip_grad_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    model(torch.randn(3, 6)).square().sum().backward()
    model[0].bias.grad = None  # a parameter without a gradient (an empty shard) is skipped, not an error
    reference = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in reference if g is not None]))
    norm = clip_grad_norm(model, 0.1)
    assert torch.allclose(norm, expected_norm)
    for param, grad in zip(model.parameters(), reference):
        if grad is not None:
            assert torch.allclose(param.grad, grad * 0.1 / (expected_norm + 1e-6))
