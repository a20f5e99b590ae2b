"""``apply_*`` functions that make a single-device model trainable at scale, applied from outside the model.

:func:`parallelize` applies a :class:`~bioscale.distributed.plan.ParallelPlan` to the ``meta`` model in torchtitan's
fixed order, because each step wraps what the previous one produced:

1. (tensor parallel — not used by bioscale yet)
2. context parallel — :meth:`bioscale.distributed.cp_mesh.ContextParallel.apply` (attention reads the CP plan);
3. :func:`apply_ac` — activation checkpointing per transformer block (must wrap the plain block, before compile);
4. :func:`apply_compile` — ``torch.compile`` per block (compiling blocks, not the whole model, keeps compile time
   flat in depth and lets FSDP2's hooks sit between compiled regions);
5. :func:`apply_fsdp` — on the ``meta`` model, before materialisation, so no rank ever holds the full weights.

The caller then materialises the model (``to_empty`` + ``init_weights``) and calls :func:`apply_data_parallel`:
:func:`apply_ddp` (DDP broadcasts rank 0's real weights when it wraps) or Megatron-FSDP (it shards real weights).

Every function takes explicit arguments, never the run config. The model contract they rely on: transformer blocks
are reachable as ``model.layers`` (an ``nn.ModuleList``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from bioscale.distributed.cp_mesh import ContextParallel
from bioscale.distributed.megatron_fsdp import apply_megatron_fsdp, is_megatron_fsdp
from bioscale.distributed.plan import ParallelPlan
from bioscale.models.common import checkpoint_blocks

AC_MODES = ("none", "full", "selective")


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(  # noqa: TRY004  (a user-facing config error)
            f"{type(model).__name__} exposes no `layers` nn.ModuleList; bioscale models list their transformer "
            "blocks there so parallelism can wrap them"
        )
    return layers


def _selective_ac_policy():
    """Save the outputs of matmuls and attention kernels; recompute the cheap pointwise ops and norms.

    The expensive ops (whose recompute would cost a forward's worth of FLOPs) keep their outputs; everything between
    them — activations, norms, residual adds, dropout — is recomputed in backward. This keeps most of full AC's memory
    saving on the large elementwise tensors at a few percent of extra compute.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save_ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "_scaled_mm",  # float8 matmuls
    ):
        if hasattr(aten, name):
            save_ops.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap each block of ``model.layers`` for activation checkpointing: ``"none"``, ``"full"`` or ``"selective"``.

    Uses the non-reentrant ``checkpoint_wrapper`` (what torchtitan uses): it works with FSDP2 and ``torch.compile``,
    and its state-dict hooks strip the wrapper's prefix, so checkpoints and exports keep the plain parameter names.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(AC_MODES)}; got {mode!r}")
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"preserve_rng_state": True}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_ac_policy())
    _blocks(model)  # the actionable error for a model without blocks
    # The same wrapper as the models' HF contract (model.activation_checkpointing_enable()) applies.
    checkpoint_blocks(model, **kwargs)


def _persistent_reductions_up_to(max_rnumel: int) -> dict[str, Any]:
    """Inductor options that make row reductions (a LayerNorm over the hidden dim) of up to ``max_rnumel`` elements
    persistent: one program holds whole rows in registers. Inductor's own limit is 1024, so the LayerNorms of a
    1280-wide model get looped kernels (on the H100, the persistent forward LayerNorm took half the time).

    Inductor asks ``V.choices`` (an ``InductorChoices``) whether to go persistent. Its documented hook, the
    ``inductor_choices_class`` option, only takes effect in a thread that has not compiled anything yet (the handler
    is cached per thread, and backward graphs compile in autograd's thread), so the rule is installed once on
    ``InductorChoices`` itself and applies only while a compile runs with this preset's class as that option.
    """
    from torch._inductor.choices import InductorChoices

    _install_persistent_row_rule()

    class PersistentRowReductions(InductorChoices):
        persistent_rows_up_to = max_rnumel

    # The choices class is not part of the FX graph cache key: without the cache off, a graph compiled earlier (in
    # this process or on disk) with the default heuristic would be reused.
    return {"inductor_choices_class": PersistentRowReductions, "fx_graph_cache": False}


