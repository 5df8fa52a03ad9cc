"""Play pipeline schedules with costs: check them, time them, draw them.

``simulate(actions_per_rank, p, v, m)`` runs every rank's action list (``schedules.py``) under the
semantics of NCCL point-to-point groups, which the executor keeps on every backend (``p2p.py``):

- a computation takes its cost: per chunk ``t_f / v`` forward, ``t_bi / v`` for the input half of a
  backward, ``t_bw / v`` for its weight half, ``(t_bi + t_bw) / v`` for a whole ``Backward``
  (``t_f = t_bi = t_bw = 1`` for a full stage by default);
- consecutive messages form one batch (one ``batch_isend_irecv`` group), posted when the rank reaches
  it. The rank then waits for the whole batch: it completes only once every message in it is matched,
  that is once the peer has posted the batch holding the other end; sends wait like receives (above
  NCCL's small internal buffer a send cannot finish before the receive is posted), and no message of
  a batch completes alone. It completes ``t_comm`` after the last of those batches was posted.

Along the way it checks that

- no rank waits forever (a deadlock names each stuck rank and the batch it waits in);
- every microbatch runs forward and backward exactly once on every chunk (a ``Backward``, or a
  ``BackwardInput`` and later a ``BackwardWeight``), a forward after its input arrived, a backward
  after its forward and after its output gradient arrived, a weight pass after its input pass, a
  send after the computation that produced it;
- on each rank-to-rank channel the messages are received in the order they are sent (what NCCL and
  gloo need to match them without tags).

It reports the makespan, the bubble fraction ``(makespan − ideal) / ideal`` with ``ideal = m·(t_f +
t_bi + t_bw)`` (the time one rank computes), the steady bubble fraction (the most any rank idles
between its own first and last computation, over ideal: the bubble when iterations may overlap, as
optimizer post-validation allows; the difference is what the synchronised optimizer step costs), the
peak number of live (microbatch, chunk) activation sets per rank (from the forward until the weight
gradient is done: tensors kept only for a pending weight pass count) and the timeline. The CLI prints
these and draws the timeline the Megatron paper shows:

    python -m megatron_lite.pipeline.simulate --pp 4 --vpp 2 --microbatches 8 --json --plot t.png
    python -m megatron_lite.pipeline.simulate --pp 4 --microbatches 8 --schedule zb1p
    python -m megatron_lite.pipeline.simulate --trace run/pipeline_trace.json --plot real.png

The last form draws a trace recorded by the executor (``executor.save_trace``) of a real run;
drawing and trace arithmetic live in ``timeline.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from . import schedules as S
from .schedules import Action, BackwardWeight, Forward, Message
from .timeline import plot_timeline, rank_bubble, trace_bubble

Step = Union[S.Compute, tuple[Message, ...]]


class ScheduleError(ValueError):
    """An action list that cannot run: deadlock, missing or repeated work, or out-of-order data."""


@dataclass
class SimResult:
    """What ``simulate`` measured. Times are in units of one full-stage forward (``t_f = 1``)."""

    makespan: float
    ideal: float
    bubble_fraction: float
    peak_activations: list[int]  # per rank: most live (microbatch, chunk) activation sets
    events: list[dict[str, Any]] = field(default_factory=list)  # the timeline, as traces store it
    steady_bubble_fraction: float = 0.0  # most idle time of a rank inside its own span, over ideal

    def summary(self, v: int) -> dict[str, Any]:
        """The JSON the CLI prints; ``peak_activation_memory`` is in full-stage microbatches."""
        return {
            "makespan": self.makespan,
            "ideal": self.ideal,
            "bubble_fraction": self.bubble_fraction,
            "steady_bubble_fraction": self.steady_bubble_fraction,
            "peak_activations": self.peak_activations,
            "peak_activation_memory": [n / v for n in self.peak_activations],
        }


def _steps(actions: Sequence[Action]) -> list[Step]:
    """Computations stay single; runs of consecutive messages become one batch (a tuple)."""
    steps: list[Step] = []
    batch: list[Message] = []
    for action in actions:
        if isinstance(action, S.COMPUTE):
            if batch:
                steps.append(tuple(batch))
                batch = []
            steps.append(action)
        else:
            batch.append(action)
    if batch:
        steps.append(tuple(batch))
    return steps


def _check_channels(actions_per_rank: Sequence[Sequence[Action]], p: int, placement: str) -> None:
    """Every message has one other end, and each channel delivers in the order it was sent."""
    sent: dict[tuple[int, int], list] = defaultdict(list)
    received: dict[tuple[int, int], list] = defaultdict(list)
    for rank, actions in enumerate(actions_per_rank):
        for a in actions:
            if isinstance(a, S.COMPUTE):
                continue
            if not 0 <= a.peer < p or a.peer == rank:
                raise ScheduleError(f"rank {rank}: {S.describe(a)} names an invalid peer")
            if isinstance(a, S.SENDS):
                sent[(rank, a.peer)].append(S.message_id(p, rank, a, placement))
            else:
                received[(a.peer, rank)].append(S.message_id(p, rank, a, placement))
    for src, dst in sorted(set(sent) | set(received)):
        out, inn = sent[(src, dst)], received[(src, dst)]
        if out != inn:
            first = next(
                (k for k in range(min(len(out), len(inn))) if out[k] != inn[k]), min(len(out), len(inn))
            )
            got = lambda seq: seq[first] if first < len(seq) else "nothing"  # noqa: E731
            raise ScheduleError(
                f"channel {src}->{dst}: message {first} sent as {got(out)} but received as "
                f"{got(inn)} (each end must list its messages in the same order)"
            )


class _Rank:
    """One rank's progress through its steps during the simulation."""

    def __init__(self, rank: int, steps: list[Step]):
        self.rank, self.steps = rank, steps
        self.next = 0  # index of the step to run
        self.clock = 0.0
        self.arrived: set = set()  # message ids received and not yet consumed
        self.done: set = set()  # (phase, microbatch, chunk), phase F (forward), B (input grad), W
        self.live = 0  # (microbatch, chunk) activation sets stored: forward done, weight grads not
        self.peak = 0
        self.busy = 0.0
        self.first_start: Optional[float] = None


