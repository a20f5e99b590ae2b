"""Context-parallel sharding and attention math in one process (no process group).

The CP group is simulated: every rank's shard is built from the same batch, the "all-gathered" K/V buffer is the
concatenation of the ranks' local K/V (so autograd sums the gradients exactly as the reduce-scatter does), and each
rank's local attention is compared, after unsharding, with unsharded attention in float64.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from bioscale.distributed.context_parallel import (
    apply_context_parallel,
    attend_gathered,
    build_cp_attention_inputs,
    context_parallel,
)
from bioscale.distributed.cp_layout import CPLayout, shard_batch_for_cp, unshard_from_cp
from bioscale.models.attention import attention_forward, packed_attention_inputs, padded_attention_inputs
from bioscale.models.llama3.modeling import shift_labels

LENGTHS = ([5, 12, 1, 9], [8], [3, 3, 3], [17, 2])
CP_SIZES = (1, 2, 3, 4)


def packed_batch(lengths: list[int]) -> dict[str, Any]:
    """A packed batch whose token ids are their own index, so every token is identifiable after sharding."""
    num_tokens = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.arange(num_tokens)[None] + 10
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100  # CLM collator: no target for a sequence's first token
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def padded_batch(lengths: list[int]) -> dict[str, Any]:
    rows, width = len(lengths), max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.arange(rows * width).view(rows, width) + 10
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def make_batch(packed: bool, lengths: list[int]) -> dict[str, Any]:
    return packed_batch(lengths) if packed else padded_batch(lengths)


# ---- sharding -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_every_token_on_exactly_one_rank_and_unshard_restores_order(
    packed: bool, lengths: list[int], cp_size: int
) -> None:
    batch = make_batch(packed, lengths)
    shards = [shard_batch_for_cp(batch, rank, cp_size) for rank in range(cp_size)]
    local_shapes = {tuple(s.batch["input_ids"].shape) for s in shards}
    assert len(local_shapes) == 1, f"ranks hold different token counts: {local_shapes}"
    held = torch.cat([s.batch["input_ids"].reshape(-1) for s in shards])
    real_ids = batch["input_ids"].reshape(-1)
    # Every original token exactly once; everything else is padding (id 1).
    assert sorted(held[held != 1].tolist()) == sorted(real_ids.tolist())
    layout = shards[0].layout
    for key in ("input_ids", "labels", "position_ids"):
        if key in batch:
            restored = unshard_from_cp([s.batch[key] for s in shards], layout)
            assert torch.equal(restored, batch[key]), key
    assert layout.num_padded_tokens % (2 * cp_size) == 0


@pytest.mark.parametrize("cp_size", [2, 3])
def test_rank_holds_dual_chunks_of_every_sequence(cp_size: int) -> None:
    lengths = [12, 24]  # multiples of 2 * cp_size for both sizes: no padding, chunks are easy to name
    batch = packed_batch(lengths)
    num_chunks = 2 * cp_size
    for rank in range(cp_size):
        shard = shard_batch_for_cp(batch, rank, cp_size)
        positions = shard.batch["position_ids"][0].tolist()
        expected = []
        for length in lengths:
            chunk = length // num_chunks
            for index in (rank, num_chunks - 1 - rank):
                expected.extend(range(index * chunk, (index + 1) * chunk))
        assert positions == expected, f"rank {rank}"
        local_lengths = torch.diff(shard.batch["cu_seq_lens_q"]).tolist()
        assert local_lengths == [2 * (n // num_chunks) for n in lengths]
        assert shard.batch["max_length_q"] == max(local_lengths)


def test_padding_is_ignored_and_positions_are_global() -> None:
    batch = packed_batch([5, 3])  # cp_size 2: padded to multiples of 4, i.e. 8 and 4
    shards = [shard_batch_for_cp(batch, rank, 2) for rank in range(2)]
    ids = torch.cat([s.batch["input_ids"] for s in shards], dim=1)
    labels = torch.cat([s.batch["labels"] for s in shards], dim=1)
    assert (labels[ids == 1] == -100).all(), "padding added for CP must carry label -100"
    assert ((ids == 1).sum().item()) == (8 - 5) + (4 - 3)
    # Rank 1 holds chunks 1 and 2 of the first sequence (chunk size 2): positions 2, 3, 4 and padding at 5.
    assert shards[1].batch["position_ids"][0, :4].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_causal_labels_are_shifted_before_sharding(packed: bool) -> None:
    batch = make_batch(packed, [7, 10, 4])
    cu = batch.get("cu_seq_lens_q")
    expected = shift_labels(batch["labels"], cu)
    shards = [shard_batch_for_cp(batch, rank, 2, shift_labels=True) for rank in range(2)]
    assert all("labels" not in s.batch for s in shards)
    restored = unshard_from_cp([s.batch["shift_labels"] for s in shards], shards[0].layout)
    assert torch.equal(restored, expected)
    # Sharding first and shifting after would have lost the targets across chunk boundaries.
    assert (expected != -100).sum() == sum((s.batch["shift_labels"] != -100).sum() for s in shards)


def test_padded_batch_without_mask_gets_one_when_padding_is_added() -> None:
    batch = {"input_ids": torch.arange(2 * 7).view(2, 7) + 10}
    shard = shard_batch_for_cp(batch, 0, 2)
    assert "attention_mask" in shard.batch
    restored = unshard_from_cp(
        [shard_batch_for_cp(batch, r, 2).batch["attention_mask"] for r in range(2)], shard.layout
    )
    assert bool(restored.all())
    assert "attention_mask" not in shard_batch_for_cp({"input_ids": torch.arange(8).view(1, 8)}, 0, 2).batch


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": torch.zeros(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1)}, "pixel_values"),
        (
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "attention_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]),
            },
            "row 0",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4, dtype=torch.long),
                "cu_seq_lens_q": torch.tensor([0, 3], dtype=torch.int32),
            },
            "end at the token count",
        ),
        ({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 3, dtype=torch.long)}, "labels"),
    ],
    ids=["unknown-key", "left-padding", "bad-cu-seqlens", "labels-shape"],
)
def test_bad_batches_raise_value_error_naming_the_problem(batch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shard_batch_for_cp(batch, 0, 2)


def test_bad_rank_raises() -> None:
    with pytest.raises(ValueError, match="cp_rank"):
        shard_batch_for_cp(packed_batch([4]), 2, 2)


# ---- attention (simulated CP group) ---------------------------------------------------------------------------------


def _reference_inputs(batch: dict[str, Any], packed: bool, causal: bool, device: str = "cpu", dtype: Any = None) -> Any:
    if packed:
        cu = batch["cu_seq_lens_q"].to(device)
        sequence_ids = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), torch.diff(cu).long())
        assert sequence_ids.numel() == batch["input_ids"].shape[1]
        return packed_attention_inputs(
            backend="sdpa",
            causal=causal,
            cu_seqlens=cu,
            max_seqlen=batch["max_length_q"],
            sequence_ids=sequence_ids,
            dtype=dtype or torch.float64,
        )
    rows, width = batch["input_ids"].shape
    return padded_attention_inputs(
        backend="sdpa",
        causal=causal,
        attention_mask=batch["attention_mask"].to(device),
        query_length=width,
        batch_size=rows,
        device=torch.device(device),
    )


def _simulated_cp_attention(
    layouts: list[CPLayout], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, flex: bool = False
) -> torch.Tensor:
    """Every rank's CP attention in one process; the gathered buffer is the ranks' K/V concatenated (rank-major)."""
    num_heads, num_kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    local_kv = [
        torch.cat([lay.shard(k, 0.0), lay.shard(v, 0.0)], dim=2).reshape(-1, 2 * num_kv_heads, head_dim)
        for lay in layouts
    ]
    buffer = torch.cat(local_kv)
    outs = []
    for layout in layouts:
        local_q = layout.shard(q, 0.0)
        inputs = build_cp_attention_inputs(layout, causal=causal, device=q.device, group=None, flex=flex)
        out = attend_gathered(local_q.reshape(1, -1, num_heads, head_dim), buffer, inputs, 0.3)
        outs.append(out.reshape(local_q.shape))
    return layouts[0].unshard(outs)


def _attention_errors(
    packed: bool, causal: bool, cp_size: int, *, device: str, dtype: torch.dtype, head_dim: int = 8, flex: bool = False
) -> tuple[float, list[float]]:
    """Largest differences (relative to the reference's magnitude) of the output and of dq, dk, dv."""
    batch = make_batch(packed, [5, 12, 1, 9] if not flex else [7, 16, 3])
    shape = tuple(batch["input_ids"].shape)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, generator=generator).requires_grad_()

    q, k, v = randn(*shape, 4, head_dim), randn(*shape, 2, head_dim), randn(*shape, 2, head_dim)  # GQA
    weight = torch.randn(*shape, 4, head_dim, device=device, dtype=dtype, generator=generator)
    valid = batch["attention_mask"].bool() if not packed else torch.ones(shape, dtype=torch.bool)
    valid = valid.to(device)
    reference = attention_forward(q, k, v, _reference_inputs(batch, packed, causal, device, dtype), scale=0.3)
    reference_grads = torch.autograd.grad((reference * weight)[valid].sum(), (q, k, v))
    layouts = [shard_batch_for_cp(batch, rank, cp_size).layout for rank in range(cp_size)]
    out = _simulated_cp_attention(layouts, q, k, v, causal, flex=flex)
    grads = torch.autograd.grad((out * weight)[valid].sum(), (q, k, v))

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    return err(out[valid], reference[valid]), [err(g[valid], r[valid]) for g, r in zip(grads, reference_grads)]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("cp_size", [2, 3])
def test_simulated_cp_attention_and_grads_match_unsharded(packed: bool, causal: bool, cp_size: int) -> None:
    out_err, grad_errs = _attention_errors(packed, causal, cp_size, device="cpu", dtype=torch.float64)
    assert out_err < 1e-12
    assert max(grad_errs) < 1e-12, grad_errs


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, forward only
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_simulated_cp_flex_attention_matches_unsharded(causal: bool) -> None:
    batch = packed_batch([7, 16, 3])
    shape = tuple(batch["input_ids"].shape)
    q, k, v = torch.randn(*shape, 4, 8), torch.randn(*shape, 2, 8), torch.randn(*shape, 2, 8)
    reference = attention_forward(q, k, v, _reference_inputs(batch, True, causal), scale=0.3)
    layouts = [shard_batch_for_cp(batch, rank, 2).layout for rank in range(2)]
    out = _simulated_cp_attention(layouts, q, k, v, causal, flex=True)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_simulated_cp_varlen_attention_matches_unsharded_gpu(packed: bool, causal: bool) -> None:
    """The flash varlen path (bf16, CUDA): a causal chunk attends to its key prefix, aligned at the bottom-right."""
    from bioscale.models.attention import varlen_available

    if not varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("this torch has no varlen_attn (torch < 2.10)")
    out_err, grad_errs = _attention_errors(packed, causal, 2, device="cuda", dtype=torch.bfloat16, head_dim=64)
    assert out_err < 2e-2
    assert max(grad_errs) < 3e-2, grad_errs


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_simulated_cp_flex_attention_matches_unsharded_gpu(causal: bool) -> None:
    """FlexAttention (compiled, with backward) on CUDA with the CP block mask."""
    out_err, grad_errs = _attention_errors(True, causal, 2, device="cuda", dtype=torch.bfloat16, head_dim=64, flex=True)
    assert out_err < 2e-2
    assert max(grad_errs) < 3e-2, grad_errs


