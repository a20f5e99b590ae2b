"""Context parallelism (CP): one long sequence split over the ranks of a CP group, attention by all-gathering K/V.

Design (Llama 3 paper, section 3.3.2): every rank holds two mirrored chunks of every sequence (the dual-chunk layout of
:mod:`bioscale.distributed.cp_layout`); all of a block except attention is token-local and runs unchanged on the local
tokens. In attention each rank all-gathers the keys and values of its CP group (one collective per layer, K and V
fused; with grouped-query attention K/V are much smaller than Q) and its local queries attend to them with the
ordinary single-GPU kernel: the flash varlen kernel on GPU (each local chunk a query segment whose keys are its
sequence's prefix up to the chunk's end when causal, or its whole sequence when bidirectional), FlexAttention when
the model asks for ``flex``, or SDPA with a dense mask (CPU, float32). The all-gather is autograd-aware: its backward
reduce-scatters dK/dV to the ranks that own those tokens. Ring attention was not chosen: it needs per-step
log-sum-exp merging and a per-step mask, and PyTorch's implementation serves padded SDPA batches only, not packed ones.
See ``docs/context_parallel.md``.

Use (the order is torchtitan's: CP before activation checkpointing, compile and FSDP2)::

    apply_context_parallel(model, cp_group)               # once, on the (meta) model
    shard = shard_batch_for_cp(batch, cp_rank, cp_size, shift_labels=causal_lm)
    with context_parallel(model, shard.layout):           # the forward only; backward may run outside
        loss = model(**to_device(shard.batch), loss_reduction="sum").loss
    loss.backward()

Gradients of the parameters are partial per CP rank (each saw only its tokens): shard or replicate the model over the
flattened (dp, cp) ranks (FSDP2 / DDP over all ranks of the job) so the gradient reduction sums them, and normalise
the loss by the global label count. Model files are untouched: the model's attention-metadata builders are redirected
by :func:`bioscale.models.attention.attention_inputs_override` while :func:`context_parallel` is active.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bioscale.distributed.cp_layout import (
    CPAttentionPlan,
    CPLayout,
    CPShard,
    shard_batch_for_cp,
    unshard_from_cp,
)
from bioscale.models.attention import (
    ATTENTION_BACKENDS,
    AttentionInputs,
    attention_inputs_override,
    flex_attention_backend,
    sdpa_attention,
    varlen_attention,
    varlen_available,
)
from bioscale.models.batch import Batch, input_validation
from bioscale.models.registry import spec_for_model

CP_BACKEND = "context_parallel"

_CP_ATTRIBUTE = "_bioscale_cp_group"

__all__ = [
    "CP_BACKEND",
    "CPAttentionInputs",
    "CPLayout",
    "CPShard",
    "all_gather_autograd",
    "apply_context_parallel",
    "assert_same_batch_across_cp",
    "attend_gathered",
    "broadcast_batch",
    "build_cp_attention_inputs",
    "context_parallel",
    "context_parallel_attention",
    "gather_from_cp",
    "shard_batch_for_cp",
    "unshard_from_cp",
]


@dataclass(frozen=True)
class CPAttentionInputs(AttentionInputs):
    """:class:`AttentionInputs` of a CP-sharded batch: the plan of this rank and the group to gather K/V over.

    ``kernel`` is ``"flex"`` when the model asked for FlexAttention (``block_mask`` is then set), else ``"auto"``:
    the varlen kernel where it runs (CUDA, fp16/bf16), SDPA with a dense mask otherwise.
    """

    plan: CPAttentionPlan | None = None
    group: Any = None
    kernel: str = "auto"


def context_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float | None
) -> torch.Tensor:
    """The ``context_parallel`` attention backend: local queries ``[B, S_loc, H, D]`` against the CP group's K/V.

    Shapes: ``q`` ``[B, S_loc, H, D]``, ``k``/``v`` ``[B, S_loc, H_kv, D]`` (this rank's tokens; packed: ``B = 1``);
    returns ``[B, S_loc, H, D]``.
    """
    assert isinstance(inputs, CPAttentionInputs) and inputs.plan is not None, "CP backend without a CP plan"
    plan = inputs.plan
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if batch * seq_len != plan.num_local_tokens:
        raise ValueError(
            f"context-parallel attention got {batch * seq_len} local tokens but the CP layout has "
            f"{plan.num_local_tokens}; was the batch sharded with shard_batch_for_cp for this layout?"
        )
    if plan.q_seq.device != q.device:
        raise ValueError(f"the CP layout was built for {plan.q_seq.device} but the activations are on {q.device}")
    # All of the group's keys and values in one collective: [cp * T_loc, 2 * H_kv, D], rank-major.
    kv = torch.cat([k, v], dim=2).reshape(batch * seq_len, 2 * num_kv_heads, head_dim)
    kv = all_gather_autograd(kv, inputs.group)
    out = attend_gathered(q.reshape(1, batch * seq_len, num_heads, head_dim), kv, inputs, scale)
    return out.reshape(batch, seq_len, num_heads, head_dim)


def attend_gathered(q: torch.Tensor, kv: torch.Tensor, inputs: CPAttentionInputs, scale: float | None) -> torch.Tensor:
    """Local queries ``[1, T_loc, H, D]`` against the gathered buffer ``kv`` ``[cp * T_loc, 2 * H_kv, D]`` (K heads,
    then V heads); returns ``[1, T_loc, H, D]``. Separate from the collective so tests can simulate a CP group."""
    plan = inputs.plan
    assert plan is not None
    num_kv_heads = kv.shape[1] // 2
    use_varlen = inputs.kernel == "auto" and varlen_available(q.device, q.dtype)
    index = plan.varlen_kv_index if use_varlen else plan.dense_kv_index
    # index_select returns contiguous copies (what the flash kernel wants) and its backward scatter-adds, so keys used
    # by two query segments (causal prefixes) get both gradients.
    k_all = kv[:, :num_kv_heads].index_select(0, index).unsqueeze(0)
    v_all = kv[:, num_kv_heads:].index_select(0, index).unsqueeze(0)
    if use_varlen:
        inner = AttentionInputs(
            backend="varlen",
            causal=plan.causal,
            cu_seqlens_q=plan.cu_seqlens_q,
            cu_seqlens_k=plan.cu_seqlens_k,
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
        )
        return varlen_attention(q, k_all, v_all, inner, scale)
    if inputs.kernel == "flex":
        return flex_attention_backend(
            q, k_all, v_all, AttentionInputs("flex", plan.causal, block_mask=inputs.block_mask), scale
        )
    if q.is_cuda:
        _warn_dense_fallback(q.dtype)
    mask = plan.dense_mask()
    return sdpa_attention(q, k_all, v_all, AttentionInputs("sdpa", plan.causal, attention_mask=mask), scale)


ATTENTION_BACKENDS[CP_BACKEND] = context_parallel_attention


def all_gather_autograd(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[n, ...]`` on each rank → ``[group_size * n, ...]`` rank-major; backward reduce-scatters (sums) the gradient.

    Functional collectives, so ``torch.compile`` traces the gather into the block's graph instead of breaking it.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    from torch.distributed import _functional_collectives as funcol

    # torch >= 2.13 spells it all_gather_single_autograd; the older name still exists there but warns.
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, group)
    return funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out


# ---- model integration ----------------------------------------------------------------------------------------------


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup | None) -> None:
    """Prepare ``model`` for context parallelism over ``cp_group`` (call before AC / compile / FSDP2).

    Checks that the model's forward is token-local apart from attention, that attention dropout is off (no CP kernel
    has dropout), and makes ESM-2's token-dropout rescaling count ``<mask>`` tokens over the whole sequence rather than
    one rank's chunks. The model's weights are not touched; without an active :func:`context_parallel` context the
    model behaves exactly as before.

    Raises:
        ValueError: an unsupported model class or a non-zero attention dropout.
    """
    # Only heads whose forward is token-local apart from attention (and ESM's token-dropout rescaling, handled
    # below): a sequence-level head (mean pooling) would silently pool one rank's tokens. Each family's spec lists
    # them (ModelSpec.cp_tasks).
    name = type(model).__name__
    try:
        spec = spec_for_model(model)
    except ValueError:
        spec = None
    task = spec.task_of(type(model)) if spec is not None else None
    if spec is None or task not in spec.cp_tasks:
        supported = f"{spec.name} tasks {sorted(spec.cp_tasks)}" if spec is not None else "bioscale models"
        raise ValueError(
            f"context parallelism supports {supported}; {name} has a sequence-level head (or is unknown) whose "
            "output would depend on how the sequence is split"
        )
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attention_probs_dropout_prob"):
        if float(getattr(config, key, 0.0) or 0.0) > 0.0:
            raise ValueError(f"context parallelism has no attention dropout; set model config {key}=0")
    for module in model.modules():
        if getattr(module, "token_dropout", False) and hasattr(module, "mask_token_id"):
            original = getattr(module, "_observed_mask_ratio", None)
            if original is None:
                raise ValueError(
                    f"{type(module).__name__} uses token dropout but has no _observed_mask_ratio to make CP-aware; "
                    "update bioscale.distributed.context_parallel for the new embedding code"
                )
            if not getattr(original, "_bioscale_cp_aware", False):
                module._observed_mask_ratio = _cp_observed_mask_ratio(original)  # type: ignore[method-assign]
    setattr(model, _CP_ATTRIBUTE, cp_group)


@dataclass
class _ActiveCP:
    layout: CPLayout
    group: dist.ProcessGroup | None
    plans: dict[tuple[bool, bool], CPAttentionInputs] = field(default_factory=dict)
    key_lengths: dict[torch.device, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[_ActiveCP | None] = ContextVar("bioscale_active_cp", default=None)


@contextlib.contextmanager
def context_parallel(model: nn.Module, layout: CPLayout) -> Iterator[None]:
    """Run ``model``'s forward on a CP shard described by ``layout`` (from :func:`shard_batch_for_cp`).

    While active, the model's attention metadata is this rank's CP plan and the model's input checks that read values
    are off (they assume positions that restart at 0 per sequence; CP positions are global). Backward may run after
    the context closes: everything it needs is saved by autograd (activation checkpointing included).

    Raises:
        ValueError: ``model`` was not prepared with :func:`apply_context_parallel`, or ``layout`` was built for another
            CP size or rank than the model's CP group.
    """
    inner = getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 modifies it in place
    if not hasattr(inner, _CP_ATTRIBUTE):
        raise ValueError(f"{type(inner).__name__} was not prepared with apply_context_parallel(model, cp_group)")
    group = getattr(inner, _CP_ATTRIBUTE)
    size = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    if (layout.cp_size, layout.cp_rank) != (size, rank):
        raise ValueError(
            f"the batch was sharded for cp_size={layout.cp_size}, cp_rank={layout.cp_rank} but this rank is "
            f"{rank} of a CP group of {size}"
        )
    active = _ActiveCP(layout, group)
    token = _ACTIVE.set(active)
    try:
        with attention_inputs_override(functools.partial(_cp_attention_inputs, active)), input_validation(False):
            yield
    finally:
        _ACTIVE.reset(token)


def build_cp_attention_inputs(
    layout: CPLayout,
    *,
    causal: bool,
    device: torch.device | str,
    group: dist.ProcessGroup | None,
    flex: bool = False,
) -> CPAttentionInputs:
    """The :class:`CPAttentionInputs` of ``layout``'s rank: its plan on ``device`` (and a FlexAttention block mask
    with ``flex``), gathering over ``group``."""
    plan = layout.attention_plan(causal, device)
    return CPAttentionInputs(
        backend=CP_BACKEND,
        causal=causal,
        block_mask=_flex_block_mask(plan) if flex else None,
        plan=plan,
        group=group,
        kernel="flex" if flex else "auto",
    )


def _cp_attention_inputs(
    active: _ActiveCP, *, backend: str, causal: bool, dropout_p: float, device: torch.device
) -> CPAttentionInputs:
    """The override the model's metadata builders call under :func:`context_parallel` (once per forward)."""
    if dropout_p > 0.0:
        raise ValueError(f"context parallelism has no attention dropout (got {dropout_p}); set it to 0 in the config")
    key = (causal, backend == "flex")
    if key not in active.plans:
        active.plans[key] = build_cp_attention_inputs(
            active.layout, causal=causal, device=device, group=active.group, flex=backend == "flex"
        )
    return active.plans[key]


