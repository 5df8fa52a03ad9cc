#!/usr/bin/env bash
# One prepared GPU check whose results come back: a GPU is lent for about 15 minutes, of which the
# machine's start takes ~330 s, and hands back at most 8 files of OUT. The default budget (260 s) leaves
# time to run the whole check twice in one loan.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT]      (default OUT: gpu_check_out)
#
# OUT holds three files, each refreshed after every stage (a killed run leaves the latest):
#   summary.json     stage statuses and times, environment, test counts, MFU figures, loss agreement,
#                    kernel table (benchmarks/gpu_check.py assembles it)
#   gpu_check.tgz    the work directory: stage logs, run records, metrics, JSON (written to a temporary
#                    name and moved)
#   gpu_check.log    this console
# The work directory is outside OUT: GPU_CHECK_WORK, default a new ${TMPDIR:-/tmp}/gpu_check.XXXXXX.
#
# Stages, in order of value (limits in the table below; a core stage that fails, times out or gets no
# time fails the check; a best-effort one that runs out of time is `partial`, or `skipped` without time):
#   deps           install the wheels pinned in benchmarks/gpu_check_wheels.txt from .whl/, unless
#                  hydra and omegaconf import already
#   env            GPU, clocks, power limit, versions, CUDA_HOME / nvcc / torch's view of them -> env.json
#   build          the csrc extension with CUDA kernels for this GPU's arch (TORCH_CUDA_ARCH_LIST and
#                  MAX_JOBS exported once, before it, so every later stage loads this build)
#   mfu_gpt_csrc, mfu_gpt_torch   gpt_1p5b, seq 2048, bf16, vocab 50257, micro batch as large as fits,
#                  12 iterations, kernel_backend csrc then torch (same micro batch); a csrc run whose
#                  trainer fell back to torch fails; loss agreement gated on iteration 1
#   tests          the CUDA tests (best effort)
#   mfu_gpt_fp8    gpt_1p5b as mfu_gpt_csrc (same micro batch) with FP8 GEMMs (training.fp8_format=hybrid,
#                  tensorwise; torch._scaled_mm): summary's fp8_vs_bf16 = its tokens/s over mfu_gpt_csrc's
#                  (best effort)
#   kernels        benchmarks/kernels.py bandwidth table, every importable backend (best effort)
#   mfu_llama_csrc llama_1b with csrc (opt-in: GPU_CHECK_EXTRA=llama)
#   compile        torch.compile of the reference ops with the time left, rows written as measured
#                  (opt-in: GPU_CHECK_EXTRA=compile)
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs every stage on the CPU with tiny shapes (CI runs it:
# tests/test_gpu_check.py). GPU_CHECK_BUDGET_S caps the whole run (default 260; 1200 dry);
# GPU_CHECK_TIMEOUT_<STAGE>=S overrides one stage's limit; GPU_CHECK_EXTRA=llama,compile adds the
# opt-in stages. Exit status 0 only if summary.json says ok.
#
# The wheels (hydra-core, omegaconf, antlr4; the GPU image lacks them), made once on any machine with a
# package index from the one pins file (antlr4 4.9.3 is only a source archive on PyPI: pip wheel builds it):
#   pip wheel --no-deps -w .whl -r benchmarks/gpu_check_wheels.txt
# .whl/ is git-ignored: hand it to the GPU machine with the working tree (the device tool's carry).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
case "$WORK/" in "$OUT"/*) echo "GPU_CHECK_WORK=$WORK is inside OUT=$OUT; name a directory outside it" >&2; exit 2;; esac
PYTHON=${PYTHON:-python3}
PINS=benchmarks/gpu_check_wheels.txt
DEPS_DIR=${GPU_CHECK_DEPS_DIR:-${TMPDIR:-/tmp}/megatron_lite_gpu_check_deps}
EXTRA=",${GPU_CHECK_EXTRA:-},"
export PYTHONPATH="$DEPS_DIR:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
rm -f "$OUT/summary.json" "$OUT/gpu_check.tgz" "$OUT/gpu_check.log"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
trap 'exec 1>&- 2>&-; wait "$TEE" 2> /dev/null' EXIT  # the console log complete before the exit
START=$(date +%s)
CHECK=(benchmarks/gpu_check.py)

# Stage limits (s): LIMIT[stage] and the least time worth starting it with, MIN[stage]. The GPU
# defaults add up to the budget; the dry run's are generous (shared CI cores).
declare -A LIMIT MIN
if [ "$DRY" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}
  LIMIT=([deps]=60 [env]=120 [build]=600 [mfu_gpt_csrc]=300 [mfu_gpt_torch]=300 [tests]=180 [mfu_gpt_fp8]=300 [kernels]=120
         [mfu_llama_csrc]=300 [compile]=120)
else
  BUDGET=${GPU_CHECK_BUDGET_S:-260}
  LIMIT=([deps]=20 [env]=15 [build]=90 [mfu_gpt_csrc]=45 [mfu_gpt_torch]=40 [tests]=40 [mfu_gpt_fp8]=40 [kernels]=30
         [mfu_llama_csrc]=60 [compile]=600)
fi
MIN=([deps]=5 [env]=5 [build]=30 [mfu_gpt_csrc]=25 [mfu_gpt_torch]=25 [tests]=10 [mfu_gpt_fp8]=25 [kernels]=10
     [mfu_llama_csrc]=30 [compile]=20)
[ "$DRY" = 1 ] && MIN[build]=5
STATUS=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# record STAGE STATUS RC SECONDS LIMIT BEST_EFFORT [REASON]: appends the stage record (JSON written by
# Python), rebuilds OUT/summary.json and OUT/gpu_check.tgz.
record() {
  "$PYTHON" "${CHECK[@]}" record "$WORK" "$OUT" --stage "$1" --status "$2" --rc "$3" --seconds "$4" \
    --timeout "$5" --best-effort "$6" --reason "${7:-}" || echo "== (recording $1 failed)"
}

# stage NAME core|best COMMAND...: runs COMMAND under `timeout` (the smaller of LIMIT[NAME],
# GPU_CHECK_TIMEOUT_<NAME> and the time left), its output in WORK/NAME.log; not started with less
# than MIN[NAME] seconds left.
stage() {
  local name=$1 kind=$2; shift 2
  local var="GPU_CHECK_TIMEOUT_${name^^}" limit left best=0
  [ "$kind" = best ] && best=1
  limit=${!var:-${LIMIT[$name]}}
  left=$(( $(remaining) - 5 ))
  if [ "$left" -lt "${MIN[$name]}" ]; then
    [ "$best" = 1 ] || STATUS=1
    record "$name" "$([ "$best" = 1 ] && echo skipped || echo no_time)" null 0 "$limit" "$best" "no time left (${left} s)"
    echo "== $name: not started, ${left} s left"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (timeout $limit s, $(date -u +%T))"
  local t0 rc status ms seconds
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  seconds="$((ms / 1000)).$(( ms % 1000 / 100 ))"
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    if [ "$best" = 1 ]; then status=partial; else status=timeout; STATUS=1; fi
  else status=failed; STATUS=1
  fi
  record "$name" "$status" "$rc" "$seconds" "$limit" "$best"
  echo "== $name: $status ($seconds s)"
  return 0
}

"$PYTHON" "${CHECK[@]}" start "$WORK" "$OUT" --dry-run "$DRY" --budget "$BUDGET" \
  --limits "$(for s in "${!LIMIT[@]}"; do printf '%s=%s ' "$s" "${LIMIT[$s]}"; done)" || exit 2
echo "== gpu_check: OUT $OUT, work $WORK, budget $BUDGET s$([ "$DRY" = 1 ] && echo ' (dry run)')"

# ---- deps ----
if "$PYTHON" -c "import hydra, omegaconf" > /dev/null 2>&1; then
  record deps skipped null 0 0 0 "hydra and omegaconf import already"
elif "$PYTHON" "${CHECK[@]}" wheels .whl "$PINS"; then
  stage deps core "$PYTHON" -m pip install --no-index --no-deps --target "$DEPS_DIR" --find-links .whl -r "$PINS"
else
  record deps failed 2 0 0 0 "hydra/omegaconf missing and .whl/ does not hold exactly the wheels of $PINS"
  STATUS=1
fi

# ---- env; then the toolchain, exported once for the build and every later stage ----
if [ "$DRY" != 1 ]; then
  read -r ARCH FOUND_CUDA_HOME < <("$PYTHON" "${CHECK[@]}" toolchain)  # "-" for what is not found
  [ "${ARCH:--}" = - ] && ARCH=9.0
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  [ "${FOUND_CUDA_HOME:--}" != - ] && export CUDA_HOME=$FOUND_CUDA_HOME
  echo "== toolchain: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
fi
stage env core "$PYTHON" "${CHECK[@]}" env "$WORK/env.json"
if [ "$DRY" = 1 ]; then
  stage build core "$PYTHON" -m megatron_lite.ops
else
  stage build core "$PYTHON" -m megatron_lite.ops --require-cuda
fi

# ---- MFU runs ----
if [ "$DRY" = 1 ]; then
  # The bundled tokenizer's vocabulary (4096): GPT-2's 50257 would make the logits 16× the layers' work.
  GPT=(model=gpt_tiny model.num_layers=2 model.seq_length=64 training.precision=fp32)
  LLAMA=(model=llama_tiny model.num_layers=2 model.seq_length=64 training.precision=fp32)
  MB=(--micro-batch 2)
else
  GPT=(model=gpt_1p5b model.seq_length=2048 training.precision=bf16 model.vocab_size=50257)
  LLAMA=(model=llama_1b training.precision=bf16 model.vocab_size=50257)
  MB=()
fi
COMMON=(training.train_iters=12 training.eval_iters=0 logging.log_interval=1 optimizer.lr_warmup_iters=2)
stage mfu_gpt_csrc core "$PYTHON" "${CHECK[@]}" train "$WORK" mfu_gpt_csrc "${MB[@]}" -- \
  "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=csrc
stage mfu_gpt_torch core "$PYTHON" "${CHECK[@]}" train "$WORK" mfu_gpt_torch \
  --micro-batch-of mfu_gpt_csrc "${MB[@]}" -- "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=torch

# ---- CUDA tests, kernel bandwidth ----
TESTS=(tests/test_ops_cuda.py tests/test_ops_vendor.py
       tests/test_weight_grad.py::test_16_bit_weight_grads_accumulate_in_fp32_on_cuda)
[ "$DRY" = 1 ] && TESTS=(tests/test_ops_cuda.py)
stage tests best "$PYTHON" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" --junitxml="$WORK/tests.xml"
stage mfu_gpt_fp8 best "$PYTHON" "${CHECK[@]}" train "$WORK" mfu_gpt_fp8 \
  --micro-batch-of mfu_gpt_csrc "${MB[@]}" -- "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=csrc training.fp8_format=hybrid
if [ "$DRY" = 1 ]; then
  BENCH=(--device cpu --models tiny --tokens 128 --min-seconds 0.01 --copy-mb 8)
else
  BENCH=(--device cuda)
fi
stage kernels best "$PYTHON" benchmarks/kernels.py "${BENCH[@]}" --no-compile --json "$WORK/kernels.json"

# ---- opt-in: llama_1b, torch.compile (with whatever time is left) ----
if [[ $EXTRA == *,llama,* ]]; then
  stage mfu_llama_csrc best "$PYTHON" "${CHECK[@]}" train "$WORK" mfu_llama_csrc "${MB[@]}" -- \
    "${LLAMA[@]}" "${COMMON[@]}" model.kernel_backend=csrc
fi
if [[ $EXTRA == *,compile,* ]]; then
  LEFT=$(( $(remaining) - 15 ))
  stage compile best "$PYTHON" benchmarks/kernels.py "${BENCH[@]}" --compile-only \
    --time-budget "$(( LEFT > 0 ? LEFT : 0 ))" --json "$WORK/kernels_compile.json"
fi

# ---- summary ----
echo "== summary ($(( $(date +%s) - START )) s of $BUDGET)"
"$PYTHON" "${CHECK[@]}" summary "$WORK" "$OUT" || STATUS=1
if "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/summary.json"; then
  exit "$STATUS"
fi
exit 1