def _install_persistent_row_rule() -> None:
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    default_rule = InductorChoices.should_use_persistent_reduction
    if getattr(default_rule, "_bioscale_rows", False):
        return

    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool, *args: Any, **kwargs: Any) -> bool:
        limit = getattr(inductor_config.inductor_choices_class, "persistent_rows_up_to", None)
        if (
            limit is not None
            and inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)
        ):
            return True
        # Everything else, including whatever arguments a later torch adds, goes to Inductor's own rule.
        return default_rule(features, cooperative_reduction, *args, **kwargs)

    should_use_persistent_reduction._bioscale_rows = True  # type: ignore[attr-defined]
    InductorChoices.should_use_persistent_reduction = staticmethod(should_use_persistent_reduction)  # type: ignore[method-assign]


# Inductor settings a run can switch on by name: configs name these presets, never raw Inductor keys. Each entry
# builds its options when used (importing Inductor is slow).
COMPILE_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    # Benchmarks neighbours of each generated pointwise / reduction kernel's heuristic block sizes and warp count
    # and keeps the fastest (compile takes longer).
    "coordinate_descent": lambda: {"coordinate_descent_tuning": True},
    # Compiles each reduction both persistent and looped and picks the faster at run time.
    "multi_kernel": lambda: {"triton.multi_kernel": 1},
    # Benchmarks a fixed list of configs for each pointwise / reduction kernel.
    "autotune_pointwise": lambda: {"max_autotune_pointwise": True},
    # Persistent LayerNorm / RMSNorm kernels for hidden sizes up to 2048 (see _persistent_reductions_up_to).
    "persistent_rows_2048": lambda: _persistent_reductions_up_to(2048),
}


