#!/usr/bin/env bash
# One-shot GPU check of the fused kernels, for a CUDA machine (written for an H200). Installs nothing.
# Builds the csrc extension with its CUDA kernels, runs the op tests (CUDA-marked ones: csrc, TE/apex
# where importable) and the kernel benchmark; logs and JSON go to the output directory.
#   Needs: a CUDA build of torch in $PYTHON, nvcc in $CUDA_HOME (default /usr/local/cuda).
#   Usage: bash benchmarks/gpu_check.sh [output dir, default gpu_check_out]
#   BENCH_ARGS="--no-compile" skips torch.compile of the references (saves a minute or two).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-8}
export MEGATRON_LITE_BUILD_VERBOSE=1
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else
  "gpu_check.sh: needs a CUDA build of torch and a visible GPU")'
# Compile for this GPU only (sm_90 on an H200): much faster than torch's default architecture list.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export TORCH_CUDA_ARCH_LIST

echo "== build ($(date -u +%T))"
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/build.log"
import time, torch
from megatron_lite.ops import csrc
t0 = time.perf_counter()
ext = csrc.extension()
assert ext is not None and ext.with_cuda, "the csrc CUDA build failed (compiler output above)"
print(f"built {ext.__file__} in {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()}")
PY

# Tests and benchmark both run even if one fails; the exit status is the first failure's.
echo "== tests ($(date -u +%T))"
status=0
bench_status=0
"$PYTHON" -m pytest -q -ra tests/test_ops_cuda.py tests/test_ops.py tests/test_ops_nvcc.py 2>&1 | tee "$OUT/tests.log" || status=$?
echo "== benchmark ($(date -u +%T))"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$PYTHON" benchmarks/kernels.py --device cuda --dtype bf16 --json "$OUT/kernels_bf16.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/kernels_bf16.log" || bench_status=$?
echo "== done ($(date -u +%T)): tests exit status $status, benchmark $bench_status"
[ "$status" -ne 0 ] && exit "$status"
exit "$bench_status"
