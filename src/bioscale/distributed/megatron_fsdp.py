"""Megatron-FSDP (NVIDIA's ``megatron-fsdp`` package) as a third data-parallel strategy, ``parallelism.strategy=mfsdp``.

What differs from FSDP2 (:func:`bioscale.distributed.apply_fsdp`), and why the trainer treats it apart:

- Megatron-FSDP keeps parameters and gradients in flat, bucketed buffers per FSDP unit (one per transformer block
  here) and shards the *buffers* evenly, so a parameter's shard can be empty on some ranks or cut mid-row; its
  state dicts are "uneven" DTensors. Checkpoints therefore go through :class:`MegatronFSDPState` (the wrapper's own
  state dicts, with its DCP pre-processing hooks) and the final export through :func:`full_state_dict`.
- It wraps the model (``wrapper.module`` is the bioscale model) and needs a materialised model on the GPU: its meta
  initialisation calls each module's ``reset_parameters``, which bioscale models do not define per module (they have
  one ``init_weights``). The trainer therefore materialises first, like for DDP; each rank holds the full weights
  only until the wrapper has sharded them.
- Mixed precision is set by the model's own dtype: the trainer casts the model to the compute dtype (bf16) and
  Megatron-FSDP keeps fp32 main weights (the optimizer's) and fp32 main gradients in its buffers.
- Its optimizer wrapper (``fully_shard_optimizer``) hooks ``step``/``zero_grad`` to finish the gradient
  reduce-scatter and copy the updated main weights back into the compute buffers.

The package needs CUDA (it allocates CUDA streams when it wraps), so everything here runs on GPUs only; the CPU tests
cover the configuration errors and the key handling, and ``tests/distributed/test_megatron_fsdp_gpu.py`` the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

# What the wrapper prepends to the bioscale model's parameter names.
_PREFIX = "module."


def _import_megatron_fsdp() -> Any:
    try:
        import megatron_fsdp
    except ImportError as err:
        raise ValueError(
            "parallelism.strategy=mfsdp needs the megatron-fsdp package: pip install 'bioscale[mfsdp]' "
            f"(or use parallelism.strategy=fsdp2) ({err})"
        ) from err
    return megatron_fsdp


def check_megatron_fsdp_available(device: torch.device) -> None:
    """Raise ``ValueError`` unless Megatron-FSDP can run here (CUDA device, package installed)."""
    if device.type != "cuda":
        raise ValueError(
            f"parallelism.strategy=mfsdp runs on NVIDIA GPUs only (Megatron-FSDP allocates CUDA streams); this run "
            f"is on {device.type}. Use parallelism.strategy=fsdp2 or ddp."
        )
    _import_megatron_fsdp()


def is_megatron_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is a Megatron-FSDP wrapper (without importing the package when it is absent)."""
    return type(model).__name__ == "MegatronFSDP" and hasattr(model, "param_and_grad_buffer")


