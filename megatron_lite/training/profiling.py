"""``profiling``: a torch.profiler trace of chosen iterations on chosen ranks, and on a GPU a CUDA
memory snapshot (Megatron's ``--profile --use-pytorch-profiler --profile-step-start/end
--profile-ranks --record-memory-history``).

Files go to ``${logging.dir}/profile/``, beside the metrics:

- ``trace_rank{R}_iters{A}-{B}.json``: Chrome trace format; open it in https://ui.perfetto.dev (or
  chrome://tracing). Each traced iteration is a named range (``iteration N``) over the CPU ops (and
  the CUDA kernels on a GPU).
- ``memory_rank{R}_iters{A}-{B}.pickle`` (GPU only): every allocation with its stack over the traced
  iterations; drag it into https://pytorch.org/memory_viz.

Tracing starts before iteration ``step_start`` and stops after ``step_end``; a run that resumes past
``step_start`` traces nothing, and a run that stops inside the range writes what it traced.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import ProfilingConfig

MEMORY_HISTORY_ENTRIES = 100_000  # allocation events the CUDA snapshot keeps (the newest)


class Profiler:
    """This rank's profiler: inert unless ``profiling.enabled`` and this rank is in ``profiling.ranks``."""

    def __init__(self, cfg: ProfilingConfig, rank: int, device: torch.device, directory: Path):
        self.cfg, self.rank, self.directory = cfg, rank, Path(directory)
        self.active = cfg.enabled and rank in cfg.ranks
        self.memory = cfg.memory_snapshot and device.type == "cuda"
        self.device = device
        self._profile: Optional[torch.profiler.profile] = None
        self.written: list[Path] = []

    @contextlib.contextmanager
    def iteration(self, number: int) -> Iterator[None]:
        """Wrap iteration ``number`` (1-based): starts tracing at ``step_start``, names the iteration
        in the trace, and writes the files after ``step_end``."""
        if not self.active:
            yield
            return
        if number == self.cfg.step_start:
            self._start()
        if self._profile is None:
            yield
            return
        with torch.profiler.record_function(f"iteration {number}"):
            yield
        if number >= self.cfg.step_end:
            self.finish(number)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profile = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profile.__enter__()

    def finish(self, last: int) -> None:
        """Stop tracing (if running) and write the files, naming iterations step_start..``last``."""
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.directory.mkdir(parents=True, exist_ok=True)
        span = f"rank{self.rank}_iters{self.cfg.step_start}-{last}"
        trace = self.directory / f"trace_{span}.json"
        profile.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.memory:
            snapshot = self.directory / f"memory_{span}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        print(f"profiling: rank {self.rank} wrote {', '.join(str(p) for p in self.written)} "
              "(trace: ui.perfetto.dev; memory snapshot: pytorch.org/memory_viz)", flush=True)
