"""Process groups and data parallelism applied to a single-device model from outside.

:mod:`bioscale.distributed.init` starts and stops the process group from torchrun's environment (NCCL on GPU, gloo on
CPU) and offers the few collectives the training loop needs; :mod:`bioscale.distributed.parallelize` holds the
``apply_*`` functions (activation checkpointing, per-block ``torch.compile``, FSDP2, DDP) in torchtitan's order.
Context parallelism is a later addition (``bioscale.distributed.context_parallel``).
"""

from bioscale.distributed.init import (
    DistInfo,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    init_distributed,
)
from bioscale.distributed.parallelize import (
    apply_ac,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    grad_sync,
    unwrap_model,
)

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "apply_ac",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "barrier",
    "destroy_distributed",
    "grad_sync",
    "init_distributed",
    "unwrap_model",
]
