#!/usr/bin/env bash
# The main job: pretrain a GPT with torchrun on this node (or one node of many).
#   bash scripts/pretrain_gpt.sh        # gpt_tiny on the bundled corpus, 8 CPU ranks as
#                                       # TP2 × PP2 (VPP2) × DP2, 300 iterations (~5 min on 2 cores)
#   bash scripts/pretrain_gpt.sh logging.dir=runs/try2 optimizer.lr=3e-4   # the same job, your changes
#   bash scripts/pretrain_gpt.sh model=llama3_8b parallel=single parallel.tensor_model_parallel_size=8 \
#       training=default training.global_batch_size=512
# Extra arguments are Hydra overrides on top of the main job's groups (parallel=tp2_pp2_dp2,
# training=cpu_demo, logging.dir=runs/main_job): naming another group (parallel=…, training=…) or
# logging.dir replaces that default, keys of a group (parallel.tensor_model_parallel_size=4) change it.
# Environment: NPROC_PER_NODE (default: the GPU count, 8 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; with NNODES > 1 the c10d rendezvous endpoint, RDZV_ID
# names the job), MAX_RESTARTS (torchrun's --max-restarts: 0 on CPU,
# 3 with GPUs; a restarted job resumes from its last checkpoint when checkpoint.save is set),
# DRY_RUN=1 (run the checks and print the launch command instead of running it).
# Before any rank starts, megatron_lite.launch (torchrun with the same options) runs every start-up
# check that needs no process group (config, checkpoint.load, tokenizer, data, logging.dir): a user
# error is one line and exit code 2. A rank's user error ends the script with its line and code
# (2, 3, 4), not torchrun's report; killing the launcher ends its ranks within seconds (exit 4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then default_nproc=$gpus; default_restarts=3; else default_nproc=8; default_restarts=0; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$default_nproc}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-$default_restarts}
if [ "$gpus" -eq 0 ]; then
  # Ranks share the CPU cores: one intra-op thread each avoids oversubscription.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# The main job's choices, each unless the caller names that group or key (Hydra rejects a group given twice).
defaults=()
for default in parallel=tp2_pp2_dp2 training=cpu_demo logging.dir=runs/main_job; do
  name=${default%%=*}
  chosen=0
  for arg in "$@"; do
    case "$arg" in "$name="* | "+$name="* | "++$name="*) chosen=1 ;; esac
  done
  if [ "$chosen" -eq 0 ]; then defaults+=("$default"); fi
done
if [ "$NNODES" -gt 1 ]; then
  # c10d rendezvous: a failure on any node restarts the workers of every node (static rendezvous
  # would restart only the failing node's); ranks are assigned at each rendezvous.
  rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron_lite}")
else
  rendezvous=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
launch=(--nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" "${rendezvous[@]}" --max-restarts "$MAX_RESTARTS"
  -m megatron_lite.train ${defaults[@]+"${defaults[@]}"} "$@")
command=("$PYTHON" -m megatron_lite.launch "${launch[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  "$PYTHON" -m megatron_lite.launch --check-only "${launch[@]}" >/dev/null
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if [ "${#defaults[@]}" -gt 0 ]; then
  echo "pretrain_gpt.sh: with ${defaults[*]} (name another group, or logging.dir, to replace one)"
fi
# The launcher checks the configuration, data, tokenizer and checkpoint once, before any rank starts.
exec "${command[@]}"
