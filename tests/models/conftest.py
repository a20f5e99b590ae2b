"""Model-test settings: single-threaded torch for the tiny models these tests build."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Matrices of 64 columns gain nothing from intra-op threads, and on a shared 2-core CI machine spinning OpenMP
    # workers made this suite ~3x slower. Restored after each module, so other test folders are unaffected.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
