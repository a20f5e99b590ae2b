"""GPU twin of ``test_embed_fast_paths.py``: the prefetch pipeline gives the inline loop's numbers bit for bit on
CUDA (same kernels, same order), compiled packed blocks agree with eager ones to bf16 rounding, and the automatic
budget reads the real free memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bioscale.use import embed, load_model
from bioscale.use.embed import MAX_AUTO_TOKENS, auto_max_tokens

from .conftest import PROTEINS

pytestmark = pytest.mark.gpu


def test_prefetch_on_cuda_changes_nothing(esm_dir: Path) -> None:
    model = load_model(esm_dir).model
    kwargs = dict(per_residue=True, device="cuda", progress=False, max_length=40, max_tokens_per_batch=96)
    inline = embed(model, PROTEINS, prefetch=False, **kwargs)
    background = embed(model, PROTEINS, prefetch=True, **kwargs)
    np.testing.assert_array_equal(inline.pooled, background.pooled)
    for a, b in zip(inline.per_residue, background.per_residue):
        np.testing.assert_array_equal(a, b)


def test_compiled_blocks_agree_with_eager(esm_dir: Path) -> None:
    eager_model = load_model(esm_dir).model
    compiled_model = load_model(esm_dir).model
    kwargs = dict(device="cuda", progress=False, max_length=40, max_tokens_per_batch=96, batching="packed")
    eager = embed(eager_model, PROTEINS, compile=False, **kwargs)
    compiled = embed(compiled_model, PROTEINS, compile=True, **kwargs)  # several batch sizes: dynamic shapes
    again = embed(compiled_model, PROTEINS, compile=True, **kwargs)  # already compiled: not wrapped twice
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled_model.layers)
    # bf16: Inductor fuses the norms and pointwise ops, so roundings differ by a few bf16 ulps of O(1) values.
    np.testing.assert_allclose(compiled.pooled, eager.pooled, atol=3e-2)
    np.testing.assert_array_equal(compiled.pooled, again.pooled)


def test_auto_budget_on_this_gpu(esm_dir: Path) -> None:
    model = load_model(esm_dir).model.cuda()
    budget = auto_max_tokens(model, torch.device("cuda"), torch.bfloat16)
    assert 32768 <= budget <= MAX_AUTO_TOKENS
