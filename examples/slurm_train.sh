#!/bin/bash
# Multi-node bioscale training under SLURM: one task per node, torchrun starts one process per GPU on each node and
# the nodes meet at a c10d rendezvous on the first node.
#
#   sbatch --nodes=2 examples/slurm_train.sh L1_esm2_650M num_train_steps=2000
#   sbatch --nodes=16 examples/slurm_train.sh L2_esm2_650M_uniref data.source=/data/uniref50/
#
# Arguments: the recipe name, then any key=value overrides. The run directory is keyed by the job id, and the run
# resumes from its latest complete checkpoint, so a requeued or resubmitted job (same SLURM_JOB_ID, or RUN_DIR set)
# continues where it stopped. Environment knobs: RUN_DIR, GPUS_PER_NODE, MASTER_PORT.
#
#SBATCH --job-name=bioscale
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

RECIPE=${1:?usage: sbatch examples/slurm_train.sh <recipe> [key=value ...]}
shift

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RUN_DIR=${RUN_DIR:-runs/${RECIPE}-${SLURM_JOB_ID}}

# One process per GPU gets a few CPU threads each (data-loader workers are separate processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Long or packed sequences fragment the CUDA caching allocator without this.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Report NCCL problems instead of hanging silently; keep NCCL off the loopback and container interfaces.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}

echo "bioscale: $SLURM_NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $HEAD_NODE:$MASTER_PORT, run_dir $RUN_DIR"

# --kill-on-bad-exit: if one node's torchrun fails, stop the others instead of letting them wait in a collective.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$MASTER_PORT" \
    -m bioscale.cli train --config-name "$RECIPE" \
    run_dir="$RUN_DIR" \
    checkpoint.resume_from_checkpoint=true \
    "$@"
