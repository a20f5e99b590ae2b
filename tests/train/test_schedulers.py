"""Learning-rate schedules: warmup shape, end points, and that LambdaLR follows the pure function."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bioscale.train.schedulers import build_lr_scheduler, lr_multiplier


@pytest.mark.parametrize("kind", ["linear_warmup_linear_decay", "warmup_cosine"])
def test_warmup_is_linear_and_decay_ends_at_min_ratio(kind):
    f = lambda s: lr_multiplier(s, kind=kind, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_linear_and_cosine_midpoints():
    mid = {"warmup_steps": 0, "total_steps": 100, "min_lr_ratio": 0.1}
    assert lr_multiplier(50, kind="linear_warmup_linear_decay", **mid) == pytest.approx(0.55)
    assert lr_multiplier(50, kind="warmup_cosine", **mid) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert lr_multiplier(25, kind="warmup_cosine", **mid) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    )


def test_scheduler_drives_the_optimizer_and_resumes_from_its_state():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return opt, build_lr_scheduler(opt, kind="warmup_cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.0)

    opt, sched = make()
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [
        2.0 * lr_multiplier(s, kind="warmup_cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.0)
        for s in range(12)
    ]
    assert lrs == pytest.approx(expected)
    _, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="scheduler.kind"):
        lr_multiplier(0, kind="step", warmup_steps=1, total_steps=2, min_lr_ratio=0.1)
