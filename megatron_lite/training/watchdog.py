"""Hang and dead-peer detection: a per-rank watchdog thread that turns a stuck step into a clear exit.

A distributed job's costly failure is the silent one: a rank waits forever in a collective whose
peer is stuck or gone. Each rank runs one ``Watchdog``. The trainer wraps every step in
``watchdog.watch(...)``; a daemon thread checks the running step's age once a second and, when it
exceeds the limit, prints ONE line on this rank's stderr and ends the process with exit code
``WATCHDOG_EXIT_CODE`` (4)::

    watchdog: rank 1/4 (tp 0/1 pp 0/2 dp 1/2) iteration 7 exceeded training.step_timeout=5.0 s
    (ran 5.8 s); waiting in all_reduce on the world group [0..3] (called at
    megatron_lite/training/trainer.py:164 in _grads_are_finite); pipeline action B1.0; exiting

The limit is ``training.step_timeout`` seconds, or when that is None, derived from the first
``CALIBRATION_STEPS`` training steps: ``max(TIMEOUT_FACTOR × their median, TIMEOUT_FLOOR_S)``;
until those steps are timed the collective timeout (``parallel.distributed_timeout_minutes``)
bounds a step. Evaluation is watched with the limit × ``eval_iters``.

Where the rank waits is read from the main thread's Python stack (``sys._current_frames``), not
recorded by wrapping ``torch.distributed``: the stack names the collective whatever way it was
called (including the functions ``parallel/collectives.py`` bound at import), costs nothing per call,
and the ``group`` argument on that frame names the process group. Point-to-point receives wait in
``Work.wait()`` (C++, no Python frame of its own), as do overlapped gradient reductions: the
project frame that called it, the group it holds and the schedule action (reported by the pipeline
executor through ``on_action``) say which message or bucket.
On a GPU, NCCL collectives are asynchronous: the host stack shows where the host waits (a
``.item()`` or a later wait), and NCCL's flight recorder (``configure_nccl``) records which
collective never finished.

A step that fails because a peer died (gloo raises "Connection reset/closed by peer") is
reported the same way, one line naming the collective and its group's ranks, and exits with the
same code: the rank cannot go on without its peer, and tearing down groups with dead peers can block.
Before it prints, the line is completed from the ranks' heartbeats (``heartbeat.py``): which ranks
stopped answering and since when, which left through their own watchdog, which still answer — so
the dead rank is named by the survivors, whatever the launcher reports first.

A rank whose launcher is gone (``kill -9`` of torchrun, or of the SLURM task that ran it) would
otherwise train on, checkpoint and print errors from the dead rendezvous store, out of reach of
any restart. ``watch_launcher`` polls the parent process once a second from the start of the entry
point; when it changes, the node's local rank 0 prints one line and every rank of the node exits
with the same code 4.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist

from ..messages import first_line, record_for_launcher

if TYPE_CHECKING:
    from ..parallel.state import ParallelState
    from .heartbeat import Heartbeat

WATCHDOG_EXIT_CODE = 4
CALIBRATION_STEPS = 3
TIMEOUT_FACTOR = 10.0
TIMEOUT_FLOOR_S = 60.0
POLL_S = 1.0
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_C10D_FILES = ("distributed_c10d.py", "c10d_logger.py")


class Watchdog:
    """Ends this rank's process when a watched step runs past its limit (see the module docstring).

    ``step_timeout``: seconds, or None to derive it from the first steps; ``startup_timeout``: the
    bound until then (the collective timeout). Thread-safe: ``watch`` runs on the training thread,
    the checks on a daemon thread started by the first ``watch`` and ended by ``stop`` (``Trainer.train`` ends it).
    """

    def __init__(self, state: ParallelState, step_timeout: Optional[float], startup_timeout: timedelta,
                 poll_s: float = POLL_S, heartbeat: Optional["Heartbeat"] = None):
        self.state = state
        self.heartbeat = heartbeat
        self.step_timeout = step_timeout
        self.startup_timeout_s = startup_timeout.total_seconds()
        self.poll_s = poll_s
        self.step_times: list[float] = []  # the first CALIBRATION_STEPS training steps, seconds
        self.action = "none"  # the pipeline schedule action running now (set through on_action)
        self._lock = threading.Lock()
        self._phase: Optional[tuple[str, float, float, str]] = None  # (what, start, limit, its source)
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self._training_thread = threading.get_ident()

    def limit(self, scale: float = 1.0) -> float:
        """The current limit for a step, in seconds, times ``scale``."""
        if self.step_timeout is not None:
            return self.step_timeout * scale
        if len(self.step_times) < CALIBRATION_STEPS:
            return self.startup_timeout_s * scale
        return max(TIMEOUT_FACTOR * statistics.median(self.step_times), TIMEOUT_FLOOR_S) * scale

    def _limit_source(self) -> str:
        if self.step_timeout is not None:
            return "training.step_timeout"
        if len(self.step_times) < CALIBRATION_STEPS:
            return "the start-up bound parallel.distributed_timeout_minutes"
        return f"the derived step timeout max({TIMEOUT_FACTOR:g} × median first steps, {TIMEOUT_FLOOR_S:g} s)"

    def on_action(self, label: str) -> None:
        """The executor's callback: ``label`` is the schedule action about to run (``F3.0``, …)."""
        self.action = label

    @contextmanager
    def watch(self, what: str, scale: float = 1.0, calibrate: bool = False,
              collective_bound: bool = False) -> Iterator[None]:
        """Watch the enclosed step (``what``, e.g. "iteration 7"); ``calibrate``: a training step whose
        time may set the derived limit; ``collective_bound``: bounded by the collective timeout, not
        the step limit (a checkpoint save takes its own time). A peer's death inside it ends the
        process (one line)."""
        start = time.monotonic()
        if collective_bound:
            limit, source = self.startup_timeout_s, "parallel.distributed_timeout_minutes"
        else:
            limit, source = self.limit(scale), self._limit_source()
        with self._lock:
            self._phase = (what, start, limit, source)
            self._training_thread = threading.get_ident()
        self.action = "none"
        self._start_thread()
        try:
            yield
        except RuntimeError as err:
            if not is_communication_error(err):
                raise
            self._exit(f"{what} failed: {first_line(err)}; "
                       f"{describe_wait(_traceback_frames(err.__traceback__), self.state)}")
        finally:
            with self._lock:
                self._phase = None
        if calibrate and len(self.step_times) < CALIBRATION_STEPS:
            self.step_times.append(time.monotonic() - start)

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="megatron_lite-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the checking thread (the next ``watch`` starts it again). Without this, a finished
        trainer's thread would keep its process groups, and their gloo/NCCL threads, alive."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            with self._lock:
                phase, thread = self._phase, self._training_thread
            if phase is None:
                continue
            what, start, limit, source = phase
            ran = time.monotonic() - start
            if ran > limit:
                frame = sys._current_frames().get(thread)
                self._exit(f"{what} exceeded {source}={limit:.1f} s (ran {ran:.1f} s); "
                           f"{describe_wait(_stack_frames(frame), self.state)}")

    def _exit(self, message: str) -> None:
        if launcher_gone():  # the peers died with the launcher: one line from the node, not one per rank
            end_without_launcher()
        c = self.state
        where = f"rank {c.rank}/{c.world_size} (tp {c.tp_rank}/{c.tp_size} cp {c.cp_rank}/{c.cp_size} " \
                f"pp {c.pp_rank}/{c.pp_size} dp {c.dp_rank}/{c.dp_size})"
        peers = ""
        if self.heartbeat is not None:
            peers = f"; {self.heartbeat.survey()}"
            self.heartbeat.stop("exited watchdog")
        line = f"watchdog: {where} {message}{peers}; pipeline action {self.action}; exiting"
        record_for_launcher(line)  # torchrun's summary shows it too
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(WATCHDOG_EXIT_CODE)


