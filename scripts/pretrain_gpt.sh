#!/usr/bin/env bash
# The main job: pretrain a GPT with torchrun on this node (or one node of many).
#   bash scripts/pretrain_gpt.sh        # no arguments: gpt_tiny on the bundled corpus, 8 CPU ranks as
#                                       # TP2 × PP2 (VPP2) × DP2, 300 iterations (~5 min on 2 cores)
#   bash scripts/pretrain_gpt.sh model=gpt2_124m parallel=tp2_pp2_dp2 training.train_iters=1000
# Environment: NPROC_PER_NODE (default: the GPU count, 8 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500). Extra arguments are Hydra overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then default_nproc=$gpus; else default_nproc=8; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$default_nproc}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$gpus" -eq 0 ]; then
  # Ranks share the CPU cores: one intra-op thread each avoids oversubscription.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

if [ "$#" -eq 0 ]; then
  defaults=(parallel=tp2_pp2_dp2 training=cpu_demo logging.dir=runs/main_job checkpoint.save=runs/main_job/checkpoints)
else
  defaults=()  # Hydra rejects a key given twice: the caller's overrides stand alone
fi
# Validate once, before any rank starts: a bad config is one line and exit code 2.
"$PYTHON" -m megatron_lite.config --world-size $((NPROC_PER_NODE * NNODES)) "${defaults[@]}" "$@" >/dev/null
exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_lite.train "${defaults[@]}" "$@"
