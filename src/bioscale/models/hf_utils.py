"""Helpers the per-family ``transformers`` converters share: building models without random init and loading
converted state dicts.

Conversion never runs a random initialisation of a full-size model (slow for billions of parameters and pointless,
since every tensor is overwritten): bioscale models are built on ``meta`` and receive the converted tensors with
``load_state_dict(assign=True)``; ``transformers`` models are built under their own ``no_init_weights`` so their
constructors still compute the buffers they own (RoPE tables, ``position_ids``) exactly as stock code does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


ModelT = TypeVar("ModelT", bound=nn.Module)


def build_bioscale_from_state_dict(
    model_cls: type[ModelT], config: PretrainedConfig, state_dict: Mapping[str, torch.Tensor]
) -> ModelT:
    """A bioscale model whose parameters and buffers are exactly ``state_dict`` (copied); the buffers no state dict
    holds (RoPE tables, the ViT's stochastic-depth rate) are computed, so nothing is left on the meta device."""
    with torch.device("meta"):
        model = model_cls(config)
    load_exact(model, state_dict, what=model_cls.__name__)
    device = next(iter(state_dict.values())).device
    # Non-persistent buffers are in no state dict: each module that owns one derives it (materialize_buffers).
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            assert hasattr(module, "materialize_buffers"), (
                f"{type(module).__name__} holds a buffer no state dict carries and defines no materialize_buffers"
            )
            module.materialize_buffers(device)
    return model


def build_hf_from_state_dict(
    factory: Callable[[PretrainedConfig], PreTrainedModel],
    config: PretrainedConfig,
    state_dict: Mapping[str, torch.Tensor],
) -> PreTrainedModel:
    """A stock ``transformers`` model ``factory(config)`` holding ``state_dict``; buffers it owns come from its own
    constructor."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = factory(config)
    expected = set(model.state_dict())
    provided = set(state_dict)
    # Persistent buffers that stock code computes itself (ESM's inv_freq in transformers 5) may be left to it.
    computed = {key for key in expected - provided if key.endswith(("inv_freq", "position_ids"))}
    missing = expected - provided - computed
    unexpected = provided - expected
    if missing or unexpected:
        raise ValueError(
            f"cannot build {type(model).__name__}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.load_state_dict(dict(state_dict), strict=False, assign=True)
    # assign=True replaced Parameter objects, which unties tied weights; tie them again the stock way.
    model.tie_weights()
    device = next(iter(state_dict.values())).device
    return model.to(device)


def load_exact(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(assign=True)`` of copies, raising ``ValueError`` unless the key sets match exactly."""
    expected = set(model.state_dict())
    provided = set(state_dict)
    if expected != provided:
        raise ValueError(
            f"state dict does not fit {what}: missing {sorted(expected - provided)}, "
            f"unexpected {sorted(provided - expected)}"
        )
    model.load_state_dict({key: value.detach().clone() for key, value in state_dict.items()}, assign=True)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended along dim 0 up to ``rows`` (vocabulary padding)."""
    if tensor.shape[0] == rows:
        return tensor
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)


def require(condition: bool, message: str) -> None:
    """``ValueError(message)`` unless ``condition`` (for unsupported ``transformers`` configs)."""
    if not condition:
        raise ValueError(message)
