"""Forward + backward time of one gpt_tiny step at TP = 1, 2, 4 on gloo CPU ranks, and the bytes
TP communicates per layer (counted) beside Megatron's analytic count.

    python benchmarks/tp_step.py [--steps 10] [--micro-batch 4]

Caveat on this machine: every rank shares the same 2 cores, so TP > 1 cannot be faster here; the
numbers show the overhead of the split and of gloo, not a GPU speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.config import load_config
from megatron_lite.model import build_gpt
from megatron_lite.optim import GradBuffer, finalize_grads
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.parallel.state import ParallelState, free_port

VOCAB = 4096


def _rank(rank: int, world: int, port: int, args, sp: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = ParallelState(tp=world)
    tp = TPGroup.from_state(state, sequence_parallel=sp)
    cfg = load_config(["model=gpt_tiny"]).model
    model = build_gpt(cfg, VOCAB, tp)
    grads = GradBuffer(model.parameters())
    ids = torch.randint(0, VOCAB, (args.micro_batch, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.steps + 2):
        dist.barrier()
        start = time.perf_counter()
        grads.start_step(1)
        model(ids, ids).mean().backward()
        finalize_grads(grads, state)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(statistics.median(times[2:]))
    dist.destroy_process_group()


def measure(world: int, args, sp: bool) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_rank, args=(world, free_port(), args, sp, out), nprocs=world, start_method="spawn")
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(["model=gpt_tiny"]).model
    bsh = args.micro_batch * cfg.seq_length * cfg.hidden_size
    rows = []
    base = measure(1, args, False)
    rows.append({"tp": 1, "sp": False, "ms": base * 1e3, "ratio_vs_tp1": 1.0, "comm_bytes_per_layer": 0})
    for tp in (2, 4):
        for sp in (False, True):
            t = measure(tp, args, sp)
            # Per layer and step: 4 all-reduces of b·s·h (no SP) or 6 all-gathers (2 of them the
            # backward's re-gathers of the column-parallel inputs) + 4 reduce-scatters of b·s·h (SP).
            # A ring sends (t−1)/t of the tensor per rank for an all-gather or a reduce-scatter and
            # twice that for an all-reduce: 8 (no SP) or 10 (SP) × (t−1)/t·b·s·h fp32 values.
            per_rank = 4 * (10 if sp else 8) * (tp - 1) / tp * bsh
            rows.append({"tp": tp, "sp": sp, "ms": t * 1e3, "ratio_vs_tp1": t / base, "comm_bytes_per_layer": per_rank})
    print(f"gpt_tiny fwd+bwd, micro batch {args.micro_batch}, seq {cfg.seq_length}, fp32, {os.cpu_count()} cores")
    print(f"{'TP':>3} {'SP':>5} {'ms/step':>9} {'× TP1':>7} {'bytes/rank/layer (ring)':>24}")
    for r in rows:
        print(f"{r['tp']:>3} {str(r['sp']):>5} {r['ms']:>9.1f} {r['ratio_vs_tp1']:>7.2f} {r['comm_bytes_per_layer']:>24,.0f}")
    print(json.dumps({"benchmark": "tp_step", "rows": rows}))


if __name__ == "__main__":
    main()
