"""Where a run's numbers go: the console line, ``metrics.jsonl``, wandb and tensorboard.

Only the logging rank (the first TP rank of the first DP replica's last pipeline stage, which holds
the loss) creates a ``MetricsLogger``; every other rank logs nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ..config import Config, LoggingConfig


class MetricsLogger:
    """Writes one JSON object per iteration to ``${logging.dir}/metrics.jsonl`` and, every
    ``log_interval`` iterations, a Megatron-style console line; mirrors both to wandb/tensorboard."""

    def __init__(self, cfg: LoggingConfig, full_config: Config, resumed: bool = False):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._file = open(self.path, "a" if resumed else "w", buffering=1)
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
            print(console, flush=True)
        step = record["iteration"]
        prefix = f"{record['split']}/" if "split" in record else "train/"
        numbers = {k: v for k, v in finite.items() if isinstance(v, (int, float)) and k != "iteration"}
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
    try:
        import wandb
    except ImportError:
        print("warning: logging.wandb.enabled but wandb is not installed (pip install megatron-lite[wandb])",
              file=sys.stderr)
        return None
    from omegaconf import OmegaConf

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode, dir=str(cfg.dir),
        config=OmegaConf.to_container(OmegaConf.structured(full_config)),
    )


def console_line(r: dict[str, Any], train_iters: int) -> str:
    """Megatron-style: iteration, samples, time, lr, loss, grad norm, throughput, memory, ETA."""
    parts = [
        f"iteration {r['iteration']:>6}/{train_iters}",
        f"consumed samples {r['consumed_samples']:>9}",
        f"ms/iter {r['ms_per_iter']:8.1f}",
        f"lr {r['lr']:.3e}",
        f"loss {r['loss']:.4f}",
        f"grad norm {r['grad_norm']:.3f}",
        f"tokens/s {r['tokens_per_s']:,.0f}",
        f"TFLOP/s/device {r['tflops_per_device']:.3g}",
    ]
    if r.get("loss_scale", 1.0) != 1.0:
        parts.append(f"loss scale {r['loss_scale']:.1f}")
    if r.get("skipped_iterations"):
        parts.append(f"skipped {r['skipped_iterations']}")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}% (Megatron's non-causal count {100 * r['mfu_noncausal']:.1f}%)")
    parts.append(f"peak mem {r['peak_memory_gb']:.2f} GB")
    parts.append(f"eta {_duration(r['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
