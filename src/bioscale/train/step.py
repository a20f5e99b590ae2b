"""One optimizer step, shared by every loop that trains: ``bioscale train``, fine-tuning and the benchmarks.

:func:`train_step` owns what must be the same wherever bioscale trains:

- gradient accumulation over the step's micro-batches, with gradient communication (DDP all-reduce, FSDP2
  reduce-scatter) only on the last one;
- the loss normalisation: the sum of every label token's loss over the micro-batches and ranks, divided by the
  global count of label tokens (torchtitan's rule). An MLM micro-batch's masked count varies, so averaging
  per-micro-batch means would weight tokens unequally. DDP and FSDP2 average gradients over ranks, so each
  backward is scaled by ``world_size / global_count``, which turns that mean into the sum;
- non-finite steps: a NaN/inf loss or gradient norm skips the update (the weights stay as they were) but still
  advances the schedule, so the step <-> data <-> lr mapping of a resumed run stays the same; the skipped and
  consecutive bad steps are counted in :class:`TrainState` (the caller decides when to stop);
- gradient clipping, the FP8 scale refresh after the optimizer (FSDP2's FP8 all-gather), ``zero_grad``.

It takes explicit arguments (model, optimizer, scheduler, micro-batches, a loss function, a forward-context factory,
the clipping norm), never a run config. :class:`TrainState` holds the counters that survive a restart; it is
``Stateful`` (plain JSON-able values) and is checkpointed with the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from bioscale.constants import IGNORE_INDEX
from bioscale.distributed import all_reduce_sum, get_world_size, grad_sync
from bioscale.distributed.megatron_fsdp import clip_grad_norm as megatron_clip_grad_norm
from bioscale.distributed.megatron_fsdp import is_megatron_fsdp
from bioscale.precision.fp8 import precompute_fp8_scales

logger = logging.getLogger(__name__)

ContextFactory = Callable[[int], contextlib.AbstractContextManager]


def _no_context(_: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclasses.dataclass
class TrainState(Stateful):
    """Counters that survive a restart: the optimizer steps taken, the skipped ones, and the loss extremes.

    ``Stateful`` with plain JSON-able values, so a checkpoint stores it as it is and a reader needs no pickle.
    """

    step: int = 0
    num_skipped_steps: int = 0
    num_consecutive_bad_steps: int = 0
    first_loss: float | None = None
    min_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unknown = set(state_dict) - {f.name for f in dataclasses.fields(self)}
        assert not unknown, f"unknown train-state keys {sorted(unknown)}"
        for key, value in state_dict.items():
            setattr(self, key, value)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did: the global mean loss, the gradient norm before clipping (NaN without clipping), the learning
    rate it used, whether the update was skipped, and the global count of label tokens it was normalised by."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_label_tokens: float


def model_loss(model: nn.Module, batch: dict[str, Any], *, task: str) -> torch.Tensor:
    """Sum of the token losses of one micro-batch of a bioscale model (the step divides by the global label count).

    ESM's LM head runs only at masked positions (``logits_on_labels_only``): same loss, ~85 % less head compute.
    """
    extra = {"logits_on_labels_only": True} if task == "masked_lm" else {}
    return model(**batch, loss_reduction="sum", **extra).loss


def num_label_tokens(batch: dict[str, Any]) -> int:
    """Loss terms in a micro-batch (``shift_labels`` once context parallelism shifted them before sharding).

    Count on the host, before the batch moves to the device: there it would cost a sync per micro-batch.
    """
    labels = batch["shift_labels"] if "shift_labels" in batch else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping (a plain tensor, also under FSDP2)."""
    if is_megatron_fsdp(model):
        return megatron_clip_grad_norm(model, max_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    full_tensor = getattr(grad_norm, "full_tensor", None)  # a DTensor under FSDP2
    return full_tensor() if full_tensor is not None else grad_norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Any],
    *,
    state: TrainState,
    loss_fn: Callable[[Any], torch.Tensor],
    num_label_tokens: int,
    device: torch.device,
    max_grad_norm: float | None,
    forward_context: ContextFactory = _no_context,
    fp8_all_gather: bool = False,
    profile_range: Callable[[str], contextlib.AbstractContextManager] = _no_context,
) -> StepResult:
    """Run one optimizer step over ``micro_batches`` (already on ``device``) and advance ``state`` and ``scheduler``.

    Args:
        loss_fn: micro-batch -> the sum of its token losses (a scalar tensor); a loss that is already a mean counts
            as one term (then pass ``num_label_tokens=len(micro_batches)``).
        num_label_tokens: this rank's loss terms over all the micro-batches (e.g. :func:`num_label_tokens` summed on
            the host); the step all-reduces it to the global count.
        max_grad_norm: clip the gradient norm to this; None skips clipping (the result's ``grad_norm`` is NaN).
        forward_context: micro-batch index -> the context its forward runs in (autocast, a CP plan, input checks).
        fp8_all_gather: FSDP2 all-gathers FP8 weights: refresh their scales after each optimizer step.
        profile_range: name -> a profiler range (``"forward"``, ``"backward"``, ``"optimizer"``).

    Returns:
        A :class:`StepResult`. ``state.step`` has advanced by one; a non-finite step is counted in ``state``.
    """
    state.step += 1
    global_labels = all_reduce_sum(torch.tensor(num_label_tokens, device=device)).clamp(min=1).float()
    loss_scale = get_world_size() / global_labels
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        with grad_sync(model, enabled=index == len(micro_batches) - 1):
            with profile_range("forward"), forward_context(index):
                micro_loss_sum = loss_fn(batch)
            with profile_range("backward"):
                (micro_loss_sum * loss_scale).backward()
        loss_sum += micro_loss_sum.detach().float()
    with profile_range("optimizer"):
        if max_grad_norm is not None:
            grad_norm = clip_grad_norm(model, max_grad_norm).float().to(device)
        else:
            grad_norm = torch.full((), math.nan, device=device)
        loss = all_reduce_sum(loss_sum) / global_labels
        loss_value, grad_norm_value = torch.stack([loss, grad_norm]).tolist()
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(loss_value) and (max_grad_norm is None or math.isfinite(grad_norm_value))
        if finite:
            optimizer.step()
            if fp8_all_gather:
                precompute_fp8_scales(model)
        _count(state, loss_value, finite=finite, grad_norm=grad_norm_value)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return StepResult(loss_value, grad_norm_value, lr, not finite, float(global_labels))


def _count(state: TrainState, loss: float, *, finite: bool, grad_norm: float) -> None:
    if finite:
        state.num_consecutive_bad_steps = 0
        if state.first_loss is None:
            state.first_loss = loss
        state.min_loss = min(loss, state.min_loss if state.min_loss is not None else math.inf)
        return
    state.num_skipped_steps += 1
    state.num_consecutive_bad_steps += 1
    logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped", state.step, loss, grad_norm)
