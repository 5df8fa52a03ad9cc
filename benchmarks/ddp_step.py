"""Data parallelism against what users would otherwise pick: 2 gloo ranks of megatron_lite (its
``GradBuffer`` with bucketed DP all-reduce, ``finalize_grads`` and ``Optimizer``), once with the
reduction overlapped with the backward and once after it, against the same plain PyTorch GPT
(benchmarks/step_overhead.py:PlainGPT, same weights, first losses checked to agree) under torch's
``DistributedDataParallel``, same per-rank batch, fp32, CPU.

    python benchmarks/ddp_step.py [--rounds 8] [--layers 4] [--hidden 256] [--seq 256] [--micro-batch 4]
                                  [--threads 1] [--bucket-elements N] [--kernel-backend B]

The three run in the same two processes, one step each per round, the order rotating; a step is
timed on every rank from a barrier to its end, the slower rank counts. Printed: median step time
and global tokens/s (ranks × micro batch × sequence / step time) of each, the ratio DDP / ours
(> 1: megatron_lite is faster) for wall time and for the step's CPU time (process_time, both ranks
summed; other jobs on a shared machine disturb it less), and whether overlapping pays (synchronous
/ overlapped step time). Each rank uses ``--threads`` torch threads (default: cores / 2).
megatron_lite runs with the kernel backend its config names (``auto``), or ``--kernel-backend``.
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
    ops.use_backend(args.kernel_backend or m.kernel_backend)
    ids = torch.randint(0, VOCAB, (args.micro_batch, m.seq_length + 1), generator=torch.Generator().manual_seed(rank))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def ours(overlap: bool):
        model = build_gpt(m, VOCAB)
        params = list(model.parameters())
        grads = GradBuffer(params, state.dp_group, state.dp_size, state.dp_rank, overlap=overlap,
                           bucket_elements=args.bucket_elements or o.grad_bucket_elements)
        optimizer = Optimizer(params, o, None)

        def step() -> float:
            grads.start_step(1)
            loss = model(tokens, labels).mean()
            loss.backward()
            finalize_grads(grads, state)
            optimizer.step(o.lr)
            return loss.item()

        return model, step

    steps = {}
    overlapped_model, steps["ours_overlap"] = ours(overlap=True)
    _, steps["ours_sync"] = ours(overlap=False)
    plain = PlainGPT(m, VOCAB)
    plain.load_from(overlapped_model, m)
    ddp = DistributedDataParallel(plain)
    plain_opt = plain_optimizer(plain, o)

    def ddp_step() -> float:
        plain_opt.zero_grad(set_to_none=True)
        loss = ddp(tokens, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), o.clip_grad, foreach=True)
        plain_opt.step()
        return loss.item()

    steps["ddp"] = ddp_step
    first = {name: step() for name, step in steps.items()}  # warm-up; the same start
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            measured = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], dtype=torch.float64)
            wall = measured[:1].clone()
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(measured)
            times[name].append((wall.item(), measured[1].item()))
    if rank == 0:
        out.put({"first_losses": first, "times": times, "backend": ops.backend()})
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
    parser.add_argument("--kernel-backend", choices=ops.BACKENDS,
                        help="megatron_lite's fused-op backend (default: the model config's kernel_backend)")
    args = parser.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_rank, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
    result = out.get()
    losses = result["first_losses"]
    if max(abs(v - losses["ddp"]) for v in losses.values()) > 1e-4 * abs(losses["ddp"]):
        raise SystemExit(f"first losses differ ({losses}): not the same model")
    tokens = world * args.micro_batch * args.seq
    row = {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "micro_batch": args.micro_batch,
           "ranks": world, "bucket_elements": args.bucket_elements or _setup(args).optimizer.grad_bucket_elements}
    times = result["times"]
    for name, series in times.items():
        for i, label in ((0, "wall"), (1, "cpu")):
            row[f"{name}_{label}_ms"] = 1e3 * statistics.median(t[i] for t in series)
        row[f"{name}_tokens_per_s"] = tokens / (row[f"{name}_wall_ms"] / 1e3)
    for name in ("ours_overlap", "ours_sync"):
        for i, label in ((0, "wall"), (1, "cpu")):
            row[f"ddp_over_{name}_{label}"] = statistics.median(d[i] / o[i] for d, o in zip(times["ddp"], times[name]))
    row["sync_over_overlap_wall"] = statistics.median(s[0] / o[0] for s, o in zip(times["ours_sync"], times["ours_overlap"]))
    print(f"kernel backend: {result['backend']}  torch {torch.__version__}  {world} gloo ranks  fp32  "
          f"L={args.layers} h={args.hidden} s={args.seq} micro batch {args.micro_batch}  "
          f"buckets of {row['bucket_elements']:,} elements  {args.rounds} rounds")
    print(f"{'':>22} {'step ms':>9} {'CPU ms':>9} {'tokens/s':>9} {'DDP/this wall':>14} {'DDP/this CPU':>13}")
    for name, label in (("ours_overlap", "megatron_lite overlap"), ("ours_sync", "megatron_lite sync"), ("ddp", "torch DDP")):
        ratios = (f"{row[f'ddp_over_{name}_wall']:>13.3f}× {row[f'ddp_over_{name}_cpu']:>12.3f}×"
                  if name != "ddp" else "")
        print(f"{label:>22} {row[f'{name}_wall_ms']:>9.1f} {row[f'{name}_cpu_ms']:>9.1f} "
              f"{row[f'{name}_tokens_per_s']:>9.0f} {ratios}")
    print(f"overlap pays (sync / overlap step time): {row['sync_over_overlap_wall']:.3f}×")
    print(json.dumps({"benchmark": "ddp_step", "backend": result["backend"], "rounds": args.rounds, "row": row}))

if __name__ == "__main__":
    main()