# (the launcher's pid, the line this rank prints when it is gone or None), set by watch_launcher.
_launcher: Optional[tuple[int, Optional[str]]] = None


def watch_launcher(rank: int, world_size: int, local_rank: int, poll_s: float = POLL_S) -> Optional[threading.Thread]:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set): a daemon thread that ends this process with
    exit code 4 within ``poll_s`` of its parent, the launcher, going away; local rank 0 prints the
    one line for the node. None (nothing watched) without torchrun."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()
    line = (f"watchdog: rank {rank}/{world_size}: the launcher of this node's ranks (pid {parent}) is gone; "
            f"ending them with exit code {WATCHDOG_EXIT_CODE} instead of training on without it")
    _launcher = (parent, line if local_rank == 0 else None)

    def run() -> None:
        while not launcher_gone():
            time.sleep(poll_s)
        end_without_launcher()

    thread = threading.Thread(target=run, name="megatron_lite-launcher-watch", daemon=True)
    thread.start()
    return thread


def launcher_gone() -> bool:
    """Whether the launcher ``watch_launcher`` watches has died (this process has another parent).
    The heartbeat stops beating then (the rendezvous store lived in the launcher), and a peer's
    failure seen afterwards is this, not a dead rank."""
    return _launcher is not None and os.getppid() != _launcher[0]