def _flex_block_mask(plan: CPAttentionPlan) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    q_seq, q_pos, k_seq, k_pos, k_ok = plan.q_seq, plan.q_pos, plan.k_seq, plan.k_pos, plan.k_attendable
    causal = plan.causal

    def cp_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        same = q_seq[q_idx] == k_seq[kv_idx]
        return same & (k_pos[kv_idx] <= q_pos[q_idx]) if causal else same & k_ok[kv_idx]

    device = q_seq.device
    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True  # avoids materialising the [T_loc, T] mask for long sequences
    return create_block_mask(cp_mask, None, None, q_seq.numel(), k_seq.numel(), device=device, **kwargs)


def _cp_observed_mask_ratio(original: Any) -> Any:
    """ESM-2 token dropout under CP: the ``<mask>`` ratio of each *whole* sequence, summed over the CP group.

    The embedding rescales by ``(1 - 0.12) / (1 - ratio)`` with the ratio of the token's own sequence; a rank sees two
    chunks of it, so counts are all-reduced over the group and divided by the sequence's real length.
    """

    def observed_mask_ratio(is_mask: torch.Tensor, batch: Batch) -> torch.Tensor:
        active = _ACTIVE.get()
        if active is None:
            return original(is_mask, batch)
        if batch.is_packed:
            assert batch.sequence_ids is not None
            counts = torch.zeros(batch.num_sequences, device=is_mask.device, dtype=torch.float32)
            counts.index_add_(0, batch.sequence_ids, is_mask[0].to(torch.float32))
        else:
            counts = is_mask.sum(-1).to(torch.float32)
        if active.group is not None and dist.get_world_size(active.group) > 1:
            dist.all_reduce(counts, group=active.group)
        if is_mask.device not in active.key_lengths:
            lengths = torch.from_numpy(active.layout.key_lengths).to(is_mask.device, torch.float32)
            active.key_lengths[is_mask.device] = lengths
        ratio = counts / active.key_lengths[is_mask.device]
        if batch.is_packed:
            assert batch.sequence_ids is not None
            return ratio[batch.sequence_ids].unsqueeze(0)
        return ratio[:, None]

    observed_mask_ratio._bioscale_cp_aware = True  # type: ignore[attr-defined]
    return observed_mask_ratio


