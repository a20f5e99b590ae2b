"""Every attention backend equals a float64 per-sequence reference, for GQA, causal and bidirectional attention."""

from __future__ import annotations

import pytest
import torch

from bioscale.models.attention import (
    ATTENTION_BACKENDS,
    attention_forward,
    check_backend_name,
    packed_attention_inputs,
    padded_attention_inputs,
)
from bioscale.models.batch import sequence_ids_from_cu_seqlens

LENGTHS = [7, 1, 12, 5]
HEADS, KV_HEADS, DIM = 4, 2, 8


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Plain float64 softmax attention of one sequence ``[S, H, D]`` with kv heads repeated per group."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal:
        seq = q.shape[0]
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def _packed_qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q = torch.randn(total, HEADS, DIM, generator=gen)
    k = torch.randn(total, KV_HEADS, DIM, generator=gen)
    v = torch.randn(total, KV_HEADS, DIM, generator=gen)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager FlexAttention on CPU warns
def test_packed_attention_equals_reference(backend: str, causal: bool) -> None:
    q, k, v, cu = _packed_qkv()
    inputs = packed_attention_inputs(
        backend=backend,
        causal=causal,
        cu_seqlens=cu,
        max_seqlen=max(LENGTHS),
        sequence_ids=sequence_ids_from_cu_seqlens(cu, q.shape[0]),
        dtype=q.dtype,
    )
    out = attention_forward(q, k, v, inputs, scale=0.3)
    assert out.shape == q.shape
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected = _reference(q[start:end], k[start:end], v[start:end], causal, 0.3)
        torch.testing.assert_close(out[start:end].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_padded_attention_equals_reference(backend: str, causal: bool) -> None:
    q_packed, k_packed, v_packed, cu = _packed_qkv(seed=1)
    batch, width = len(LENGTHS), max(LENGTHS)
    q = torch.zeros(batch, width, HEADS, DIM)
    k = torch.zeros(batch, width, KV_HEADS, DIM)
    v = torch.zeros(batch, width, KV_HEADS, DIM)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, (start, length) in enumerate(zip(cu[:-1].tolist(), LENGTHS, strict=True)):
        q[row, :length], k[row, :length], v[row, :length] = (
            q_packed[start : start + length],
            k_packed[start : start + length],
            v_packed[start : start + length],
        )
        attention_mask[row, :length] = 1
    inputs = padded_attention_inputs(
        backend=backend,
        causal=causal,
        attention_mask=attention_mask,
        query_length=width,
        batch_size=batch,
        device=q.device,
    )
    out = attention_forward(q, k, v, inputs, scale=None)
    assert torch.isfinite(out).all()  # padding rows included: no empty softmax row
    for row, length in enumerate(LENGTHS):
        expected = _reference(q[row, :length], k[row, :length], v[row, :length], causal, DIM**-0.5)
        torch.testing.assert_close(out[row, :length].double(), expected, atol=1e-5, rtol=0)


def test_packed_batches_fall_back_to_sdpa_without_a_varlen_kernel() -> None:
    _, _, _, cu = _packed_qkv()
    inputs = packed_attention_inputs(
        backend="varlen",
        causal=True,
        cu_seqlens=cu,
        max_seqlen=12,
        sequence_ids=sequence_ids_from_cu_seqlens(cu, 25),
        dtype=torch.float32,
    )
    assert inputs.backend == "sdpa" and inputs.attention_mask is not None  # CPU / float32 → block-diagonal sdpa


def test_varlen_backend_refuses_to_run_where_its_kernel_cannot() -> None:
    q, k, v, cu = _packed_qkv()
    inputs = packed_attention_inputs(
        backend="varlen",
        causal=False,
        cu_seqlens=cu,
        max_seqlen=12,
        sequence_ids=sequence_ids_from_cu_seqlens(cu, 25),
        dtype=q.dtype,
    )
    forced = type(inputs)(
        backend="varlen", causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12
    )
    with pytest.raises(ValueError, match="needs CUDA"):
        ATTENTION_BACKENDS["varlen"](q[None], k[None], v[None], forced, None)
    assert inputs.backend == "sdpa"


def test_unknown_backend_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; choose one of") as error:
        check_backend_name("flash")
    assert all(name in str(error.value) for name in ("sdpa", "varlen", "flex"))


def test_kv_cache_mask_is_aligned_to_the_end() -> None:
    # One new query after 5 cached tokens (left padding of 2) sees exactly the real cached tokens and itself.
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    inputs = padded_attention_inputs(
        backend="sdpa",
        causal=True,
        attention_mask=attention_mask,
        query_length=1,
        past_length=5,
        batch_size=1,
        device=torch.device("cpu"),
    )
    assert inputs.attention_mask.tolist() == [[[[False, False, True, True, True, True]]]]