def end_without_launcher() -> None:
    """Exit with code 4; local rank 0 says why, for the node."""
    if _launcher is not None and _launcher[1] is not None:
        print(_launcher[1], file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(WATCHDOG_EXIT_CODE)


def describe_wait(frames: list[FrameType], state: ParallelState) -> str:
    """Which collective on which group ``frames`` (innermost first) wait in, and the project call site."""
    collective = next((f for f in frames if _is_c10d_api(f)), None)
    caller = next((f for f in frames if f.f_code.co_filename.startswith(_PACKAGE_DIR)
                   and not f.f_code.co_filename.endswith("watchdog.py")), None)
    site = "no project frame on the stack"
    if caller is not None:
        path = os.path.relpath(caller.f_code.co_filename, os.path.dirname(_PACKAGE_DIR))
        site = f"called at {path}:{caller.f_lineno} in {caller.f_code.co_name}"
    if collective is not None:
        group = collective.f_locals.get("group")
        return f"waiting in {collective.f_code.co_name} on {group_name(group, state)} ({site})"
    if caller is not None:
        group = _group_in(caller)
        on = f" on {group_name(group, state)}" if group is not None else ""
        return f"waiting in Work.wait() of an asynchronous operation{on} ({site})"
    return f"not in a collective ({site})"


def _group_in(frame: FrameType) -> Optional[dist.ProcessGroup]:
    """The process group a project frame works on: its ``group`` local, else a ``*group``
    attribute of its ``self`` (``PipelineLink.group``, ``GradBuffer.dp_group``)."""
    found = [frame.f_locals.get("group")]
    owner = frame.f_locals.get("self")
    found += [v for k, v in vars(owner).items() if k.endswith("group")] if hasattr(owner, "__dict__") else []
    return next((g for g in found if isinstance(g, dist.ProcessGroup)), None)


def group_name(group: Optional[dist.ProcessGroup], state: ParallelState) -> str:
    """``data group [0, 2]``: the kind of ``ParallelState`` group it is and its global ranks."""
    if group is None or group is dist.group.WORLD:
        return f"the world group [0..{state.world_size - 1}]"
    kinds = {"tensor": state.tp_group, "data": state.dp_group, "pipeline": state.pp_group,
             "model": state.mp_group, "embedding": state.embedding_group, "context": state.cp_group,
             "data × context": state.dp_cp_group}
    kind = next((k for k, g in kinds.items() if g is group), "process")
    return f"{kind} group {dist.get_process_group_ranks(group)}"


def configure_nccl(dump_dir: str) -> None:
    """Before the process group exists, on GPU: NCCL's own watchdog tears the process down on a
    collective timeout or error, and its flight recorder keeps the last collectives of each group
    and dumps them on a timeout to ``dump_dir/nccl_trace_rank_<rank>`` (read them with
    ``python -m torch.distributed.flight_recorder.fr_trace``). Variables already set are kept."""
    if not torch.cuda.is_available():
        return
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    for key, value in {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(dump_dir) / "nccl_trace_rank_"),
    }.items():
        os.environ.setdefault(key, value)


def is_communication_error(err: BaseException) -> bool:
    """A failed collective or message: torch's DistError, or gloo's RuntimeError (from Work.wait)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err)


def _is_c10d_api(frame: FrameType) -> bool:
    name = frame.f_code.co_name
    return frame.f_code.co_filename.endswith(_C10D_FILES) and not name.startswith("_") and name != "wrapper"


def _stack_frames(frame: Optional[FrameType]) -> list[FrameType]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _traceback_frames(tb: Optional[TracebackType]) -> list[FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]
