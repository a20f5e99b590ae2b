"""``train_step`` on a toy token classifier in one process: accumulation over micro-batches equals one big batch, the
loss is normalised by the label count of the whole step (not averaged per micro-batch), a non-finite step changes no
weight but advances the schedule and the counters, clipping reports the norm before clipping; ``TrainState`` is a
``Stateful`` of plain values that DCP round-trips."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn import functional as F

from bioscale.constants import IGNORE_INDEX
from bioscale.train.schedulers import build_lr_scheduler
from bioscale.train.step import TrainState, launch_step, num_label_tokens, skips_on_device, train_step


def _toy(
    seed: int = 0, *, fused: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    # fused=True: the kernel that skips a non-finite step on the device (what bioscale train runs on CUDA); torch
    # has it on CPU too, so the on-device path is tested here.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    scheduler = build_lr_scheduler(optimizer, kind="warmup_cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    return model, optimizer, scheduler


def _batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Rows of 6 tokens with the first ``length`` labelled (the label counts of the micro-batches differ)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 11, (len(lengths), 6), generator=gen)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(0, 11, (length,), generator=gen)
    return {"input_ids": input_ids, "labels": labels}


def _sum_loss(model: nn.Module):
    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")

    return loss_fn


def _step(model, optimizer, scheduler, batches, state=None, **kwargs):
    state = state if state is not None else TrainState()
    result = train_step(
        model,
        optimizer,
        scheduler,
        batches,
        state=state,
        loss_fn=kwargs.pop("loss_fn", _sum_loss(model)),
        num_label_tokens=sum(num_label_tokens(b) for b in batches),
        device=torch.device("cpu"),
        max_grad_norm=kwargs.pop("max_grad_norm", 1.0),
        **kwargs,
    )
    return result, state


def test_accumulation_matches_one_batch_and_normalises_by_the_step_label_count() -> None:
    small, large = _batch([1, 2], seed=1), _batch([6, 5, 6], seed=2)  # 3 and 17 labels
    joined = {k: torch.cat([small[k], large[k]]) for k in small}
    model_a, opt_a, sched_a = _toy()
    model_b, opt_b, sched_b = _toy()
    accumulated, state = _step(model_a, opt_a, sched_a, [small, large], max_grad_norm=1e9)
    whole, _ = _step(model_b, opt_b, sched_b, [joined], max_grad_norm=1e9)
    # The mean over all 20 label tokens (the mean of the two micro-batch means would weight the 3 labels like the 17).
    assert accumulated.num_label_tokens == whole.num_label_tokens == 20.0
    assert accumulated.loss == pytest.approx(whole.loss, rel=1e-6)
    assert accumulated.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert state.step == 1 and not accumulated.skipped and state.first_loss == state.min_loss == accumulated.loss
    assert accumulated.lr == pytest.approx(1e-2 / 2)  # the lr the step used (warm-up 1/2), not the next one
    assert sched_a.get_last_lr()[0] == pytest.approx(1e-2)


def test_the_loss_is_the_global_token_mean() -> None:
    model, optimizer, scheduler = _toy()
    batches = [_batch([1, 2], seed=3), _batch([6, 6], seed=4)]
    with torch.no_grad():
        total = sum(float(_sum_loss(model)(b)) for b in batches)
    result, _ = _step(model, optimizer, scheduler, batches)
    assert result.loss == pytest.approx(total / 15, rel=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["host-decides", "skipped-on-device"])
def test_a_non_finite_step_skips_the_update_but_advances_the_schedule_and_the_counters(fused: bool) -> None:
    model, optimizer, scheduler = _toy(fused=fused)
    assert skips_on_device(model, optimizer) == fused
    batches = [_batch([3, 4], seed=5)]
    state = TrainState()
    _step(model, optimizer, scheduler, batches, state)
    before = [p.detach().clone() for p in model.parameters()]
    nan_loss = _sum_loss(model)
    for _ in range(2):
        result, _ = _step(model, optimizer, scheduler, batches, state, loss_fn=lambda b: nan_loss(b) * math.nan)
        assert result.skipped and math.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Adam's moments and step count are untouched too: the next good step is the one a run without the bad ones takes
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran: no NaN gradient leaks into the next step
    assert (state.step, state.num_skipped_steps, state.num_consecutive_bad_steps) == (3, 2, 2)
    assert scheduler.last_epoch == 3  # the schedule moved on: step <-> lr stays as in a run without the bad steps
    result, _ = _step(model, optimizer, scheduler, batches, state)
    assert not result.skipped and (state.num_skipped_steps, state.num_consecutive_bad_steps) == (2, 0)
    assert state.min_loss == min(state.first_loss, result.loss)


def test_clipping_reports_the_norm_before_clipping_and_none_skips_it() -> None:
    model, optimizer, scheduler = _toy()
    batches = [_batch([6, 6], seed=6)]
    loss = _sum_loss(model)(batches[0]) / 12
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    optimizer.zero_grad(set_to_none=True)
    result, _ = _step(model, optimizer, scheduler, batches, max_grad_norm=1e-3)
    assert result.grad_norm == pytest.approx(expected, rel=1e-5) and result.grad_norm > 1e-3
    unclipped, _ = _step(model, optimizer, scheduler, batches, max_grad_norm=None)
    assert math.isnan(unclipped.grad_norm) and not unclipped.skipped


def test_forward_context_and_profile_ranges_wrap_each_micro_batch() -> None:
    model, optimizer, scheduler = _toy()
    events: list[str] = []

    @contextlib.contextmanager
    def record(name):
        events.append(name)
        yield

    _step(model, optimizer, scheduler, [_batch([2], seed=7), _batch([3], seed=8)],
          forward_context=lambda index: record(f"micro_{index}"), profile_range=record)  # fmt: skip
    assert events == ["forward", "micro_0", "backward", "forward", "micro_1", "backward", "optimizer"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_train_state_is_stateful_plain_values_and_round_trips_through_dcp(tmp_path) -> None:
    state = TrainState(step=7, num_skipped_steps=1, num_consecutive_bad_steps=0, first_loss=3.5, min_loss=2.25)
    assert json.loads(json.dumps(state.state_dict())) == state.state_dict()
    dcp.save({"train_state": state}, checkpoint_id=str(tmp_path), no_dist=True)
    restored = TrainState()
    dcp.load({"train_state": restored}, checkpoint_id=str(tmp_path), no_dist=True)
    assert restored == state
    with pytest.raises(AssertionError, match="unknown train-state keys"):
        TrainState().load_state_dict({"steps": 3})


def test_skipping_on_the_device_trains_like_the_host_decision_and_reads_nothing_until_finish() -> None:
    runs = []
    for fused in (False, True):
        model, optimizer, scheduler = _toy(fused=fused)
        state, losses = TrainState(), []
        for seed in range(4):
            batches = [_batch([3, 5], seed=seed)]
            launched = launch_step(model, optimizer, scheduler, batches, state=state, loss_fn=_sum_loss(model),
                                   num_label_tokens=sum(num_label_tokens(b) for b in batches),
                                   device=torch.device("cpu"), max_grad_norm=1.0)  # fmt: skip
            assert state.step == seed + 1
            if seed == 0:
                assert state.first_loss is None  # the numbers are counted by finish(), not by the launch
            losses.append(launched.finish(state).loss)
        runs.append((losses, [p.detach().clone() for p in model.parameters()], state))
    (host_losses, host_params, host_state), (device_losses, device_params, device_state) = runs
    assert device_losses == pytest.approx(host_losses, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(host_params, device_params))
    assert (device_state.step, device_state.num_skipped_steps) == (host_state.step, host_state.num_skipped_steps)
