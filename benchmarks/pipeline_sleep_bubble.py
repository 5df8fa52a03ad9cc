"""The executor's own pipeline bubble, without CPU contention: stage modules that sleep.

    python benchmarks/pipeline_sleep_bubble.py [--ms 200] [--pp 2 4 8] [--schedules ...]

Each chunk's forward sleeps F, its input-gradient backward B and its weight-gradient backward W
(F = B = W = ``--ms`` for a full stage, 1/v of it per chunk) around tiny tensors; the weight part
goes through ``tensor_parallel.weight_grad`` like the linear layers' does, so the split schedules
run it at their BackwardWeight actions and the others inside the backward. Sleeping uses no core, so
8 gloo ranks on a small machine behave like 8 devices: the measured bubble is the real executor's
(its messages, waits and Python overhead) against the simulator's figure for the same lists at the
same costs. With p < 8 the 8 ranks hold 8/p pipelines side by side; the first one is traced.

For every schedule, p ∈ {2, 4, 8} and m ∈ {2p, 4p} it prints the simulated and the measured bubble
((makespan − mean per-rank compute time) / mean compute time, from the executor's trace), their
difference and the worst iteration's bubble; of ``--iterations`` traced iterations after a warm-up
the least disturbed one counts (on a shared machine a woken rank may wait for a core). The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_lite.parallel.state import ParallelState, free_port
from megatron_lite.pipeline import schedules as S
from megatron_lite.pipeline.executor import run_schedule
from megatron_lite.pipeline.simulate import simulate_schedule
from megatron_lite.pipeline.timeline import trace_bubble
from megatron_lite.tensor_parallel.weight_grad import weight_grad

WORLD = 8
SHAPE = (4,)


class _SleepWork:
    """The weight-gradient half of a sleeping stage: sleeps, then a zero gradient."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.zeros_like(weight)

    def add_to(self, main_grad: torch.Tensor) -> None:
        time.sleep(self.seconds)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, seconds):
        ctx.seconds, ctx.weight = seconds, weight
        time.sleep(seconds[0])
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds[1])
        return grad * 1.0, weight_grad(ctx.weight, _SleepWork(ctx.seconds[2])), None


class SleepStage(nn.Module):
    """A chunk that takes (F, B, W) seconds and computes the identity."""

    def __init__(self, seconds: tuple[float, float, float]):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.weight, self.seconds)


def _configs(args) -> list[tuple[str, int, int, int]]:
    return [(name, p, 2 if name in ("interleaved", "zbv") else 1, m)
            for p in args.pp for m in (2 * p, 4 * p) for name in args.schedules]


def _rank(rank: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = []
    for name, p, v, m in _configs(args):
        state = ParallelState(pp=p)
        seconds = tuple(args.ms / 1000 / v for _ in range(3))
        chunks = [SleepStage(seconds) for _ in range(v)]
        placement = S.placement_of(name)

        def forward_step(c, x, microbatch):
            y = chunks[c](torch.ones(SHAPE) if x is None else x)
            g = S.global_chunk(p, state.pp_rank, c, placement)
            return y.sum() if g == p * v - 1 else y

        actions = S.schedule(name, p, v, m, state.pp_rank)
        measured = []
        for iteration in range(1 + args.iterations):  # the first iteration warms up
            events: list = []
            dist.barrier()
            run_schedule(actions, chunks, state, [None] * m, forward_step, SHAPE, torch.float32,
                         trace=events, placement=placement)
            gathered: list = [None] * p
            dist.all_gather_object(gathered, events, group=state.pp_group)
            if iteration:
                measured.append(trace_bubble([e for rank_events in gathered for e in rank_events])["bubble_fraction"])
        if rank == 0:
            simulated = simulate_schedule(name, p, v, m).bubble_fraction
            rows.append(dict(schedule=name, p=p, v=v, m=m, simulated=simulated, measured=min(measured),
                             difference=min(measured) - simulated, worst_iteration=max(measured)))
        state.destroy()
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", type=float, default=200.0,
                        help="F = B = W of a full stage, in ms (200: message latency against stage time "
                             "as on GPUs; docs/performance.md)")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=list(S.SCHEDULES))
    parser.add_argument("--iterations", type=int, default=3,
                        help="traced iterations per configuration; the least disturbed one counts")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.perf_counter()
    ranks = mp.start_processes(_rank, args=(free_port(), args, out), nprocs=WORLD, start_method="spawn",
                               join=False)
    rows = out.get()
    ranks.join()
    print(f"{WORLD} gloo ranks, F = B = W = {args.ms:g} ms per full stage, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, {time.perf_counter() - start:.0f} s")
    print(f"{'schedule':>12} {'p':>2} {'v':>2} {'m':>3} {'simulated':>10} {'measured':>9} {'difference':>11} "
          f"{'worst iteration':>16}")
    for r in rows:
        print(f"{r['schedule']:>12} {r['p']:>2} {r['v']:>2} {r['m']:>3} {r['simulated']:>10.4f} "
              f"{r['measured']:>9.4f} {r['difference']:>+11.4f} {r['worst_iteration']:>16.4f}")
    worst = max(abs(r["difference"]) for r in rows)
    print(json.dumps({"benchmark": "pipeline_sleep_bubble", "ms": args.ms, "worst_difference": worst,
                      "rows": rows}))


if __name__ == "__main__":
    main()
