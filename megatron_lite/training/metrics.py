"""Where a run's numbers go: the console line, ``metrics.jsonl``, wandb, tensorboard.

Only the logging rank (the first TP rank of the first DP replica's last pipeline stage, which holds
the loss) creates a ``MetricsLogger``; every other rank logs nothing. ``metrics.jsonl`` is only ever
appended to: a resumed run continues it (an iteration redone after a restart appears again, the
last record of an iteration is the one that counts); a new run in the same directory first moves
the earlier run's records aside (``records.py``). Per-iteration values go
to the file, wandb and tensorboard; the console line, every ``logging.log_interval`` iterations,
carries a timestamp and, as Megatron's, the learning rate and grad norm of that iteration and the
loss and throughput averaged over the interval (labelled as such).

The run records beside it (config, overrides, launches) are ``records.py``'s.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..config import Config, LoggingConfig

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per iteration to ``${logging.dir}/metrics.jsonl``, prints console
    lines (timestamped), and mirrors every record to wandb/tensorboard when enabled."""

    def __init__(self, cfg: LoggingConfig, full_config: Config):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self._file = open(self.path, "a", buffering=1)
        self._wandb = self._tensorboard = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self._wandb = _start_wandb(cfg, full_config)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, record: dict[str, Any], console: Optional[str] = None) -> None:
        """Append ``record`` (must hold ``iteration``; NaN/inf are written as null); print ``console``."""
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(finite) + "\n")
        if console is not None:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {console}", flush=True)
        step = record["iteration"]
        prefix = f"{record['split']}/" if "split" in record else "train/"
        numbers = {k: v for k, v in finite.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in numbers.items()}, step=step)
        if self._tensorboard is not None:
            for k, v in numbers.items():
                self._tensorboard.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _start_wandb(cfg: LoggingConfig, full_config: Config):
    import wandb  # its presence is checked at start-up, on every rank (training/startup.py)
    from omegaconf import OmegaConf

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode, dir=str(cfg.dir),
        config=OmegaConf.to_container(OmegaConf.structured(full_config)),
    )


# Throughput fields: their interval value is total work over total time (weighted by ms_per_iter).
_RATES = ("tokens_per_s", "tflops_per_device", "mfu", "mfu_noncausal")
_MEANS = ("loss", "ms_per_iter")


class IntervalAverage:
    """The console line's numbers: per-iteration records collected since the last line."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> dict[str, Any]:
        """The last record (its iteration's lr, grad norm, loss scale, consumed samples: Megatron prints
        these as they are now) with the loss and ms/iter replaced by their interval means (non-finite
        losses left out) and the throughputs by the interval's total over its total time; starts a
        new interval."""
        records, self.records = self.records, []
        out = dict(records[-1])
        times = [r["ms_per_iter"] for r in records]
        for key in _MEANS:
            values = [r[key] for r in records if _finite(r.get(key))]
            out[key] = sum(values) / len(values) if values else math.nan
        for key in _RATES:
            if all(_finite(r.get(key)) for r in records):
                out[key] = sum(r[key] * t for r, t in zip(records, times)) / sum(times)
        out["iterations_averaged"] = len(records)
        return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def console_line(r: dict[str, Any], train_iters: int) -> str:
    """Megatron-style (``r`` from ``IntervalAverage.take``): first the values at this iteration
    (consumed samples, global batch, lr, grad norm, loss scale), then, labelled, the means over the
    log interval (loss, ms/iter, throughput), then peak memory and ETA."""
    parts = [
        f"iteration {r['iteration']:>6}/{train_iters}",
        f"consumed samples {r['consumed_samples']:>9}",
        f"global batch {r['global_batch_size']}",
        f"lr {r['lr']:.3e}",
        f"grad norm {r['grad_norm']:.3f}",
    ]
    if r.get("loss_scale", 1.0) != 1.0:
        parts.append(f"loss scale {r['loss_scale']:.1f}")
    if r.get("skipped_iterations"):
        parts.append(f"skipped {r['skipped_iterations']}")
    n = r["iterations_averaged"]
    means = [f"loss {r['loss']:.4f}", f"ms/iter {r['ms_per_iter']:.1f}", f"tokens/s {r['tokens_per_s']:,.0f}",
             f"TFLOP/s/device {r['tflops_per_device']:.3g}"]
    if r.get("mfu") is not None:
        means.append(f"MFU {100 * r['mfu']:.1f}% (Megatron's non-causal count {100 * r['mfu_noncausal']:.1f}%)")
    parts.append(f"mean of {n} iteration{'s' * (n != 1)}: " + ", ".join(means))
    parts.append(f"peak mem {r['peak_memory_gb']:.2f} GB")
    parts.append(f"eta {_duration(r['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
