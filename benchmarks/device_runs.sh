#!/usr/bin/env bash
# The lead's device calls of 2026-11-22, one job per call, so every number in benchmarks/results/ can be re-run.
# Run from the repository root on the device machine with `.whl` (wheels) and `.data` (a copy of ../shared/data's
# uniref90_sample.parquet, opengenome2_metagenomics_sample.fasta, porter6_secondary_structure_sample.parquet,
# evo2_dna_prompts.csv, never committed) carried:
#
#   bash benchmarks/device_runs.sh l1        # L1_esm2_650M, 200 steps, packed vs padded (issue 4)
#   bash benchmarks/device_runs.sh gpu-tests # every single-GPU test, then the inference benchmark (issues 2-5, 7, 8)
#   bash benchmarks/device_runs.sh eval      # ESM-2 8M pretrain -> perplexity, Q3/Q8 vs random init (issue 7)
#   bash benchmarks/device_runs.sh multi     # on nvidia-h200-x2: the multi_gpu tests (issue 6)
#
# Training-throughput tables come from benchmarks/gpu_session.sh (bench_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
job=${1:?usage: device_runs.sh l1|gpu-tests|eval|multi}
out=${OUT:-/tmp/bioscale_out}
mkdir -p "$out"
export BIOSCALE_SHARED_DATA=$PWD/.data PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1

case "$job" in
  l1)
    for mode in packed padded; do
      packing=true; [ "$mode" = padded ] && packing=false
      timeout 200 python -m bioscale.cli train --config-name L1_esm2_650M num_train_steps=200 \
        use_sequence_packing=$packing data.source=.data/uniref90_sample.parquet run_dir=/tmp/runs/650M_$mode \
        checkpoint.save_final_model=false 2>&1 | tail -2
      cp /tmp/runs/650M_$mode/summary.json "$out/summary_650M_$mode.json"
      cp /tmp/runs/650M_$mode/metrics.jsonl "$out/metrics_650M_$mode.jsonl"
    done ;;
  gpu-tests)
    timeout 330 python -m pytest -q -m "gpu and not multi_gpu" tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -3
    timeout 240 python benchmarks/bench_use.py --data .data --out-dir "$out" 2>&1 | tail -25 ;;
  eval)
    timeout 300 python benchmarks/bench_eval.py --data-dir .data --out-dir "$out" --work-dir /tmp/bench_eval 2>&1 | tail -30 ;;
  multi)
    nvidia-smi -L
    timeout 280 python -m pytest -q -m multi_gpu tests -p no:cacheprovider 2>&1 | tee "$out/mg_tests.log" | tail -3 ;;
  *)
    echo "unknown job $job" >&2; exit 2 ;;
esac
