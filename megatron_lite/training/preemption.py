"""Stopping early, agreed across ranks: a preemption signal (SIGTERM, SIGUSR1) or a time limit.

A scheduler about to preempt a job signals its processes (SLURM: ``#SBATCH --signal=USR1@120``, and
SIGTERM at cancellation), not necessarily all at the same moment. The handler only records the
signal; after each iteration every rank contributes its flags to one all-reduce (MAX), so all ranks
stop after the same iteration, save a checkpoint together, and exit with status 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopAgreement:
    """Records preemption signals (when ``catch_signals``) and the start time; ``reason()`` says, the
    same on every rank, whether training should stop now: 'signal SIGTERM', 'exit_duration_mins' or None."""

    def __init__(self, catch_signals: bool, exit_duration_mins: Optional[float], device: torch.device):
        self.received: Optional[int] = None
        self.catch_signals = catch_signals
        self.limit_s = None if exit_duration_mins is None else 60.0 * exit_duration_mins
        self.device = device
        self.start = time.time()
        self._previous: dict[int, object] = {}
        if catch_signals and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def reason(self) -> Optional[str]:
        """Collective over the world when signals are caught or a time limit is set, else local."""
        if not self.catch_signals and self.limit_s is None:
            return None
        flags = torch.tensor(
            [float(self.received or 0), float(self.limit_s is not None and time.time() - self.start > self.limit_s)],
            device=self.device,
        )
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item():
            return f"signal {signal.Signals(int(flags[0].item())).name}"
        if flags[1].item():
            return "training.exit_duration_mins"
        return None

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def announce(reason: str, iteration: int, saving: bool) -> None:
    message = f"stopping at iteration {iteration}: {reason}" + ("; saving a checkpoint, then exiting" if saving else "")
    print(message, file=sys.stderr, flush=True)
