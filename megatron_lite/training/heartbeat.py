"""Every rank's heartbeat in the rendezvous store, so that the survivors name a dead rank themselves.

Each rank runs a daemon thread that, every ``PERIOD_S``, writes ``"<count> <unix time> alive"``
under ``megatron_lite/heartbeat/<run>/<restart>/<rank>`` in the TCP store that
``init_process_group`` rendezvoused through (``MASTER_ADDR:MASTER_PORT``: torchrun's agent store,
or rank 0's under srun or a plain ``env://`` launch). It has its own connection, so a slow store
answer never blocks the training thread. A rank leaving through the watchdog writes
``exited watchdog`` first, and a rank done with training ``finished``.

When a collective fails or hangs, the watchdog asks ``Heartbeat.survey()``: it reads every rank's
value, watches them for ``SURVEY_S`` (3 beats), and says which ranks stopped answering and since
when (their last beat's time), e.g.::

    heartbeats: rank 2 stopped answering at 10:31:07.412 (3.1 s before this report); rank 0 exited
    through its watchdog at 10:31:10.502; ranks 1, 3 answer

The value does not depend on the launcher: whoever reported the failure first, the line names the
rank whose process stopped (killed, OOM, frozen). A rank that is alive but stuck elsewhere keeps
beating (the thread runs while the training thread waits in C++), so "every rank answers" means
no process died and the ranks wait in different places. If the store itself is gone (its host
process died) the line says so.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from ..messages import first_line
from .watchdog import launcher_gone

PERIOD_S = 1.0
SURVEY_S = 3.0  # how long a rank may go without a beat before it counts as not answering
STORE_TIMEOUT_S = 10.0


@dataclass
class PeerBeat:
    """One rank's last value: ``count`` beats, the last at ``time`` (unix), ``state``."""

    count: int
    time: float
    state: str  # alive | exited <how> | finished

    @classmethod
    def parse(cls, raw: bytes) -> "PeerBeat":
        count, stamp, state = raw.decode().split(" ", 2)
        return cls(int(count), float(stamp), state)


def _clock(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class Heartbeat:
    """This rank's beats and the survey of everyone's (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, store: dist.Store, where: str, period_s: float = PERIOD_S):
        self.rank, self.world_size, self.where = rank, world_size, where
        self.period_s = period_s
        self._store = store
        self._lock = threading.Lock()  # one store operation at a time on this connection
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"megatron_lite/heartbeat/{run}/{restart}/"
        self._count = 0
        self._state = "alive"
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_world(cls, rank: int, world_size: int) -> Optional["Heartbeat"]:
        """Started beats over a new connection to the rendezvous store; None for a world of one or
        without ``MASTER_ADDR``/``MASTER_PORT``."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size <= 1 or not host or not port:
            return None
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                              wait_for_workers=False)
        beat = cls(rank, world_size, store, f"{host}:{port}")
        beat.start()
        return beat

    def _key(self, rank: int) -> str:
        return f"{self._prefix}{rank}"

    def _beat(self) -> None:
        self._count += 1
        with self._lock:
            self._store.set(self._key(self.rank), f"{self._count} {time.time():.3f} {self._state}")

    def start(self) -> None:
        self._beat()  # the first beat before returning: every live rank has a key from here on
        self._thread = threading.Thread(target=self._run, name="megatron_lite-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.period_s):
            if launcher_gone():  # so was the store it hosted; the launcher watch ends this rank
                return
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone: the survey will say so
                return

    def stop(self, state: str = "finished") -> None:
        """Last beat with ``state`` (``finished``, ``exited watchdog``), then no more."""
        self._stopped.set()
        self._state = state
        try:
            self._beat()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass

    def read(self) -> dict[int, Optional[PeerBeat]]:
        """Every other rank's last value (None: it never beat)."""
        keys = {r: self._key(r) for r in range(self.world_size) if r != self.rank}
        with self._lock:
            present = [r for r, key in keys.items() if self._store.check([key])]
            values = self._store.multi_get([keys[r] for r in present]) if present else []
        out: dict[int, Optional[PeerBeat]] = dict.fromkeys(keys)
        out.update({r: PeerBeat.parse(v) for r, v in zip(present, values)})
        return out

    def survey(self, window_s: float = SURVEY_S) -> str:
        """Which ranks stopped answering and since when, watched for up to ``window_s`` seconds
        (less when every rank beats again sooner); one clause for the watchdog's line."""
        try:
            first = self.read()
            answering: set[int] = set()
            deadline = time.monotonic() + window_s
            while True:
                now_values = self.read()
                answering |= {r for r, v in now_values.items()
                              if v is not None and v.state == "alive" and (first[r] is None or v.count != first[r].count)}
                quiet = [r for r in now_values if r not in answering]
                # Done when the others beat again, or when every quiet rank's last beat is already
                # older than the window (a hang noticed after a step timeout: no need to wait more).
                stale = all(now_values[r] is not None and time.time() - now_values[r].time > window_s for r in quiet)
                if not quiet or stale or time.monotonic() >= deadline:
                    break
                time.sleep(self.period_s / 4)
        except Exception as err:  # noqa: BLE001 - the store's host process may be the dead one
            return f"heartbeats unreadable: the rendezvous store {self.where} does not answer ({first_line(err)})"
        now = time.time()
        silent, exited, never = [], [], []
        for r in quiet:
            beat = now_values[r]
            if beat is None:
                never.append(r)
            elif beat.state == "alive":
                silent.append(f"{_ranks([r])} stopped answering at {_clock(beat.time)} ({now - beat.time:.1f} s before this report)")
            else:
                how = "through its watchdog" if beat.state == "exited watchdog" else f"({beat.state})"
                exited.append(f"{_ranks([r])} exited {how} at {_clock(beat.time)}")
        parts = silent + ([f"{_ranks(never)} never beat"] if never else []) + exited
        if answering:
            parts.append(f"{_ranks(sorted(answering))} answer")
        if not silent and not never and not exited:
            parts = ["every rank answers (no process died: the ranks wait in different places)"]
        return "heartbeats: " + "; ".join(parts)