def test_varlen_plan_segments_are_chunk_prefixes() -> None:
    """The GPU path's metadata: causal query chunk j sees keys [seq_start, end of chunk j) (bottom-right aligned)."""
    layout = shard_batch_for_cp(packed_batch([8, 16]), 1, 2).layout  # chunk sizes 2 and 4; rank 1: chunks 1 and 2
    plan = layout.attention_plan(causal=True, device="cpu")
    assert torch.diff(plan.cu_seqlens_q).tolist() == [2, 2, 4, 4]
    assert torch.diff(plan.cu_seqlens_k).tolist() == [4, 6, 8, 12]
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (4, 12)
    bidirectional = layout.attention_plan(causal=False, device="cpu")
    assert torch.diff(bidirectional.cu_seqlens_q).tolist() == [4, 8]
    assert torch.diff(bidirectional.cu_seqlens_k).tolist() == [8, 16]
    # Key rows of the second sequence's chunk-2 segment: its first 12 tokens, in order.
    second = plan.varlen_kv_index[plan.cu_seqlens_k[3] : plan.cu_seqlens_k[4]]
    global_rows = torch.from_numpy(layout.global_to_buffer)
    assert torch.equal(second, global_rows[8:20])


# ---- a model under a CP context of one rank -------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_model_under_cp_context_of_one_rank_matches_plain_forward(packed: bool) -> None:
    """cp_size=1 still pads to 2 chunks, passes global positions and pre-shifted labels through the model's hook."""
    from bioscale.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config("llama3", "debug"), task="causal_lm", device="cpu").double()
    batch = make_batch(packed, [7, 10, 3])
    batch["input_ids"] = batch["input_ids"] % 11 + 4  # inside the debug vocabulary (16)
    if not packed:
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)
    batch["labels"] = torch.where(batch["labels"] == -100, -100, batch["input_ids"])
    reference = model(**batch, loss_reduction="sum")
    apply_context_parallel(model, None)
    shard = shard_batch_for_cp(batch, 0, 1, shift_labels=True)
    with context_parallel(model, shard.layout):
        out = model(**shard.batch, loss_reduction="sum")
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=0)
    valid = batch["attention_mask"].bool() if not packed else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    torch.testing.assert_close(
        shard.layout.unshard(out.logits[None])[valid], reference.logits[valid], rtol=1e-10, atol=1e-10
    )


