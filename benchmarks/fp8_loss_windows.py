"""FP8 against fp32 on the CPU: gpt_tiny trained 300 iterations in fp32 and in FP8 (hybrid, tensorwise
and delayed scaling), one run at a time, and the mean training loss of every 50-iteration window.

    python benchmarks/fp8_loss_windows.py [--out runs/fp8_windows] [--iterations 300] [--window 50]
    python benchmarks/fp8_loss_windows.py --read-only      # the table from runs already there

Every run is the same single-process job (``parallel=single training=cpu_demo``, global batch 4, the
same data and seed), so the runs differ only in the GEMMs. Prints the table and the largest relative
difference of a window mean against fp32; exits 1 above ``--tolerance`` (0.5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {"fp32": [], "tensorwise": ["training.fp8_format=hybrid", "training.fp8_recipe=tensorwise"],
        "delayed": ["training.fp8_format=hybrid", "training.fp8_recipe=delayed"]}


def train(run_dir: Path, iterations: int, extra: list[str]) -> None:
    overrides = ["parallel=single", "training=cpu_demo", "training.global_batch_size=4",
                 f"training.train_iters={iterations}", f"training.eval_interval={iterations}", "training.eval_iters=1",
                 "logging.log_interval=50", f"logging.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "megatron_lite.train", *overrides], cwd=REPO, env=env, check=True)


def window_means(run_dir: Path, window: int) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    return [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1, window)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fp8_windows")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--read-only", action="store_true", help="tabulate existing runs, train nothing")
    args = parser.parse_args()
    if not args.read_only:
        for name, extra in RUNS.items():  # one at a time
            train(args.out / name, args.iterations, extra)
    means = {name: window_means(args.out / name, args.window) for name in RUNS}
    print(f"{'iterations':<12}" + "".join(f"{name:>12}" for name in RUNS) + "  rel. diff tensorwise / delayed")
    worst = 0.0
    for k, ref in enumerate(means["fp32"]):
        diffs = [abs(means[n][k] - ref) / ref for n in ("tensorwise", "delayed")]
        worst = max(worst, *diffs)
        span = f"{k * args.window + 1}-{(k + 1) * args.window}"
        print(f"{span:<12}" + "".join(f"{means[n][k]:>12.4f}" for n in RUNS) + f"  {diffs[0]:.2%} / {diffs[1]:.2%}")
    print(f"largest window difference against fp32: {worst:.2%} (tolerance {args.tolerance:.1%})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