def apply_megatron_fsdp(
    model: nn.Module,
    *,
    device: torch.device,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    master_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Wrap a materialised ``model`` (on ``device``) with Megatron-FSDP, ZeRO-3 over every rank.

    Each transformer block (``model.layers[i]``, whatever wraps it: activation checkpointing) is one FSDP unit, so
    its parameters are gathered for its forward and backward and freed after; everything else (embeddings, final
    norm, heads) stays gathered.

    Args:
        compute_dtype: dtype of the gathered parameters used in forward/backward (the model is cast to it); None
            keeps the model's dtype.
        reduce_dtype: dtype of the main gradients and of their reduce-scatter.
        master_dtype: dtype of the sharded main weights the optimizer updates; None uses the compute buffers.

    Returns:
        The wrapper; ``wrapper.module`` is ``model``. Build the optimizer on ``wrapper.parameters()`` and pass it
        through :func:`shard_optimizer`.
    """
    megatron_fsdp = _import_megatron_fsdp()
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} exposes no `layers` nn.ModuleList of transformer blocks to shard")
    unit_types = sorted({type(block) for block in layers}, key=lambda cls: cls.__name__)
    if compute_dtype is not None:
        model.to(dtype=compute_dtype)
    policy = megatron_fsdp.MixedPrecisionPolicy(
        main_params_dtype=master_dtype, main_grads_dtype=reduce_dtype, grad_comm_dtype=reduce_dtype
    )
    return megatron_fsdp.fully_shard_model(
        model,
        fsdp_unit_modules=unit_types,
        zero_dp_strategy="optim_grads_params",
        device=device,
        mixed_precision_policy=policy,
        # Gradients are reduce-scattered as each block's backward finishes and attached to the main weights at the
        # end of every backward, so the loop's clipping and optimizer see complete gradients after each step.
        sync_model_each_microbatch=True,
        preproc_state_dict_for_dcp_ckpt=True,
    )


def shard_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Hook ``optimizer`` (built on the wrapper's parameters) into Megatron-FSDP's step and zero_grad; in place.

    ``fully_shard_optimizer`` creates the optimizer state eagerly by running one step on zero gradients. With the
    configured learning rate that step would already apply weight decay and count as Adam's first step (changing
    its bias correction); run it at lr 0 and reset the step counters, so the run matches the other strategies.
    """
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer = _import_megatron_fsdp().fully_shard_optimizer(optimizer, preproc_state_dict_for_dcp_ckpt=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    with torch.no_grad():
        for state in optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                step.zero_()
            elif step is not None:
                state["step"] = 0
    return optimizer


@torch.no_grad()
def clip_grad_norm(wrapper: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of a Megatron-FSDP model; returns the norm before clipping (on every rank).

    Megatron-FSDP attaches no ``.grad`` to a parameter whose shard is empty on this rank, so the list of gradients
    differs between ranks and ``torch.nn.utils.clip_grad_norm_`` (one DTensor collective per gradient) would issue
    different collectives on different ranks and hang. Every element of a main gradient lives on exactly one rank
    (ZeRO-3 shards every buffer), so the squared norm is the sum of the local shards' over the ranks: one all-reduce.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = list(wrapper.parameters())
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    device = params[0].device
    squared = torch.zeros((), device=device, dtype=torch.float32)
    if local:
        squared = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in local]).square().sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squared)
    total = squared.sqrt()
    if local:
        torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """The wrapper's state-dict keys without its ``module.`` prefix (the bioscale model's own names)."""
    return {key[len(_PREFIX) :] if key.startswith(_PREFIX) else key: value for key, value in state.items()}


def full_state_dict(wrapper: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights as CPU tensors under the bioscale names. Collective: call on every rank."""
    from megatron_fsdp.uneven_dtensor import uneven_dtensor_to_full_tensor
    from torch.distributed.tensor import DTensor

    full = {}
    for name, value in strip_prefix(wrapper.state_dict()).items():
        if isinstance(value, DTensor):
            value = uneven_dtensor_to_full_tensor(value)
        if isinstance(value, torch.Tensor):
            full[name] = value.detach().to("cpu", copy=True)
    return full


class MegatronFSDPState(Stateful):
    """Model and optimizer state of a Megatron-FSDP run for DCP (its uneven DTensor shards, as the package saves them).

    The optimizer state is keyed by parameter index (``torch.optim.Optimizer.state_dict``), which is stable across
    runs with the same model and configuration; resuming needs the same number of ranks anyway (per-rank data
    positions), as for the other strategies.
    """

    def __init__(self, wrapper: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.wrapper = wrapper
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.wrapper.state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapper.load_state_dict(state_dict["model"], strict=True)
        self.optimizer.load_state_dict(state_dict["optim"])
        # The optimizer updated the main weights; the compute buffers the forward reads must follow.
        self.wrapper.install_optimized_model_weights()
