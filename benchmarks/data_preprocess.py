"""Preprocessing throughput with 1 and more worker processes, against 1 worker in the same run.

    python benchmarks/data_preprocess.py [--copies 4] [--workers 1 2] [--repeats 3]

Input: the bundled corpus (KJV chapters) repeated --copies times into a temporary JSONL file,
tokenized with the bundled 4096-piece sentencepiece model. Wall-clock rates depend on what else
the machine runs; the CPU seconds (main process plus workers) show the work itself.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lite.data.corpus import BUNDLED_CORPUS  # noqa: E402
from megatron_lite.data.jsonl import iter_lines  # noqa: E402
from megatron_lite.data.preprocess import preprocess  # noqa: E402


def measured(source: Path, output: Path, workers: int):
    """(stats, user + system CPU seconds of this process and its workers) for one run."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    _, stats = preprocess(source, output, workers=workers)
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return stats, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus.jsonl"
        lines = [line for _, line in iter_lines(BUNDLED_CORPUS)]
        with open(source, "wb") as out:
            for _ in range(args.copies):
                out.writelines(lines)
        print(f"input: {source.stat().st_size / 1e6:.1f} MB, {len(lines) * args.copies} documents")
        reference = None
        for workers in args.workers:
            # Best of --repeats: on a shared machine the fastest run is the least disturbed.
            output = Path(tmp) / f"w{workers}"
            runs = [measured(source, output, workers) for _ in range(args.repeats)]
            stats, cpu = min(runs, key=lambda run: run[0].seconds)
            rate = stats.tokens / stats.seconds
            reference = reference or rate
            print(f"workers {workers}: {stats.line()}   {rate / reference:.2f}x of "
                  f"{args.workers[0]} worker(s); {cpu:.2f} CPU-s in all "
                  f"({stats.tokens / cpu:.0f} tokens per CPU-s)")


if __name__ == "__main__":
    main()
