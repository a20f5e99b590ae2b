"""The parallel strategy and precision of a run, decided once from explicit arguments: :func:`plan_parallelism`.

A :class:`ParallelPlan` is a decision only (booleans and dtypes, no model, no process group): which of FSDP2, DDP and
Megatron-FSDP wraps the model, the dtypes they compute, store and reduce in, whether the forward runs under bf16
autocast instead, and the rank layout (``cp_size``, ``dp_replicate``). :func:`bioscale.distributed.parallelize`
applies it to a model. The trainer and ``benchmarks/bench_train.py`` ask the same function, so a benchmark row
reports the precision ``bioscale train`` would use with the same settings.

The rules, and why:

- One rank has nothing to shard or replicate: DDP and FSDP2 only wrap with several ranks. The exception is
  ``single_gpu_fsdp`` with ``dtype=bf16`` on a GPU, where a one-rank process group (:func:`wants_one_rank_group`)
  lets FSDP2 / Megatron-FSDP give bf16 compute over fp32 master weights with bf16 norms and residual stream.
- bf16 under FSDP2 / Megatron-FSDP on a GPU (``sharded_bf16``) is bf16 compute over fp32 master weights (the shards
  the optimizer updates), or bf16 storage without a master copy when ``fp32_master_weights`` is off. Everywhere else
  (DDP, one process, CPU) bf16 comes from autocast over fp32 weights; on CPU gloo's collectives lack bf16 support
  worth relying on, so the sharded path stays fp32 there.
- Under FSDP2 tensorwise FP8 also all-gathers the weights in FP8 (half the traffic of bf16); their scales are then
  refreshed once per step, after the optimizer, in one all-reduce (``fp8_all_gather``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from bioscale.distributed.megatron_fsdp import check_megatron_fsdp_available

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2", "mfsdp")
SHARDED_STRATEGIES = ("fsdp2", "mfsdp")
DTYPES = ("bf16", "fp32")
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ParallelPlan:
    """How a run wraps its model and in which dtypes it computes (see the module docstring for the rules).

    Attributes:
        strategy: the requested ``parallelism.strategy`` (``ddp``, ``fsdp2``, ``mfsdp``).
        world_size: ranks of the job.
        use_fsdp / use_mfsdp / use_ddp: which wrapper applies (at most one).
        sharded_bf16: bf16 compute through the sharded strategy's own casts (no autocast).
        param_dtype: compute dtype of the sharded strategy (FSDP2's all-gather cast, Megatron-FSDP's compute
            buffers); None keeps the stored dtype.
        master_dtype: dtype of the weights the optimizer updates under a sharded strategy (fp32 master weights);
            None stores the weights in ``param_dtype`` (bf16, no master copy).
        reduce_dtype: dtype of the gradient reduction.
        autocast_dtype: the forward runs under ``torch.autocast`` to this dtype; None: no autocast.
        fp8_all_gather: FSDP2 all-gathers FP8 weights; their scales must be precomputed after each optimizer step.
        cp_size / dp_replicate: the rank layout (``bioscale.distributed.cp_mesh``).
    """

    strategy: str
    world_size: int
    use_fsdp: bool
    use_mfsdp: bool
    use_ddp: bool
    sharded_bf16: bool
    param_dtype: torch.dtype | None
    master_dtype: torch.dtype | None
    reduce_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    fp8_all_gather: bool
    cp_size: int = 1
    dp_replicate: int = 1

    def __post_init__(self) -> None:
        assert self.use_fsdp + self.use_mfsdp + self.use_ddp <= 1, self
        assert not (self.sharded_bf16 and self.autocast_dtype is not None), self

    @property
    def name(self) -> str:
        """The strategy that runs (``single`` when nothing wraps one unsharded rank), as the run summary reports."""
        return self.strategy if (self.world_size > 1 or self.use_fsdp or self.use_mfsdp) else "single"

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The forward's autocast context (a no-op without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)


def wants_one_rank_group(strategy: str, *, single_gpu_fsdp: bool, dtype: str) -> bool:
    """Whether a plain process should start a one-rank process group so the sharded strategy can wrap one GPU."""
    return strategy in SHARDED_STRATEGIES and single_gpu_fsdp and dtype == "bf16"


def plan_parallelism(
    *,
    strategy: str,
    dtype: str,
    device_type: str,
    world_size: int,
    is_distributed: bool,
    single_gpu_fsdp: bool = False,
    reduce_dtype: str = "fp32",
    fp32_master_weights: bool = True,
    fp8: bool = False,
    fp8_recipe: str = "tensorwise",
    cp_size: int = 1,
    dp_replicate: int = 1,
) -> ParallelPlan:
    """Decide the wrappers and dtypes of a run.

    Args:
        strategy: ``ddp``, ``fsdp2`` or ``mfsdp``.
        dtype: ``bf16`` or ``fp32`` (the run's compute precision).
        device_type: ``cuda`` or ``cpu``.
        world_size / is_distributed: the job's ranks and whether a process group exists (also for one rank).
        single_gpu_fsdp: shard over a one-rank group on one GPU (with ``dtype=bf16``; :func:`wants_one_rank_group`).
        reduce_dtype: ``fp32`` or ``bf16`` gradient reduction.
        fp32_master_weights: under ``sharded_bf16``, keep fp32 master weights (else bf16 storage).
        fp8 / fp8_recipe: torchao FP8 linears and their scaling recipe.
        cp_size / dp_replicate: context-parallel degree and HSDP replica groups.

    Raises:
        ValueError: an unknown strategy, dtype or reduce dtype; ``mfsdp`` where Megatron-FSDP cannot run or with FP8.
    """
    _check_choice("parallelism.strategy", strategy, STRATEGIES)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("parallelism.reduce_dtype", reduce_dtype, tuple(REDUCE_DTYPES))
    if strategy == "mfsdp":
        _check_megatron_fsdp(device_type, fp8=fp8)
    one_rank_sharded = (
        wants_one_rank_group(strategy, single_gpu_fsdp=single_gpu_fsdp, dtype=dtype)
        and is_distributed
        and device_type == "cuda"
    )
    use_fsdp = strategy == "fsdp2" and (world_size > 1 or one_rank_sharded)
    use_mfsdp = strategy == "mfsdp" and (world_size > 1 or one_rank_sharded)
    use_ddp = strategy == "ddp" and world_size > 1
    if world_size == 1 and is_distributed and not (use_fsdp or use_mfsdp):
        logger.info("one rank: parallelism.strategy=%s has nothing to shard or replicate; training unwrapped", strategy)
    bf16 = dtype == "bf16"
    sharded_bf16 = bf16 and (use_fsdp or use_mfsdp) and device_type == "cuda"
    return ParallelPlan(
        strategy=strategy,
        world_size=world_size,
        use_fsdp=use_fsdp,
        use_mfsdp=use_mfsdp,
        use_ddp=use_ddp,
        sharded_bf16=sharded_bf16,
        param_dtype=torch.bfloat16 if sharded_bf16 else None,
        master_dtype=torch.float32 if fp32_master_weights or not sharded_bf16 else None,
        reduce_dtype=REDUCE_DTYPES[reduce_dtype],
        autocast_dtype=torch.bfloat16 if bf16 and not sharded_bf16 else None,
        fp8_all_gather=fp8 and use_fsdp and fp8_recipe == "tensorwise",
        cp_size=cp_size,
        dp_replicate=dp_replicate,
    )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_megatron_fsdp(device_type: str, *, fp8: bool) -> None:
    check_megatron_fsdp_available(torch.device(device_type))
    if fp8:
        raise ValueError(
            "parallelism.strategy=mfsdp does not support torchao FP8 (Megatron-FSDP quantises only "
            "TransformerEngine parameters); use parallelism.strategy=fsdp2 with fp8.enabled=true"
        )
