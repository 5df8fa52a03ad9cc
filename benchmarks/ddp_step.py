"""Data parallelism against what users would otherwise pick: 2 gloo ranks of megatron_lite (its
``GradBuffer`` with bucketed, overlapped DP all-reduce, ``finalize_grads`` and ``Optimizer``) against
the same plain PyTorch GPT (benchmarks/step_overhead.py:PlainGPT, same weights, first losses checked
to agree) under torch's ``DistributedDataParallel``, same per-rank batch, fp32, CPU.

    python benchmarks/ddp_step.py [--rounds 8] [--layers 4] [--hidden 256] [--seq 256] [--micro-batch 4]
                                  [--threads 1] [--bucket-elements N] [--no-overlap]

Both models run in the same two processes, steps alternating; a step is timed on every rank from a
barrier to its end, the slower rank counts. Printed: median step time and global tokens/s
(ranks × micro batch × sequence / step time) of each, and the ratio ours / DDP (> 1: megatron_lite
is faster), for wall time and for the step's CPU time (process_time, both ranks summed), which
other jobs on a shared machine disturb less. Each rank uses ``--threads`` torch threads (default:
cores / 2).
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
from torch.nn.parallel import DistributedDataParallel

from megatron_lite import ops
from megatron_lite.config import load_config
from megatron_lite.model import build_gpt
from megatron_lite.optim import GradBuffer, Optimizer, finalize_grads
from megatron_lite.parallel.state import ParallelState, free_port
from step_overhead import PlainGPT, plain_optimizer

VOCAB = 4096


def _setup(args):
    overrides = ["model=gpt_tiny", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                 f"model.ffn_hidden_size={4 * args.hidden}", f"model.seq_length={args.seq}",
                 f"model.num_attention_heads={max(1, args.hidden // 64)}"]
    return load_config(overrides)


def _rank(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = ParallelState()
    cfg = _setup(args)
    m, o = cfg.model, cfg.optimizer
    ours = build_gpt(m, VOCAB)
    params = list(ours.parameters())
    grads = GradBuffer(params, state.dp_group, state.dp_size, state.dp_rank, overlap=not args.no_overlap,
                       bucket_elements=args.bucket_elements or o.grad_bucket_elements)
    optimizer = Optimizer(params, o, None)
    plain = PlainGPT(m, VOCAB)
    plain.load_from(ours, m)
    ddp = DistributedDataParallel(plain)
    plain_opt = plain_optimizer(plain, o)
    ids = torch.randint(0, VOCAB, (args.micro_batch, m.seq_length + 1), generator=torch.Generator().manual_seed(rank))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def ours_step() -> float:
        grads.start_step(1)
        loss = ours(tokens, labels).mean()
        loss.backward()
        finalize_grads(grads, state)
        optimizer.step(o.lr)
        return loss.item()

    def plain_step() -> float:
        plain_opt.zero_grad(set_to_none=True)
        loss = ddp(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), o.clip_grad, foreach=True)
        plain_opt.step()
        return loss.item()

    first = (ours_step(), plain_step())  # warm-up; the same start
    times = {"ours": [], "plain": []}
    for r in range(args.rounds):
        order = (("ours", ours_step), ("plain", plain_step)) if r % 2 == 0 else (("plain", plain_step), ("ours", ours_step))
        for name, step in order:
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            step()
            measured = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], dtype=torch.float64)
            wall = measured[:1].clone()
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(measured)
            times[name].append((wall.item(), measured[1].item()))
    if rank == 0:
        out.put({"first_losses": first, "times": times})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bucket-elements", type=int, help="default: optimizer.grad_bucket_elements")
    parser.add_argument("--no-overlap", action="store_true")
    args = parser.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_rank, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
    result = out.get()
    ours_loss, plain_loss = result["first_losses"]
    if abs(ours_loss - plain_loss) > 1e-4 * abs(plain_loss):
        raise SystemExit(f"first losses differ ({ours_loss} vs {plain_loss}): not the same model")
    tokens = world * args.micro_batch * args.seq
    row = {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "micro_batch": args.micro_batch,
           "ranks": world, "overlap": not args.no_overlap,
           "bucket_elements": args.bucket_elements or _setup(args).optimizer.grad_bucket_elements}
    ours, plain = result["times"]["ours"], result["times"]["plain"]
    for i, label in ((0, "wall"), (1, "cpu")):
        row[f"ours_{label}_ms"] = 1e3 * statistics.median(t[i] for t in ours)
        row[f"ddp_{label}_ms"] = 1e3 * statistics.median(t[i] for t in plain)
        row[f"{label}_ratio"] = statistics.median(p[i] / o[i] for p, o in zip(plain, ours))
    row["ours_tokens_per_s"] = tokens / (row["ours_wall_ms"] / 1e3)
    row["ddp_tokens_per_s"] = tokens / (row["ddp_wall_ms"] / 1e3)
    print(f"kernel backend: {ops.backend()}  torch {torch.__version__}  {world} gloo ranks  fp32  "
          f"L={args.layers} h={args.hidden} s={args.seq} micro batch {args.micro_batch}")
    print(f"{'':>12} {'ours':>10} {'DDP':>10} {'DDP/ours time':>14}")
    print(f"{'step ms':>12} {row['ours_wall_ms']:>10.1f} {row['ddp_wall_ms']:>10.1f} {row['wall_ratio']:>13.3f}×")
    print(f"{'CPU ms':>12} {row['ours_cpu_ms']:>10.1f} {row['ddp_cpu_ms']:>10.1f} {row['cpu_ratio']:>13.3f}×")
    print(f"{'tokens/s':>12} {row['ours_tokens_per_s']:>10.0f} {row['ddp_tokens_per_s']:>10.0f}")
    print(json.dumps({"benchmark": "ddp_step", "backend": ops.backend(), "rounds": args.rounds, "row": row}))


if __name__ == "__main__":
    main()
