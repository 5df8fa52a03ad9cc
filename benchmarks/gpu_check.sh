#!/usr/bin/env bash
# One prepared GPU check (written for one H200, ≤ 9 minutes from a cold start): everything a short GPU
# run can measure, every stage under its own `timeout`, results written as each stage ends.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT]      (default OUT: gpu_check_out)
#
# Stages (OUT/<stage>.log each; OUT/stages.jsonl; OUT/summary.json rebuilt after every stage):
#   deps     install the wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime; the GPU image
#            lacks them) with pip --no-index --target, unless they import already
#   env      GPU name, clocks, power limit, torch/CUDA/NCCL/TE/apex versions, apex extensions -> env.json
#   build    the csrc extension with CUDA kernels for this GPU's arch only, all cores; fails if the
#            build has no CUDA kernels
#   tests    the CUDA tests and the vendor guard tests -> tests.xml (junit)
#   mfu_gpt_csrc, mfu_gpt_torch   gpt_1p5b, seq 2048, bf16, vocab 50257, micro batch as large as fits,
#            12 iterations, kernel_backend csrc then torch (same micro batch): metrics.jsonl each; the
#            summary has the median of iterations 4–12 and the csrc-vs-torch loss agreement
#   mfu_gpt_fp8  gpt_1p5b as mfu_gpt_csrc (same micro batch) with FP8 GEMMs (training.fp8_format=hybrid,
#            tensorwise; torch._scaled_mm): the summary's fp8_vs_bf16 is its tokens/s over mfu_gpt_csrc's
#   mfu_llama_csrc  llama_1b with csrc, if time allows
#   kernels  benchmarks/kernels.py, every importable backend -> kernels.json
#   compile  torch.compile of the reference ops, last, only with time left -> kernels_compile.json
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs every stage on the CPU with tiny shapes (CI runs it:
# tests/test_gpu_check.py), so the plumbing, the timeouts and the summary are exercised without a GPU.
# GPU_CHECK_BUDGET_S (default 540; 1200 dry) caps the whole run; GPU_CHECK_TIMEOUT_<STAGE>=S overrides one
# stage's timeout. The exit status is 0 only if every stage that ran passed and the losses agree.
#
# The wheels, made once on any machine with a package index (all three are pure Python; antlr4 4.9.3
# exists only as a source archive on PyPI, so it is built into a wheel; PyYAML, which omegaconf also
# needs, comes with the image's transformers):
#   pip download --no-deps -d .whl "hydra-core==1.3.2" "omegaconf==2.3.0"
#   pip wheel --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
# .whl/ is git-ignored: hand it to the GPU machine with the working tree (the device tool's carry).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
PYTHON=${PYTHON:-python}
DEPS_DIR=${GPU_CHECK_DEPS_DIR:-${TMPDIR:-/tmp}/megatron_lite_gpu_check_deps}
export PYTHONPATH="$DEPS_DIR:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
# Stage timeouts (s). The dry run's are generous: it runs on shared CI cores.
if [ "$DRY" = 1 ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-1200}; T_ENV=120; T_BUILD=600; T_TESTS=180; T_MFU=300; T_KERNELS=120; T_COMPILE=120
else
  BUDGET=${GPU_CHECK_BUDGET_S:-540}; T_ENV=60; T_BUILD=300; T_TESTS=150; T_MFU=150; T_KERNELS=120; T_COMPILE=180
fi
: > "$OUT/stages.jsonl"
printf '{"dry_run": %s, "budget_s": %s, "started": "%s", "precision": "%s"}\n' \
  "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET" "$(date -u +%FT%TZ)" \
  "$([ "$DRY" = 1 ] && echo fp32 || echo bf16)" > "$OUT/meta.json"
STATUS=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

record() {  # stage status rc seconds timeout reason
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "reason": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" >> "$OUT/stages.jsonl"
  "$PYTHON" benchmarks/gpu_check.py summary "$OUT" > /dev/null 2>&1 || true
  echo "== $1: $2 ($4 s${6:+; $6})"
}

# stage NAME DEFAULT_TIMEOUT MIN_SECONDS COMMAND...: runs COMMAND under `timeout` (the smaller of the
# default, GPU_CHECK_TIMEOUT_<NAME> and the time left), its output in OUT/NAME.log; skipped when less
# than MIN_SECONDS are left.
stage() {
  local name=$1 limit=$2 min=$3; shift 3
  local var="GPU_CHECK_TIMEOUT_${name^^}" left
  limit=${!var:-$limit}
  left=$(( $(remaining) - 5 ))
  if [ "$left" -lt "$min" ]; then record "$name" skipped null 0 "$limit" "no time left (${left} s)"; return 0; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (timeout $limit s, $(date -u +%T))"
  local t0 rc status reason="" ms seconds
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  seconds="$((ms / 1000)).$(( ms % 1000 / 100 ))"
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; reason="ran past ${limit} s"; STATUS=1
  else status=failed; reason="exit $rc: $(tail -n 1 "$OUT/$name.log" | tr -d '"\\' | cut -c1-160)"; STATUS=1
  fi
  record "$name" "$status" "$rc" "$seconds" "$limit" "$reason"
  return 0
}

# ---- deps ----
if "$PYTHON" -c "import hydra, omegaconf" > /dev/null 2>&1; then
  record deps skipped null 0 0 "hydra and omegaconf import already"
elif compgen -G ".whl/*.whl" > /dev/null; then
  stage deps 60 5 "$PYTHON" -m pip install --no-index --no-deps --target "$DEPS_DIR" .whl/*.whl
else
  record deps failed 1 0 0 "hydra/omegaconf missing and no .whl/ folder (see the pip download command in this script)"
  STATUS=1
fi

# ---- env, build, tests ----
stage env "$T_ENV" 5 "$PYTHON" benchmarks/gpu_check.py env "$OUT/env.json"
if [ "$DRY" = 1 ]; then
  stage build "$T_BUILD" 5 "$PYTHON" -m megatron_lite.ops
  stage tests "$T_TESTS" 10 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/test_ops_cuda.py --junitxml="$OUT/tests.xml"
else
  ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
  stage build "$T_BUILD" 60 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PYTHON" -m megatron_lite.ops --require-cuda
  stage tests "$T_TESTS" 30 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops_vendor.py \
    --junitxml="$OUT/tests.xml"
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
COMMON=(training.train_iters=12 training.eval_iters=0 logging.log_interval=1
        optimizer.lr_warmup_iters=2)
stage mfu_gpt_csrc "$T_MFU" 30 "$PYTHON" benchmarks/gpu_check.py train "$OUT" mfu_gpt_csrc "${MB[@]}" -- \
  "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=csrc
stage mfu_gpt_torch "$T_MFU" 30 "$PYTHON" benchmarks/gpu_check.py train "$OUT" mfu_gpt_torch \
  --micro-batch-of mfu_gpt_csrc "${MB[@]}" -- "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=torch
stage mfu_gpt_fp8 "$T_MFU" 30 "$PYTHON" benchmarks/gpu_check.py train "$OUT" mfu_gpt_fp8 \
  --micro-batch-of mfu_gpt_csrc "${MB[@]}" -- "${GPT[@]}" "${COMMON[@]}" model.kernel_backend=csrc training.fp8_format=hybrid
stage mfu_llama_csrc "$T_MFU" 60 "$PYTHON" benchmarks/gpu_check.py train "$OUT" mfu_llama_csrc "${MB[@]}" -- \
  "${LLAMA[@]}" "${COMMON[@]}" model.kernel_backend=csrc

# ---- kernel benchmark; torch.compile last ----
if [ "$DRY" = 1 ]; then
  BENCH=(--device cpu --models tiny --tokens 128 --min-seconds 0.01 --copy-mb 8)
else
  BENCH=(--device cuda)
fi
stage kernels "$T_KERNELS" 20 "$PYTHON" benchmarks/kernels.py "${BENCH[@]}" --no-compile --json "$OUT/kernels.json"
stage compile "$T_COMPILE" 40 "$PYTHON" benchmarks/kernels.py "${BENCH[@]}" --compile-only --json "$OUT/kernels_compile.json"

# ---- summary ----
echo "== summary ($(( $(date +%s) - START )) s of $BUDGET)"
"$PYTHON" benchmarks/gpu_check.py summary "$OUT" || STATUS=1
if "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/summary.json"; then
  exit "$STATUS"
fi
exit 1
