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