def simulate(
    actions_per_rank: Sequence[Sequence[Action]],
    p: int,
    v: int,
    m: int,
    t_f: float = 1.0,
    t_bi: float = 1.0,
    t_bw: float = 1.0,
    t_comm: float = 0.0,
    forward_only: bool = False,
    placement: str = S.LOOPED,
) -> SimResult:
    """Play the action lists of all ``p`` ranks; raise ScheduleError if they cannot run.

    ``t_f`` / ``t_bi`` / ``t_bw`` are the forward, input-gradient and weight-gradient times of a full
    stage (each of the ``v`` chunks takes ``1/v`` of them; a whole ``Backward`` costs ``t_bi + t_bw``);
    ``t_comm`` is the time a batch takes once all its messages are matched. ``placement`` is the
    chunk placement the lists were made for (``schedules.placement_of(name)``).
    """
    if len(actions_per_rank) != p:
        raise ScheduleError(f"expected {p} action lists, got {len(actions_per_rank)}")
    _check_channels(actions_per_rank, p, placement)
    ranks = [_Rank(r, _steps(a)) for r, a in enumerate(actions_per_rank)]
    # Where each end of every message lives: (message id, is_send) -> (rank, step index).
    ends: dict[tuple[tuple, bool], tuple[int, int]] = {}
    for rk in ranks:
        for index, step in enumerate(rk.steps):
            for msg in step if isinstance(step, tuple) else ():
                ends[(S.message_id(p, rk.rank, msg, placement), isinstance(msg, S.SENDS))] = (rk.rank, index)
    posted: dict[tuple[int, int], float] = {}  # (rank, step index) -> time the batch was posted
    events: list[dict[str, Any]] = []
    last = p * v - 1
    cost = {S.Forward: t_f / v, S.Backward: (t_bi + t_bw) / v, S.BackwardInput: t_bi / v,
            S.BackwardWeight: t_bw / v}

    def fail(rk: _Rank, what: str) -> ScheduleError:
        return ScheduleError(f"rank {rk.rank}, step {rk.next}: {what}")

    def take(rk: _Rank, op: S.Compute, needed: tuple) -> None:
        """Consume the input ``needed`` (kind, microbatch, producing global chunk) of ``op``."""
        producer_rank, producer_chunk = S.locate(p, needed[2], placement)
        if producer_rank == rk.rank:  # handed over on this rank (ZB-V's turn), no message
            phase = "F" if needed[0] == "activation" else "B"
            if (phase, needed[1], producer_chunk) not in rk.done:
                raise fail(rk, f"{S.describe(op)} before its input {needed} was computed")
        elif needed not in rk.arrived:
            raise fail(rk, f"{S.describe(op)} before its input {needed} arrived")
        else:
            rk.arrived.remove(needed)

    def compute(rk: _Rank, op: S.Compute) -> None:
        g = S.global_chunk(p, rk.rank, op.chunk, placement)
        if not (0 <= op.microbatch < m and 0 <= op.chunk < v):
            raise fail(rk, f"{S.describe(op)} is outside m={m}, v={v}")
        phases = {S.Forward: "F", S.Backward: "BW", S.BackwardInput: "B", S.BackwardWeight: "W"}[type(op)]
        for phase in phases:
            if (phase, op.microbatch, op.chunk) in rk.done:
                raise fail(rk, f"{S.describe(op)} runs twice")
        if isinstance(op, Forward):
            if g > 0:
                take(rk, op, ("activation", op.microbatch, g - 1))
        elif isinstance(op, BackwardWeight):
            if ("B", op.microbatch, op.chunk) not in rk.done:
                raise fail(rk, f"{S.describe(op)} before its input-gradient half")
        else:
            if ("F", op.microbatch, op.chunk) not in rk.done:
                raise fail(rk, f"{S.describe(op)} before its forward")
            if g < last:
                take(rk, op, ("grad", op.microbatch, g + 1))
        rk.done.update((phase, op.microbatch, op.chunk) for phase in phases)
        duration = cost[type(op)]
        events.append(dict(rank=rk.rank, kind=S.EVENT_KIND[type(op)], microbatch=op.microbatch,
                           chunk=op.chunk, start=rk.clock, end=rk.clock + duration))
        if rk.first_start is None:
            rk.first_start = rk.clock
        rk.clock += duration
        rk.busy += duration
        if not forward_only:
            rk.live += 1 if isinstance(op, Forward) else -1 if "W" in phases else 0
            rk.peak = max(rk.peak, rk.live)

    def try_batch(rk: _Rank, batch: tuple[Message, ...]) -> bool:
        """Post the batch (once); complete it once every message in it is matched. False: wait."""
        key = (rk.rank, rk.next)
        if key not in posted:
            for msg in batch:
                if isinstance(msg, S.SENDS):
                    phase = "F" if isinstance(msg, S.SendActivation) else "B"
                    if (phase, msg.microbatch, msg.chunk) not in rk.done:
                        raise fail(rk, f"{S.describe(msg)} before the computation producing it")
            posted[key] = rk.clock
        finish = posted[key]
        for msg in batch:
            other = ends[(S.message_id(p, rk.rank, msg, placement), not isinstance(msg, S.SENDS))]
            if other not in posted:
                return False
            finish = max(finish, posted[other])
        rk.clock = finish + t_comm
        for msg in batch:
            if not isinstance(msg, S.SENDS):
                rk.arrived.add(S.message_id(p, rk.rank, msg, placement))
        return True

    # Run each rank until it must wait for a batch, and sweep again. Times do not depend on the
    # sweep order: a batch finishes at the max of post times, which are final once recorded. A sweep
    # in which no rank moves is a deadlock.
    while any(rk.next < len(rk.steps) for rk in ranks):
        progressed = False
        for rk in ranks:
            while rk.next < len(rk.steps):
                step = rk.steps[rk.next]
                if isinstance(step, tuple):
                    if not try_batch(rk, step):
                        break
                else:
                    compute(rk, step)
                rk.next += 1
                progressed = True
        if not progressed:
            stuck = "; ".join(
                f"rank {rk.rank} waits in [{', '.join(S.describe(a) for a in rk.steps[rk.next])}]"
                for rk in ranks if rk.next < len(rk.steps)
            )
            raise ScheduleError(f"deadlock: {stuck}")

    _check_complete(ranks, v, m, forward_only)
    makespan = max(rk.clock for rk in ranks)
    ideal = m * (t_f if forward_only else t_f + t_bi + t_bw)
    return SimResult(makespan, ideal, (makespan - ideal) / ideal, [rk.peak for rk in ranks], events,
                     rank_bubble(events))