# ---- data across the CP group ---------------------------------------------------------------------------------------


def gather_from_cp(local: torch.Tensor, layout: CPLayout, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's ``[*local_shape, ...]`` output (logits, hidden states) → the full ``[*input_shape, ...]`` tensor in
    the original token order, on every rank of the CP group (no gradient)."""
    if group is None or layout.cp_size == 1:
        return layout.unshard(local.unsqueeze(0))
    shards = [torch.empty_like(local) for _ in range(layout.cp_size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return layout.unshard(shards)


def broadcast_batch(batch: Mapping[str, Any] | None, group: dist.ProcessGroup, src: int = 0) -> dict[str, Any]:
    """The micro-batch of CP rank ``src`` on every rank of ``group`` (others pass ``None``).

    For data sources that cannot be replayed identically on every CP rank; bioscale's loader can (its stream is a pure
    function of seed, data rank and position), so the trainer builds one loader per data-parallel rank on each CP rank
    instead and needs no collective on the step's critical path. Uses the group's CPU side (pickled objects).
    """
    payload = [dict(batch) if batch is not None else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, src), group=group)
    received = payload[0]
    if received is None:
        raise ValueError(f"broadcast_batch: CP rank {src} (the source) passed no batch")
    return received


def assert_same_batch_across_cp(batch: Mapping[str, Any], group: dist.ProcessGroup | None) -> None:
    """Raise ``ValueError`` unless every rank of the CP group holds the same micro-batch (one small all-reduce).

    A cheap guard for the first step: ranks that shard different batches would train on garbage silently.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    ids = batch["input_ids"]
    weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.float64)
    # The checksum and its negation: after a max all-reduce both are equal across ranks only if all checksums are.
    checksum = (ids.reshape(-1).to(torch.float64) * weights).sum() + ids.numel()
    pair = torch.stack([checksum, -checksum])
    if dist.get_backend(group) == "nccl" and pair.device.type != "cuda":
        pair = pair.cuda()
    reduced = pair.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(reduced, pair):
        raise ValueError(
            "the ranks of a context-parallel group hold different micro-batches; build their data loaders with the "
            "data-parallel rank (rank // cp_size) and world size (world_size // cp_size), or broadcast_batch()"
        )


@functools.cache
def _warn_dense_fallback(dtype: torch.dtype) -> None:
    warnings.warn(
        f"context-parallel attention on CUDA with {dtype} activations: the varlen kernel needs fp16/bf16 and "
        "torch>=2.10, falling back to SDPA with a dense mask (slow, O(T_local * T) memory)",
        stacklevel=3,
    )
