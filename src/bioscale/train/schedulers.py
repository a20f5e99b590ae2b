"""Learning-rate schedules as pure functions of the step, wrapped in a ``LambdaLR`` for the optimizer.

Two shapes, named by the recipes that use them:

- ``linear_warmup_linear_decay`` (ESM-2, Lin et al. 2023): linear warmup from 0 to the peak over ``warmup_steps``,
  then linear decay to ``min_lr_ratio`` x peak at ``total_steps`` (ESM-2 decays to 10 %);
- ``warmup_cosine`` (Llama 3): the same warmup, then a half cosine from the peak to ``min_lr_ratio`` x peak.

The multiplier is a pure function of the step (no hidden state), so a resumed run's schedule equals the uninterrupted
one as soon as the scheduler's step counter is restored.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULER_KINDS = ("linear_warmup_linear_decay", "warmup_cosine")


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Factor applied to the peak learning rate for optimizer step ``step`` (0-based: the first update is step 0).

    The first update uses a non-zero rate (``1 / warmup_steps`` of the peak), so no step is wasted at lr 0.
    """
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"scheduler.kind must be one of {', '.join(SCHEDULER_KINDS)}; got {kind!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if kind == "linear_warmup_linear_decay":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; call ``.step()`` once per optimizer step."""
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"scheduler.kind must be one of {', '.join(SCHEDULER_KINDS)}; got {kind!r}")
    fn = partial(
        lr_multiplier, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, lr_lambda=fn)
