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
- gradient clipping, the FP8 scale refresh after the optimizer (FSDP2's FP8 all-gather), ``zero_grad``;
- no host sync inside the step where the optimizer can skip a non-finite update on the device (fused AdamW, as
  ``bioscale train`` runs on CUDA): :func:`launch_step` queues the step and returns a :class:`LaunchedStep` whose
  numbers are read later, so a loop can prepare and queue step N+1 while the GPU still runs step N.
  :func:`train_step` is the two together (launch, then read), for loops that want each step's numbers at once.

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

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]

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
    return launch_step(
        model, optimizer, scheduler, micro_batches, state=state, loss_fn=loss_fn, num_label_tokens=num_label_tokens,
        device=device, max_grad_norm=max_grad_norm, forward_context=forward_context, fp8_all_gather=fp8_all_gather,
        profile_range=profile_range,
    ).finish(state)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """A step whose work is queued on the device and whose numbers are still there: :meth:`finish` reads them (the
    step's one host sync) and counts the step in :class:`TrainState`. Until then the host is free to prepare and queue
    the next step, so the GPU does not idle while the host loads data and launches kernels."""

    step: int
    loss: torch.Tensor  # the global mean loss, a device scalar
    grad_norm: torch.Tensor  # before clipping; NaN without clipping
    global_labels: torch.Tensor
    lr: float
    max_grad_norm: float | None

    def finish(self, state: TrainState) -> StepResult:
        loss, grad_norm, labels = torch.stack(
            [self.loss.double(), self.grad_norm.double(), self.global_labels.double()]
        ).tolist()
        finite = _is_finite_step(loss, grad_norm, clipped=self.max_grad_norm is not None)
        _count(state, loss, finite=finite, grad_norm=grad_norm, step=self.step)
        return StepResult(loss, grad_norm, self.lr, not finite, labels)


def _is_finite_step(loss: float, grad_norm: float, *, clipped: bool) -> bool:
    return math.isfinite(loss) and (not clipped or math.isfinite(grad_norm))


def skips_on_device(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a non-finite step by itself on the device, with no host sync before the update.

    PyTorch's fused Adam / AdamW / SGD (``_step_supports_amp_scaling``) take a ``found_inf`` tensor, as
    ``torch.amp.GradScaler`` passes it: a nonzero value leaves the weights, the moments and the step count as they
    were. Sharded (DTensor) and Megatron-FSDP parameters keep the host-side decision: a plain ``found_inf`` tensor
    among DTensor arguments is not a supported mix.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or is_megatron_fsdp(model):
        return False
    params = (p for group in optimizer.param_groups for p in group["params"])
    return DTensor is None or not any(isinstance(p, DTensor) for p in params)


def launch_step(
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
) -> LaunchedStep:
    """:func:`train_step` without waiting for the device: forward, backward, clipping and the optimizer update are
    queued, ``state.step`` and the scheduler advance, and the loss and gradient norm stay on the device until
    :meth:`LaunchedStep.finish`. An optimizer that skips non-finite steps on the device (:func:`skips_on_device`:
    fused AdamW, what ``bioscale train`` uses on CUDA) needs no sync at all; any other reads the loss and norm
    here, before deciding whether to update. Arguments as for :func:`train_step`.
    """
    state.step += 1
    # A fill, not torch.tensor(..., device=): a blocking host-to-device copy would wait for the queued work.
    global_labels = all_reduce_sum(torch.full((), num_label_tokens, dtype=torch.int64, device=device)).clamp(min=1)
    loss_scale = get_world_size() / global_labels.float()
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
        loss = all_reduce_sum(loss_sum) / global_labels.float()
        lr = scheduler.get_last_lr()[0]
        if skips_on_device(model, optimizer):
            finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) if max_grad_norm is not None else True)
            optimizer.found_inf = (~finite).float()  # read by the fused kernel (torch.amp.GradScaler's protocol)
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            if fp8_all_gather:  # weights unchanged by a skipped step: the same scales again
                precompute_fp8_scales(model)
        else:
            loss_value, grad_norm_value = torch.stack([loss, grad_norm]).tolist()
            if _is_finite_step(loss_value, grad_norm_value, clipped=max_grad_norm is not None):
                optimizer.step()
                if fp8_all_gather:
                    precompute_fp8_scales(model)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return LaunchedStep(state.step, loss, grad_norm, global_labels, lr, max_grad_norm)


def _count(state: TrainState, loss: float, *, finite: bool, grad_norm: float, step: int) -> None:
    if finite:
        state.num_consecutive_bad_steps = 0
        if state.first_loss is None:
            state.first_loss = loss
        state.min_loss = min(loss, state.min_loss if state.min_loss is not None else math.inf)
        return
    state.num_skipped_steps += 1
    state.num_consecutive_bad_steps += 1
    logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped", step, loss, grad_norm)
