"""AdamW with decoupled weight decay on matrices only, fused on CUDA.

Weight decay is applied to parameters with two or more dimensions (linear and embedding weights) and not to biases
and norm scales, the split nanoGPT and most LM recipes use: decaying a LayerNorm gain or a bias towards zero only
fights the normalisation.
"""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] | list[float],
    eps: float,
    weight_decay: float,
    fused: bool | None,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters.

    Args:
        fused: use the fused CUDA kernel; None picks it on CUDA and the default (foreach) implementation elsewhere.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if fused is None:
        fused = device.type == "cuda"
    if fused and device.type != "cuda":
        raise ValueError("optimizer.fused=true needs a CUDA device; leave it unset (null) on CPU")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)
