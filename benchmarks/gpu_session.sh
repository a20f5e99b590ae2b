#!/usr/bin/env bash
# One call on the lent GPU machine: set up from the carried wheels, then run one named job. Each job fits the
# 10-minute limit of a device call; results land in $OUT (or benchmarks/results without it).
#
#   bash benchmarks/gpu_session.sh tests        # GPU tests of FP8 / quant stats (tests/precision/test_fp8_gpu.py)
#   bash benchmarks/gpu_session.sh small        # table: ESM-2 8M, 150M, 650M x 4 variants
#   bash benchmarks/gpu_session.sh large        # table: ESM-2 3B, Llama 3 1B x 4 variants (MERGE=<json> to merge)
#   bash benchmarks/gpu_session.sh fp8sweep     # ESM-2 650M and 3B: FP8 recipes and width filters, with profiles
#   bash benchmarks/gpu_session.sh loss3b       # ESM-2 3B: 500-step loss, bf16 vs FP8 (warm-up, decay, clipping)
#   bash benchmarks/gpu_session.sh qstats       # quant-stats cost at freq=1 / freq=10 (ESM-2 650M, packed FP8)
#   bash benchmarks/gpu_session.sh llama        # Llama 3 1B: split packing (0% pad) vs greedy (50%), bf16 and FP8
#   bash benchmarks/gpu_session.sh params       # fp32+autocast vs bf16 weights vs bf16 weights + fp32 master
#   bash benchmarks/gpu_session.sh tokens       # ESM-2 650M / 3B at 16k, 32k, 64k tokens per micro-batch
#   bash benchmarks/gpu_session.sh compile      # ESM-2 650M: max-autotune (GEMM epilogue fusion) and CUDA graphs
#                                               # (cu_seq_lens padded to a multiple of 64 so graphs replay)
#   bash benchmarks/gpu_session.sh fp8modules   # ESM-2 650M, Llama 3 1B: FP8 on the MLP only / on QKV + MLP
#   bash benchmarks/gpu_session.sh fa4libs      # carry [".fa4a"] alone: unpack the CUTLASS DSL CUDA 13 libraries
#                                               # (cu13.tar.xz, 63.5 MB) to /tmp/fa4x of the machine. The tracked tree
#                                               # travels too and the two no longer fit 64 MiB, so the archive goes in
#                                               # parts, one folder each (.fa4a1/cu13.tar.xz.part-aa, .fa4a2/...-ab,
#                                               # from split -b 32M, and NPARTS in each), one folder carried per
#                                               # fa4libs call, back to back on one warm machine (/tmp survives);
#                                               # the call that brings the last part unpacks
#   bash benchmarks/gpu_session.sh fa4          # call 2, at once on the same warm machine, carry [".fa4b", ".whl",
#                                               # ".data"]: ESM-2 650M with FA4 vs FA2 (.fa4b: flash-attn-4 and the
#                                               # rest of its wheels). 92 MB of libraries do not fit one call.
#   bash benchmarks/gpu_session.sh fa4 ARGS...  # the same, running bench_train.py ARGS instead
#   bash benchmarks/gpu_session.sh fa4tests     # the FA4 GPU tests (after fa4libs)
#   bash benchmarks/gpu_session.sh suite        # the whole suite there: CPU tests (8 workers) under the machine's
#                                               # torch / transformers, then every GPU test
#   bash benchmarks/gpu_session.sh ab DIR ARGS  # bench_train.py ARGS with the code in DIR (an older tree: DIR/src,
#                                               # DIR/benchmarks), then with this tree, in one call (A/B rows)
#   bash benchmarks/gpu_session.sh gputests FILES  # the GPU tests of FILES (e.g. tests/models/test_amplify_gpu.py)
#   bash benchmarks/gpu_session.sh use ARGS     # benchmarks/bench_use.py ARGS (e.g. --skip-embed --decode-variants)
#   bash benchmarks/gpu_session.sh train NAME ARGS # one `bioscale train ARGS` run in /tmp/runs/NAME, then its
#                                               # steady-state throughput (benchmarks/train_throughput.py) into $OUT
#
# benchmarks/NOTES.md says what each job is expected to show.
# Needs: the repository's .whl folder carried (torchao and friends are not installed there) and the shared data
# (uniref90_sample.parquet, opengenome2_metagenomics_sample.fasta) in $BIOSCALE_SHARED_DATA, default ../shared/data
# (a carried .data is linked there). benchmarks/stage_device.sh stages .whl, .data, .ref (and --fa4 the FA4 folders).
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:?usage: gpu_session.sh tests|small|large|fp8sweep|loss3b|qstats|llama|params|tokens|compile|fp8modules|fa4libs|fa4|fa4tests}
out=${OUT:-benchmarks/results}
if [ "$job" = fa4libs ]; then  # nothing else travels with this call: the libraries alone fill it
  mkdir -p /tmp/fa4x /tmp/fa4parts
  if [ -f .fa4a/cu13.tar.xz ]; then tar -xJf .fa4a/cu13.tar.xz -C /tmp/fa4x; du -sh /tmp/fa4x; exit 0; fi
  cp .fa4a*/cu13.tar.xz.part-* /tmp/fa4parts/
  have=$(ls /tmp/fa4parts | wc -l); want=$(cat .fa4a*/NPARTS | head -1)
  if [ "$have" -lt "$want" ]; then echo "fa4libs: $have of $want parts on this machine; carry the next"; exit 0; fi
  cat /tmp/fa4parts/cu13.tar.xz.part-* | tar -xJ -C /tmp/fa4x && du -sh /tmp/fa4x
  exit 0
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# A carried copy of the shared data (benchmarks/stage_device.sh): where the recipes look for it (../shared/data/...).
if [ -d "$PWD/.data" ] && [ ! -e "$PWD/../shared/data" ]; then
  mkdir -p "$PWD/../shared" && ln -s "$PWD/.data" "$PWD/../shared/data"
