#!/usr/bin/env bash
# Stage, in a fresh checkout, what a call on the lent GPU machine carries (that machine reaches no package index and
# sees only the working tree plus the carried, git-ignored folders):
#
#   .whl/   the wheels bioscale needs there and the machine lacks (hydra-core, omegaconf, antlr4, torchdata, torchao,
#           pydantic, the demo-data packages), for Python 3.12 x86-64 Linux;
#   .data/  a copy of ../shared/data (the recipes read ../shared/data/...: benchmarks/gpu_session.sh links the
#           carried copy there on the machine), .ref/ a copy of ../shared/reference (the test oracles);
#   --fa4   also flash-attn-4 and its wheels in .fa4b/, and the CUTLASS DSL CUDA 13 libraries as a .tar.xz in two
#           parts (.fa4a1/, .fa4a2/: a call carries at most 64 MiB with the tracked tree), for gpu_session.sh fa4libs.
#           On 2026-12-04 the registry's nvidia-cutlass-dsl 4.6.2-4.8.1 wheels held no `cutlass` Python package, so
#           `import flash_attn.cute` failed there (benchmarks/results/2026-12-04-h200-attention-cudnn.md).
#
# Every staged folder is added to .git/info/exclude, never committed. Then, e.g.:
#   run: bash benchmarks/gpu_session.sh tests        carry [".whl", ".data", ".ref"]
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
shared=${BIOSCALE_SHARED:-$top/../shared}
exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")"
for folder in .whl .data .ref .fa4a1 .fa4a2 .fa4b; do
  grep -qxF "/$folder/" "$exclude" 2>/dev/null || echo "/$folder/" >> "$exclude"
done

# Versions: the ones constraints.txt locks (CI's), where it names them.
locked() { grep -i "^$1==" constraints.txt | head -1; }
"$shared/tools/wheels-py312" "$(locked hydra-core)" "$(locked omegaconf)" "$(locked torchdata || echo torchdata)" \
  "torchao==0.18.0" "$(locked pydantic)" "$(locked pydantic_core)" "$(locked annotated-types)" \
  "$(locked typing-inspection || echo typing-inspection)" "$(locked pyhmmer)" "$(locked pyrodigal)" >/dev/null
# antlr4 4.9.3 (hydra-core's) ships no wheel: build one.
ls .whl/antlr4_python3_runtime-*.whl >/dev/null 2>&1 || (cd /tmp && python3 -m pip wheel -q --no-deps \
  -w "$top/.whl" "$(cd "$top" && locked antlr4-python3-runtime)")
rm -rf .data .ref && cp -r "$shared/data" .data && cp -r "$shared/reference" .ref && chmod -R u+w .data .ref

if [ "${1:-}" = --fa4 ]; then
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$work" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-cu13 \
    quack-kernels apache-tvm-ffi torch-c-dlpack-ext
  rm -rf .fa4a1 .fa4a2 .fa4b && mkdir -p .fa4a1 .fa4a2 .fa4b "$work/x"
  (cd "$work/x" && unzip -q "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl && rm -rf ./*.dist-info \
    && tar -cf - nvidia_cutlass_dsl | xz -T2 -6 > "$work/cu13.tar.xz")
  (cd "$work" && split -b 32M cu13.tar.xz cu13.tar.xz.part-)
  mv "$work/cu13.tar.xz.part-aa" .fa4a1/ && mv "$work/cu13.tar.xz.part-ab" .fa4a2/
  echo 2 > .fa4a1/NPARTS && echo 2 > .fa4a2/NPARTS
  find "$work" -maxdepth 1 -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec cp {} .fa4b/ \;
  rm -rf "$work"
  python3 - <<'EOF' || true
import glob, zipfile
names = [n for wheel in glob.glob(".fa4b/*.whl") for n in zipfile.ZipFile(wheel).namelist()]
if not any(n.endswith("cutlass/cute/__init__.py") for n in names):
    print("warning: no staged CUTLASS DSL wheel holds cutlass/cute: flash_attn.cute will not import there")
EOF
fi
du -sh .whl .data .ref .fa4* 2>/dev/null
