"""Process groups, the parallel plan, and parallelism applied to a single-device model from outside.

:mod:`bioscale.distributed.init` starts and stops the process group from torchrun's environment (NCCL on GPU, gloo on
CPU) and offers the few collectives the training loop needs; :mod:`bioscale.distributed.plan` decides the strategy
and precision of a run (:func:`plan_parallelism`); :mod:`bioscale.distributed.cp_mesh` arranges the ranks and holds
the loop's view of context parallelism (:class:`ContextParallel`, built on
:mod:`bioscale.distributed.context_parallel`); :mod:`bioscale.distributed.parallelize` holds the ``apply_*`` functions
and :func:`parallelize`, which applies them in torchtitan's order.
"""

from bioscale.distributed.cp_mesh import ContextParallel, ParallelMesh, build_parallel_mesh
from bioscale.distributed.init import (
    DistInfo,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    get_world_size,
    init_distributed,
)
from bioscale.distributed.parallelize import (
    apply_ac,
    apply_compile,
    apply_data_parallel,
    apply_ddp,
    apply_fsdp,
    grad_sync,
    parallelize,
    unwrap_model,
)
from bioscale.distributed.plan import ParallelPlan, plan_parallelism, wants_one_rank_group

__all__ = [
    "ContextParallel",
    "DistInfo",
    "ParallelMesh",
    "ParallelPlan",
    "all_reduce_sum",
    "apply_ac",
    "apply_compile",
    "apply_data_parallel",
    "apply_ddp",
    "apply_fsdp",
    "barrier",
    "build_parallel_mesh",
    "destroy_distributed",
    "get_world_size",
    "grad_sync",
    "init_distributed",
    "parallelize",
    "plan_parallelism",
    "unwrap_model",
    "wants_one_rank_group",
]
