"""A tiny model with ``layers`` of two linears each, the shape ``apply_fp8`` and ``QuantStats`` expect, for the FP8
statistics tests (one process and two gloo ranks)."""

from __future__ import annotations

import torch
from torch import nn


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class ToyModel(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.layers = nn.ModuleList([ToyBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def assert_records_close(got: dict, want: dict, rel: float) -> None:
    """Statistics records equal: the same keys, names (layer, role, dtype) exactly, numbers to ``rel``.
    (``pytest.approx`` over a whole record refuses its string values since pytest 9.1.)"""
    import pytest

    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for key, value in want.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert got[key] == pytest.approx(value, rel=rel), (key, got, want)
        else:
            assert got[key] == value, (key, got, want)