def compile_kwargs(mode: str | None = None, presets: Sequence[str] = ()) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for ``mode`` plus the named :data:`COMPILE_PRESETS`.

    ``torch.compile`` takes a ``mode`` or an ``options`` dict, not both; with presets the mode is expanded into its
    Inductor options (``torch._inductor.list_mode_options``) and the presets are merged over them.
    """
    unknown = [name for name in presets if name not in COMPILE_PRESETS]
    if unknown:
        raise ValueError(f"unknown compile preset(s) {unknown}; choose from {sorted(COMPILE_PRESETS)}")
    if not presets:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    for name in presets:
        options.update(COMPILE_PRESETS[name]())
    return {"options": options}


def apply_compile(
    model: nn.Module,
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    presets: Sequence[str] = (),
) -> None:
    """``torch.compile`` each transformer block in place.

    ``nn.Module.compile`` (rather than replacing the block with ``torch.compile(block)``) keeps parameter names free
    of ``_orig_mod.``, so checkpoints do not depend on whether compile was on. ``fullgraph`` defaults to False so an
    attention backend with a data-dependent branch costs a graph break rather than a crash. ``dynamic``: None lets
    Dynamo specialise first and generalise on the first shape change; True compiles for dynamic shapes at once
    (padded batches, whose ``[B, S]`` changes every step). ``mode`` and ``presets``: see :func:`compile_kwargs`.
    """
    kwargs = compile_kwargs(mode, presets)
    for block in _blocks(model):
        block.compile(fullgraph=fullgraph, dynamic=dynamic, **kwargs)


RESHARD_POLICIES = ("default", "always", "never")


def apply_fsdp(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: str = "default",
    prefetch: int = 1,
) -> None:
    """Shard ``model`` with FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head).

    Call on the ``meta`` model, before ``to_empty``, so no rank ever holds the full weights.

    Args:
        mesh: 1-D mesh to shard over, or 2-D ``(replicate, shard)`` for HSDP (replicas across nodes, shards within;
            :func:`bioscale.distributed.cp_mesh.build_parallel_mesh` builds both); None shards over every rank of
            the default process group.
        param_dtype: dtype for compute (all-gathered params), e.g. ``torch.bfloat16``; None keeps the stored dtype.
            The stored (sharded) params are what the optimizer updates, so fp32 shards with bf16 compute are fp32
            master weights at no extra memory.
        reduce_dtype: dtype of the gradient reduce-scatter; fp32 keeps accumulation exact enough for bf16 compute,
            bf16 halves the traffic.
        reshard_after_forward: ``"default"``: free each block's gathered params after its forward (ZeRO-3) except
            the last block's, which backward needs at once; ``"always"``: the last block too; ``"never"``: keep them
            until backward (ZeRO-2: no second all-gather, more memory).
        prefetch: explicit prefetch depth: block i's forward all-gathers blocks i+1..i+prefetch and its backward
            blocks i-1..i-prefetch, so communication overlaps compute even when the CPU runs ahead (FSDP2's implicit
            prefetch issues only the next all-gather, from the backward hook); 0 leaves FSDP2's implicit schedule.
    """
    if reshard_after_forward not in RESHARD_POLICIES:
        raise ValueError(
            f"reshard_after_forward must be one of {', '.join(RESHARD_POLICIES)}; got {reshard_after_forward!r}"
        )
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0; got {prefetch}")
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = _blocks(model)
    reshard_blocks = reshard_after_forward != "never"
    for index, block in enumerate(layers):
        # The root's backward all-gathers the last block right after forward anyway, so resharding it is wasted work.
        is_last = index == len(layers) - 1
        reshard = reshard_blocks and (reshard_after_forward == "always" or not is_last)
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_blocks)
    if prefetch:
        blocks = list(layers)
        for index, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, index - prefetch) : index][::-1])


def apply_ddp(model: nn.Module, *, device: torch.device) -> DistributedDataParallel:
    """Wrap a materialised ``model`` in DDP over the default process group; rank 0's weights are broadcast.

    Buffers are not re-broadcast every forward (``broadcast_buffers=False``): bioscale's buffers (RoPE tables) are
    computed identically on every rank by ``init_weights`` and never change.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def parallelize(
    model: nn.Module,
    plan: ParallelPlan,
    *,
    cp: ContextParallel | None = None,
    activation_checkpointing: str = "none",
    compile_blocks: bool = False,
    compile_dynamic: bool | None = None,
    compile_mode: str | None = None,
    compile_presets: Sequence[str] = (),
    reshard_after_forward: str = "default",
    prefetch: int = 1,
) -> None:
    """Apply ``plan`` to the ``meta`` model in place: context parallel → activation checkpointing → compile → FSDP2.

    ``cp`` holds the rank layout (its ``fsdp_mesh`` is what FSDP2 shards over; None: the default process group).
    The other arguments are those of :func:`apply_ac`, :func:`apply_compile` (``compile_blocks`` and ``compile_*``) and :func:`apply_fsdp`.
    Materialise the model afterwards, then call :func:`apply_data_parallel`.
    """
    if cp is not None:
        cp.apply(model)
    apply_ac(model, activation_checkpointing)
    if compile_blocks:
        apply_compile(model, dynamic=compile_dynamic, mode=compile_mode, presets=compile_presets)
    if plan.use_fsdp:
        if plan.master_dtype is None:
            model.to(dtype=torch.bfloat16)  # bf16 shards: no master copy (the optimizer updates bf16 weights)
        apply_fsdp(
            model,
            mesh=cp.fsdp_mesh if cp is not None else None,
            param_dtype=plan.param_dtype,
            reduce_dtype=plan.reduce_dtype,
            reshard_after_forward=reshard_after_forward,
            prefetch=prefetch,
        )


def apply_data_parallel(model: nn.Module, plan: ParallelPlan, *, device: torch.device) -> nn.Module:
    """Wrap the materialised ``model`` as ``plan`` says: DDP, Megatron-FSDP, or nothing (FSDP2 wrapped it already).

    Both wrappers need real weights: DDP broadcasts rank 0's; Megatron-FSDP keeps this rank's shard of weights that
    every rank initialised identically from the same seed (see :mod:`bioscale.distributed.megatron_fsdp`).
    """
    if plan.use_ddp:
        return apply_ddp(model, device=device)
    if plan.use_mfsdp:
        return apply_megatron_fsdp(
            model,
            device=device,
            compute_dtype=plan.param_dtype,
            reduce_dtype=plan.reduce_dtype,
            master_dtype=plan.master_dtype,
        )
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bioscale model under a DDP or Megatron-FSDP wrapper (FSDP2 modifies the model in place)."""
    return model.module if isinstance(model, DistributedDataParallel) or is_megatron_fsdp(model) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn gradient communication on (the last micro-batch) or off (the others) for one backward.

    Gradient accumulation only needs the reduced gradient once per optimizer step; skipping the all-reduce (DDP) or
    reduce-scatter (FSDP2) for the other micro-batches saves that communication.
    """
    if isinstance(model, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
