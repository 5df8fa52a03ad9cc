"""Run test functions on N gloo ranks: spawned once, reused by many checks, never left hanging.

    pool = RankPool(4)                      # spawns 4 processes with one gloo world (~5-15 s)
    results = pool.run(check_fn, arg, ...)  # check_fn(arg, ...) on every rank; list indexed by rank
    pool.close()

``check_fn`` must be a module-level function (it is pickled by name). It runs inside a rank whose
default process group is already initialised; it may create its own ParallelState. If any rank
raises, ``run`` raises ``RankFailure`` with each failing rank's traceback. If some ranks do not
answer within ``timeout`` seconds (a hung collective), the pool is killed, the error names the ranks
that did not finish, and the next ``run`` starts a fresh pool.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 180.0
# How long the other ranks may take to finish (or fail) after the first rank reported a failure.
GRACE_AFTER_FAILURE_S = 10.0


class RankFailure(AssertionError):
    """One or more ranks raised or hung; the message carries every rank's story."""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _rank_main(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=DEFAULT_TIMEOUT_S)
    )
    results.put((rank, None, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            results.put((rank, task_id, True, value))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            results.put((rank, task_id, False, traceback.format_exc()))
        # A finished trainer sits in reference cycles that hold its process groups, each with gloo
        # threads that wake on their own: collect them now, or they pile up over a session and
        # take the cores from the next tests (hundreds of threads per rank, load averages > 100).
        task = fn = args = kwargs = value = None
        gc.collect()
    dist.destroy_process_group()


class RankPool:
    """N spawned gloo ranks that run test functions on request (see module docstring)."""

    def __init__(self, world_size: int, timeout: float = DEFAULT_TIMEOUT_S):
        self.world_size = world_size
        self.timeout = timeout
        self._procs: list[mp.Process] = []
        self._task_id = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, self.world_size, port, self._tasks[r], self._results),
                name=f"rank{r}",
            )
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect(None, self.timeout, "start-up")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results indexed by rank."""
        if not self._procs:
            self._start()
        self._task_id += 1
        for q in self._tasks:
            q.put((self._task_id, fn, args, kwargs))
        return self._collect(self._task_id, timeout or self.timeout, getattr(fn, "__name__", "task"))

    def _collect(self, task_id: int | None, timeout: float, what: str) -> list[Any]:
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(values) + len(failures) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, tid, ok, value = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead and not failures:
                    failures[-1] = f"processes exited without reporting: {dead}"
                    deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
                continue
            if tid != task_id:
                continue
            if ok:
                values[rank] = value
            else:
                failures[rank] = value
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        missing = [r for r in range(self.world_size) if r not in values and r not in failures]
        if not failures and not missing:
            return [values[r] for r in range(self.world_size)]
        self.close(force=True)
        report = [f"{what} on {self.world_size} ranks failed"]
        if missing:
            report.append(
                f"ranks {missing} did not finish within {timeout:.0f} s (hung in a collective?)"
            )
        for rank, tb in sorted(failures.items()):
            report.append(f"--- rank {rank} ---\n{tb}" if rank >= 0 else tb)
        raise RankFailure("\n".join(report))

    def close(self, force: bool = False) -> None:
        if not self._procs:
            return
        if not force:
            for q in self._tasks:
                q.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs = []


class PoolCache:
    """One live RankPool per world size, shared by the whole test session."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world_size: int) -> RankPool:
        if world_size not in self._pools:
            self._pools[world_size] = RankPool(world_size)
        return self._pools[world_size]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    print(RankPool(int(sys.argv[1]) if len(sys.argv) > 1 else 2).run(os.getpid))