def _check_complete(ranks: list[_Rank], v: int, m: int, forward_only: bool) -> None:
    phases = "F" if forward_only else "FBW"
    expected = {(k, i, c) for k in phases for i in range(m) for c in range(v)}
    for rk in ranks:
        missing = sorted(expected - rk.done)
        if missing:
            raise ScheduleError(f"rank {rk.rank} never runs {missing[:4]} (of {len(missing)})")
        if rk.done != expected:
            raise ScheduleError(f"rank {rk.rank} runs unexpected work {sorted(rk.done - expected)[:4]}")
        if rk.arrived:
            raise ScheduleError(f"rank {rk.rank} receives data it never uses: {sorted(rk.arrived)[:4]}")


def simulate_schedule(
    name: str, p: int, v: int, m: int, forward_only: bool = False, t_f: float = 1.0,
    t_bi: float = 1.0, t_bw: float = 1.0, t_comm: float = 0.0, layout_costs: Optional[tuple] = None,
) -> SimResult:
    """Build schedule ``name`` (or ``auto``) for every rank and simulate it at the given costs.

    The messages are laid out for ``layout_costs`` (default: the simulated costs, as a run whose
    costs were measured would be); pass ``(1, 1, 1)`` to see the default lists at other costs.
    """
    name = S.resolve(name, v)
    lists = S.all_ranks(name, p, v, m, forward_only, layout_costs or (t_f, t_bi, t_bw))
    return simulate(lists, p, v, m, t_f=t_f, t_bi=t_bi, t_bw=t_bw, t_comm=t_comm,
                    forward_only=forward_only, placement=S.placement_of(name))


