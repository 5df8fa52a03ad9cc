"""A run's records in ``logging.dir``, and how a new run keeps an earlier run's records apart.

Rank 0 writes them at every start, before any process group exists (``write_run_records``):
``config.yaml`` (the resolved config), ``overrides.yaml`` (the command-line overrides) and one line
per start in ``launches.jsonl`` (time, git commit, overrides, world size, restart count, host);
the logging rank appends ``metrics.jsonl`` (``metrics.py``) and, when enabled, ``tensorboard/``.

One directory, one run's records. A resume (a checkpoint past iteration 0) or an in-job restart
appends to them. A new run (iteration 0, a fine-tuning start included) in a directory that holds
another run's ``metrics.jsonl`` first moves those records into
``earlier_runs/<that run's start time>/`` and says so in one line: nothing is refused and nothing
overwritten, the README's commands run in any order, and ``${logging.dir}/metrics.jsonl`` is always
the latest run's (TensorBoard and torchtitan keep runs apart the same way, a directory per run).
Checkpoints, wandb's own run directories and NCCL traces stay where they are.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..config import Config, to_yaml
from .metrics import METRICS_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
LAUNCHES_FILE = "launches.jsonl"
# What one run writes into logging.dir, moved together when a new run starts there.
RUN_RECORDS = (METRICS_FILE, "config.yaml", "overrides.yaml", LAUNCHES_FILE, "tensorboard")
EARLIER_RUNS = "earlier_runs"


def git_commit(repo: Path = REPO_ROOT) -> Optional[str]:
    """``<sha>`` of the source tree, ``<sha>+dirty`` with uncommitted changes to tracked files,
    None outside a git checkout (an installed package)."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return None
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _started(directory: Path) -> str:
    """When the run whose records are in ``directory`` started: its first launch's time (else the
    metrics file's modification time), as ``YYYYmmdd-HHMMSS``."""
    try:
        first = json.loads((directory / LAUNCHES_FILE).read_text().splitlines()[0])
        return time.strftime("%Y%m%d-%H%M%S", time.strptime(first["time"], "%Y-%m-%dT%H:%M:%S%z"))
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return time.strftime("%Y%m%d-%H%M%S", time.localtime((directory / METRICS_FILE).stat().st_mtime))


def set_aside_earlier_run(directory: Path, new_run: bool) -> Optional[str]:
    """Before a new run (``new_run``) writes into ``directory``: move another run's records (when its
    ``metrics.jsonl`` holds any) into ``earlier_runs/<its start>/``; returns the line saying where,
    or None when there was nothing to move or this start continues a run."""
    metrics = directory / METRICS_FILE
    if not new_run or not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    records = sum(1 for _ in metrics.open("rb"))
    name = _started(directory)
    target = directory / EARLIER_RUNS / name
    suffix = 1
    while target.exists():  # two runs started in the same second
        suffix += 1
        target = directory / EARLIER_RUNS / f"{name}-{suffix}"
    target.mkdir(parents=True)
    for record in RUN_RECORDS:
        if (directory / record).exists():
            os.replace(directory / record, target / record)
    return (f"logging: {directory} held an earlier run's records ({METRICS_FILE}: {records} line"
            f"{'s' * (records != 1)}); moved them to {target}/, this run writes {metrics}")


def write_run_records(cfg: Config, overrides: Sequence[str], world_size: int, restart: int,
                      resumes_at: int) -> Optional[str]:
    """Keep an earlier run's records apart (a new run: ``resumes_at`` 0 and no restart), write
    ``config.yaml`` and ``overrides.yaml`` into ``logging.dir`` and append this start to
    ``launches.jsonl``. Returns the line saying where earlier records went, or None. Called by
    rank 0 before any process group exists."""
    import yaml

    directory = Path(cfg.logging.dir)
    directory.mkdir(parents=True, exist_ok=True)
    moved = set_aside_earlier_run(directory, new_run=resumes_at == 0 and restart == 0)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    (directory / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), default_flow_style=False))
    launch = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(), "overrides": list(overrides),
        "argv": sys.argv, "world_size": world_size, "restart": restart, "resumes_at_iteration": resumes_at,
        "host": socket.gethostname(),
    }
    with open(directory / LAUNCHES_FILE, "a") as out:
        out.write(json.dumps(launch) + "\n")
    return moved
