"""Tokens/s of gpt_tiny through the real trainer on 1, 2, 4 and 8 gloo CPU ranks, in several layouts,
at a fixed global batch (strong scaling), relative to the single rank measured in the same run.

    python benchmarks/scaling.py [--iters 6] [--worlds 1 2 4 8]

Each layout builds a ``Trainer`` and times ``train_step()`` (microbatches, pipeline schedule,
gradient reductions, AdamW); the first two iterations are warm-up, the median of the rest counts.
Caveat: this machine has 2 cores, so 2 ranks at most run in parallel and every rank beyond that
only adds splitting and gloo overhead: the figures show the framework's overhead per layout, not a
speed-up (each rank gets max(1, cores / ranks) threads, or ``--threads``). With other jobs on the
machine a 2-thread single rank suffers most (its threads wait for each other), so compare runs made
with ``--threads 1`` too. Tokens per CPU-second (the step's CPU time summed over all ranks, gloo's
threads included) depends much less on the other jobs: it is the efficiency figure to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness import RankPool  # noqa: E402

BASE = ["model=gpt_tiny", "training.micro_batch_size=2", "training.global_batch_size=16", "training.eval_iters=0",
        "logging.log_interval=1000"]
TP, PP, VPP, SP = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                   "parallel.virtual_pipeline_model_parallel_size", "parallel.sequence_parallel=true")
LAYOUTS = {
    1: {"single": []},
    2: {"DP2": [], "TP2": [f"{TP}=2"], "PP2": [f"{PP}=2"]},
    4: {"DP4": [], "TP2 DP2": [f"{TP}=2"], "TP2 PP2 SP": [f"{TP}=2", f"{PP}=2", SP], "PP4": [f"{PP}=4"],
        "PP2 VPP2 DP2": [f"{PP}=2", f"{VPP}=2"]},
    8: {"DP8": [], "TP2 PP2 VPP2 DP2 SP (main job)": ["parallel=tp2_pp2_dp2"], "TP4 DP2": [f"{TP}=4"],
        "PP4 DP2": [f"{PP}=4"]},
}


def _time_steps(overrides: list[str], iters: int, threads: int | None) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_lite.config import load_config, validate
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(overrides + [f"training.train_iters={iters}"])
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    times, cpu = [], []
    for _ in range(iters):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step()
        cpu.append(time.process_time() - start_cpu)
        dist.barrier()
        times.append(time.perf_counter() - start)
    state.destroy()
    return {"step_s": statistics.median(times[2:]), "cpu_s": statistics.median(cpu[2:]),
            "tokens": cfg.training.global_batch_size * cfg.model.seq_length}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--worlds", type=int, nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--logging-dir", default="/tmp/megatron_lite_scaling")
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        pool = RankPool(world, timeout=900)
        try:
            for name, overrides in LAYOUTS[world].items():
                results = pool.run(_time_steps, BASE + overrides + [f"logging.dir={args.logging_dir}"], args.iters,
                                   args.threads)
                step_s = max(r["step_s"] for r in results)
                cpu_s = sum(r["cpu_s"] for r in results)  # every rank's CPU time, gloo threads included
                tokens = results[0]["tokens"]
                rows.append({"ranks": world, "layout": name, "ms_per_step": 1e3 * step_s,
                             "tokens_per_s": tokens / step_s, "tokens_per_cpu_s": tokens / cpu_s})
                print(f"{world} ranks {name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        finally:
            pool.close()
    base = next((r for r in rows if r["ranks"] == 1), None)
    print(f"\ngpt_tiny, global batch 16 × 128 tokens, micro batch 2, fp32, gloo; 2 CPU cores shared by all ranks")
    print(f"{'ranks':>5}  {'layout':<32} {'ms/step':>9} {'tokens/s':>10} {'× 1 rank':>9} {'tokens/CPU-s':>13} "
          f"{'× 1 rank':>9}")
    for r in rows:
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}" if base else f"{'':>9}"
        rel_cpu = f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:>9.2f}" if base else f"{'':>9}"
        print(f"{r['ranks']:>5}  {r['layout']:<32} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10,.0f} {rel} "
              f"{r['tokens_per_cpu_s']:>13,.0f} {rel_cpu}")
    print(json.dumps({"benchmark": "scaling", "rows": rows}))


if __name__ == "__main__":
    main()
