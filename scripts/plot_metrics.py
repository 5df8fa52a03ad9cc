"""Plot loss and throughput curves from a run's metrics.jsonl to a PNG.

    python scripts/plot_metrics.py runs/main_job/metrics.jsonl [--output runs/main_job/metrics.png]

Each iteration is drawn with its latest record: after a restart or a resume from an earlier
checkpoint the redone iterations replace the ones logged before, so the curve never runs backwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def latest_per_iteration(records: list[dict], split: str | None = None) -> list[dict]:
    """The records of ``split`` (None: training), one per iteration, each iteration's last, in
    iteration order."""
    latest = {r["iteration"]: r for r in records if r.get("split") == split}
    return [latest[i] for i in sorted(latest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="path of metrics.jsonl")
    parser.add_argument("--output", type=Path, help="PNG to write (default: beside metrics.jsonl)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(f"error: {args.metrics} does not exist", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plotting needs matplotlib (pip install megatron-lite[plot])", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    train, valid = latest_per_iteration(records), latest_per_iteration(records, "valid")
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    ax_loss.plot([r["iteration"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
    ax_loss.set(xlabel="iteration", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_speed.plot([r["iteration"] for r in train], [r["tokens_per_s"] for r in train], lw=1)
    ax_speed.set(xlabel="iteration", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    output = args.output or args.metrics.with_name("metrics.png")
    fig.savefig(output, dpi=110)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