def _read_trace(path: str) -> dict[str, Any]:
    """A trace file written by ``executor.save_trace``; ValueError (one line naming it) otherwise."""
    try:
        with open(path) as f:
            trace = json.load(f)
    except OSError as err:
        raise ValueError(f"--trace {path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--trace {path}: not JSON ({err}); pass a file written by a run's "
                         "parallel.pipeline_trace") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("events"), list):
        raise ValueError(f"--trace {path}: no 'events' list; pass a file written by a run's "
                         "parallel.pipeline_trace")
    return trace


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module docstring). Exit code 2 with one line for sizes a schedule rejects."""
    parser = argparse.ArgumentParser(prog="python -m megatron_lite.pipeline.simulate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline ranks p")
    parser.add_argument("--vpp", type=int, default=None,
                        help="virtual stages per rank v (default 2 for zbv, else 1)")
    parser.add_argument("--microbatches", type=int, default=8, help="microbatches m")
    parser.add_argument("--schedule", default="auto", help="auto | " + " | ".join(S.SCHEDULES))
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--t-forward", type=float, default=1.0, help="forward time of a full stage")
    parser.add_argument("--t-backward-input", type=float, default=1.0,
                        help="input-gradient half of a full stage's backward")
    parser.add_argument("--t-backward-weight", type=float, default=1.0,
                        help="weight-gradient half of a full stage's backward")
    parser.add_argument("--t-comm", type=float, default=0.0, help="time a message travels")
    parser.add_argument("--trace", help="a trace JSON written by the executor: report and draw it")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plot", help="write the timeline to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.vpp is None:
        args.vpp = 2 if args.schedule == "zbv" else 1

    if args.trace:
        try:
            trace = _read_trace(args.trace)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        events, v = trace["events"], trace.get("vpp", 1)
        report = trace_bubble(events)
        title = (f"recorded {trace.get('schedule', '')}: p={trace.get('pp')} v={v} "
                 f"m={trace.get('microbatches')}, bubble {report['bubble_fraction']:.3f}")
    else:
        try:
            name = S.resolve(args.schedule, args.vpp)
            result = simulate_schedule(name, args.pp, args.vpp, args.microbatches, args.forward_only,
                                       t_f=args.t_forward, t_bi=args.t_backward_input,
                                       t_bw=args.t_backward_weight, t_comm=args.t_comm)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        events, v, report = result.events, args.vpp, result.summary(args.vpp)
        report = {"schedule": name, **report}
        title = (f"{name}: p={args.pp} v={args.vpp} m={args.microbatches}, "
                 f"bubble {result.bubble_fraction:.3f}")
    if args.plot:
        plot_timeline(events, args.plot, title, v)
    if args.json:
        print(json.dumps(report))
    else:
        print(title)
        for key, value in report.items():
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