fi
export BIOSCALE_SHARED_DATA=${BIOSCALE_SHARED_DATA:-$PWD/../shared/data}
# The reference implementations (test oracles and the ref_padded rows): a carried copy (.ref) or ../shared/reference.
if [ -d "$PWD/.ref" ]; then export BIOSCALE_REFERENCE_DIR=${BIOSCALE_REFERENCE_DIR:-$PWD/.ref}; fi

# No package index there: every dependency is in the folder. --target: the system site is not writable for all.
if [ ! -d /tmp/site/torchao ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PYTHONPATH:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)"

bench() { python benchmarks/bench_train.py --out-dir "$out" ${MERGE:+--merge "$MERGE"} --time-budget-s 540 "$@"; }

case "$job" in
  tests)
    python -m pytest -q tests/precision/test_fp8_gpu.py -p no:cacheprovider 2>&1 | tail -30 ;;
  small)
    bench --models esm2_8M,esm2_150M,esm2_650M ;;
  large)
    bench --models esm2_3B,llama3_1B ;;
  fp8sweep)
    bench --models esm2_650M,esm2_3B --variants packed,packed_fp8,packed_fp8:min_features=2048,packed_fp8:recipe=rowwise \
      --profile --steps 8 --warmup 4 ;;
  loss3b)
    bench --models esm2_3B:tokens=4096:ac=none --variants packed,packed_fp8 --loss-compare-steps 500 \
      --lr 2e-4 --lr-warmup-steps 100 ;;
  qstats)
    bench --models esm2_650M,esm2_3B --variants packed_fp8,packed_fp8:qstats=10,packed_fp8:qstats=1 --steps 20 ;;
  llama)
    bench --models llama3_1B,llama3_1B:packing=greedy --variants packed,packed:params=bf16-master,packed_fp8 \
      --steps 8 --warmup 4 --profile ;;
  params)
    bench --models esm2_650M,esm2_3B:tokens=16384:ac=none \
      --variants packed,packed:params=bf16,packed:params=bf16-master --steps 8 --warmup 4 ;;
  tokens)
    bench --models @tokens-esm2 --variants packed:params=bf16-master --steps 8 --warmup 4 ;;
  compile)
    bench --models esm2_650M --variants packed:params=bf16-master,packed:params=bf16-master:compile=max-autotune-no-cudagraphs,packed:params=bf16-master:cu_pad=64:compile=reduce-overhead \
      --steps 8 --warmup 4 --profile ;;
  fp8modules)
    bench --models esm2_650M,llama3_1B --variants packed,packed_fp8,packed_fp8:modules=mlp,packed_fp8:modules=attention.qkv_proj+mlp \
      --steps 8 --warmup 4 ;;
  fa4|fa4tests)
    test -d /tmp/fa4x/nvidia_cutlass_dsl/cu13 || { echo "run the fa4libs job first, on this machine" >&2; exit 3; }
    pip install -q --no-index --no-deps --target /tmp/fa4site .fa4b/*.whl
    cp -r --update=none /tmp/fa4x/nvidia_cutlass_dsl/. /tmp/fa4site/nvidia_cutlass_dsl/
    # --target installs skip .pth files: put the DSL's package folder on the path by hand.
    export PYTHONPATH="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
    if [ "$job" = fa4tests ]; then  # the FA4 GPU tests: the kernel against FA2, and the trainer's model.flash_impl
      python -m pytest -q -m gpu -p no:cacheprovider tests/models/test_flash_impl.py \
        tests/train/test_train_gpu.py::test_fa4_through_the_trainer_matches_fa2 2>&1 | tail -15
    elif [ $# -gt 1 ]; then  # bench arguments given: run those with FA4 importable
      bench "${@:2}"
    else
      bench --models esm2_650M:tokens=40960 --variants packed:params=bf16,packed:params=bf16:attn=FA4 \
        --steps 10 --warmup 5 --profile
    fi ;;
  suite)
    python -m pytest -q -p no:cacheprovider -m "not gpu and not multi_gpu" -n 8 tests 2>&1 | tail -8
    python -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -25 ;;
  use)  # bench_use.py ARGS (inference: embeddings, generation, decode-step variants and profiles)
    python benchmarks/bench_use.py --data "$BIOSCALE_SHARED_DATA" --out-dir "$out" "${@:2}" ;;
  gputests)
    python -m pytest -q -p no:cacheprovider -m gpu "${@:2}" 2>&1 | tail -25 ;;
  train)
    name=${2:?usage: gpu_session.sh train NAME ARGS}
    mkdir -p "$out" && rm -rf "/tmp/runs/$name"
    # The progress bar's carriage-return updates would fill the output: keep the log lines.
    python -m bioscale.cli train "${@:3}" run_dir="/tmp/runs/$name" checkpoint.save_final_model=false 2>&1 \
      | tr '\r' '\n' | grep -v 'step/s' | tail -4
    python benchmarks/train_throughput.py "/tmp/runs/$name" --skip-steps "${SKIP_STEPS:-20}" --json "$out/$name.json"
    cp "/tmp/runs/$name/metrics.jsonl" "$out/$name.metrics.jsonl" ;;
  ab)
    old=${2:?usage: gpu_session.sh ab DIR ARGS}
    (cd "$old" && PYTHONPATH="$PWD/src:/tmp/site" python benchmarks/bench_train.py --out-dir "$out/before" "${@:3}")
    python benchmarks/bench_train.py --out-dir "$out/after" "${@:3}" ;;
  *)
    echo "unknown job $job" >&2; exit 2 ;;
esac