def test_context_requires_apply_and_matching_layout() -> None:
    from bioscale.models import build_config, build_model

    model = build_model(build_config("llama3", "debug"), task="causal_lm", device="cpu")
    shard = shard_batch_for_cp(packed_batch([6]), 1, 2)
    with pytest.raises(ValueError, match="apply_context_parallel"), context_parallel(model, shard.layout):
        pass
    apply_context_parallel(model, None)  # a CP group of one rank
    with pytest.raises(ValueError, match="cp_size=2"), context_parallel(model, shard.layout):
        pass


def test_apply_rejects_sequence_level_heads_and_attention_dropout() -> None:
    from bioscale.models import build_config, build_model

    classifier = build_model(build_config("esm2", "debug", num_labels=2), task="sequence_classification", device="meta")
    with pytest.raises(ValueError, match="Esm2ForSequenceClassification"):
        apply_context_parallel(classifier, None)
    dropout = build_model(build_config("esm2", "debug", attention_probs_dropout_prob=0.1), device="meta")
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        apply_context_parallel(dropout, None)


def test_layout_sizes_are_consistent() -> None:
    layout = shard_batch_for_cp(packed_batch([5, 12, 1, 9]), 0, 2).layout
    assert layout.padded_lengths.tolist() == [8, 12, 4, 12]
    assert layout.num_local_tokens == 18
    assert np.array_equal(np.sort(layout.local_to_global.reshape(-1)), np.arange(36))
