"""Pipeline schedules as data: ``schedule(name, p, v, m, rank) -> list[Action]``.

A pipeline of ``p`` ranks with ``v`` virtual stages per rank cuts the model into ``p·v`` chunks. A
*placement* says which global chunks a rank holds, as its local chunks ``0 … v−1``:

- ``looped`` (Megatron's assignment, every schedule but ZB-V): local chunk ``c`` of rank ``r`` is
  global chunk ``c·p + r``;
- ``v`` (ZB-V, v = 2): rank ``r`` holds global chunks ``r`` and ``2p − 1 − r``, so the data goes down
  the ranks and back up, and rank 0 holds both the first and the last chunk.

A batch is split into ``m`` microbatches. A schedule is a pure function returning, for one rank, the
ordered list of what that rank does:

- ``Forward(i, c)``: microbatch ``i`` through local chunk ``c``;
- ``Backward(i, c)``: its whole backward (input and weight gradients);
- ``BackwardInput(i, c)`` then, later, ``BackwardWeight(i, c)``: the same backward split in two, as the
  zero-bubble schedules run it (Qi et al. 2023): the input gradient first, which the previous chunk is
  waiting for, and the linear layers' weight gradients when the rank would otherwise idle;
- ``SendActivation`` / ``RecvActivation``: the output of a forward, passed to the next global chunk;
- ``SendGrad`` / ``RecvGrad``: the gradient of that output, passed back to the previous global chunk.

Each message names the microbatch, the *local* chunk on this rank that produces (send) or consumes
(recv) it, and the peer's pipeline rank. Two consecutive global chunks on one rank (ZB-V's turn at
rank p − 1) hand their tensors over without a message.

Consecutive messages form one batch, which the executor posts as one ``batch_isend_irecv`` group and
waits for as a whole: NCCL's semantics, under which no message of a group completes before every one
of them is matched by the peers (see ``p2p.py``). A batch therefore completes only once each peer has
posted the batch holding the other end of each of its messages, so where the messages sit decides
whether the ranks can run at all. The schedules differ only in their computation orders
(``_ORDERS``); one function then places every message (``_messages_by_time``): it plays the orders
step by step and exchanges each message at the first step at which both of its ranks are between
computations, so the two ends of every message sit in batches with the same time stamp. Every rank
meets its batches in stamp order, hence the lists cannot deadlock whatever the real costs are, and at
the layout's costs no rank waits for a batch its peer has not posted. In 1F1B's steady state this
gives Megatron's pairing: [send activation, receive gradient] on one rank against [send gradient,
receive activation] on the next. The simulator checks every list (``simulate.py``).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Optional, Union

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p", "zbv")
SPLIT_BACKWARD = ("zb1p", "zbv")  # schedules whose backward is BackwardInput + BackwardWeight
LOOPED, V_SHAPE = "looped", "v"


@dataclass(frozen=True)
class _Compute:
    microbatch: int
    chunk: int  # local chunk index, 0 … v−1


@dataclass(frozen=True)
class _Message:
    microbatch: int
    chunk: int  # the local chunk that produces (send) or consumes (recv) the tensor
    peer: int  # pipeline rank at the other end


@dataclass(frozen=True)
class Forward(_Compute):
    """Run local chunk ``chunk`` forward on microbatch ``microbatch``."""


@dataclass(frozen=True)
class Backward(_Compute):
    """Back-propagate microbatch ``microbatch`` through local chunk ``chunk``; frees its activations."""


@dataclass(frozen=True)
class BackwardInput(_Compute):
    """The input-gradient half of ``Backward``: what the previous chunk waits for. The linear layers'
    weight gradients are deferred (their inputs and output gradients kept) until ``BackwardWeight``."""


@dataclass(frozen=True)
class BackwardWeight(_Compute):
    """The deferred weight gradients of ``BackwardInput(microbatch, chunk)``; frees what they kept."""


@dataclass(frozen=True)
class SendActivation(_Message):
    """Send the output of ``Forward(microbatch, chunk)`` to pipeline rank ``peer``."""


@dataclass(frozen=True)
class RecvActivation(_Message):
    """Receive from pipeline rank ``peer`` the input of ``Forward(microbatch, chunk)``."""


@dataclass(frozen=True)
class SendGrad(_Message):
    """Send the input gradient made by the backward of (microbatch, chunk) to pipeline rank ``peer``."""


@dataclass(frozen=True)
class RecvGrad(_Message):
    """Receive from pipeline rank ``peer`` the output gradient the backward of (microbatch, chunk) needs."""


Compute = Union[Forward, Backward, BackwardInput, BackwardWeight]
Message = Union[SendActivation, RecvActivation, SendGrad, RecvGrad]
Action = Union[Compute, Message]
COMPUTE = (Forward, Backward, BackwardInput, BackwardWeight)
INPUT_GRAD = (Backward, BackwardInput)  # the computations that produce a chunk's input gradient
WEIGHT_GRAD = (Backward, BackwardWeight)  # the computations after which a chunk's activations are gone
SENDS = (SendActivation, SendGrad)
# How traces and timelines name each computation (``timeline.py``).
EVENT_KIND = {Forward: "forward", Backward: "backward", BackwardInput: "backward_input",
              BackwardWeight: "backward_weight"}


# Chunk geometry -----------------------------------------------------------------------------------
def placement_of(name: str) -> str:
    """The chunk placement schedule ``name`` runs on: ``v`` for ZB-V, ``looped`` otherwise."""
    return V_SHAPE if name == "zbv" else LOOPED


def global_chunk(p: int, rank: int, chunk: int, placement: str = LOOPED) -> int:
    """The position in the whole model of local chunk ``chunk`` of pipeline rank ``rank``."""
    if placement == V_SHAPE:
        return rank if chunk == 0 else 2 * p - 1 - rank
    return chunk * p + rank


def locate(p: int, g: int, placement: str = LOOPED) -> tuple[int, int]:
    """(pipeline rank, local chunk) holding global chunk ``g``."""
    if placement == V_SHAPE:
        return (g, 0) if g < p else (2 * p - 1 - g, 1)
    return g % p, g // p


def message_id(p: int, rank: int, action: Message, placement: str = LOOPED) -> tuple[str, int, int]:
    """What a message carries, the same on both ends: (kind, microbatch, producing global chunk).

    An activation is produced by a forward, a gradient by a backward; the receiver's chunk is one
    further along (activation) or one back (gradient), so both ends name the same producer.
    """
    g = global_chunk(p, rank, action.chunk, placement)
    if isinstance(action, SendActivation):
        return ("activation", action.microbatch, g)
    if isinstance(action, RecvActivation):
        return ("activation", action.microbatch, g - 1)
    if isinstance(action, SendGrad):
        return ("grad", action.microbatch, g)
    return ("grad", action.microbatch, g + 1)


# Computation orders -------------------------------------------------------------------------------
def _gpipe_order(p: int, v: int, m: int, rank: int) -> list[Compute]:
    """GPipe (Huang et al. 2019): every forward, then every backward."""
    return [Forward(i, 0) for i in range(m)] + [Backward(i, 0) for i in range(m)]


def _one_f_one_b_order(p: int, v: int, m: int, rank: int) -> list[Compute]:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021, fig. 4 top).

    Warm-up: stage ``rank`` runs ``p − rank − 1`` forwards, enough to fill the pipeline below it.
    Steady state: one forward, one backward, so at most ``p − rank`` microbatches are in flight.
    Cool-down: the backwards that remain.
    """
    warmup = min(p - rank - 1, m)
    order: list[Compute] = [Forward(i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Forward(warmup + i, 0), Backward(i, 0)]
    order += [Backward(i, 0) for i in range(m - warmup, m)]
    return order


def _interleaved_order(p: int, v: int, m: int, rank: int) -> list[Compute]:
    """Interleaved 1F1B (Narayanan et al. 2021, fig. 4 bottom), in Megatron-LM's order.

    The ``m·v`` (microbatch, chunk) pairs are visited in groups of ``p`` microbatches: forwards run
    microbatches ``0…p−1`` on chunk 0, then the same group on chunk 1, …, then the next group;
    backwards run the same sequence with the chunks reversed. Warm-up is ``2(p − rank − 1) + (v − 1)p``
    forwards (all of them when ``m == p``), then one forward and one backward alternate.
    """
    total = m * v

    def pair(k: int, forward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk, offset = divmod(within, p)
        return group * p + offset, chunk if forward else v - 1 - chunk

    warmup = total if m == p else min(2 * (p - rank - 1) + (v - 1) * p, total)
    order: list[Compute] = [Forward(*pair(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [Forward(*pair(warmup + k, True)), Backward(*pair(k, False))]
    order += [Backward(*pair(k, False)) for k in range(total - warmup, total)]
    return order


def _zb1p_order(p: int, v: int, m: int, rank: int) -> list[Compute]:
    """ZB-H1 (Qi et al. 2023, fig. 3 top): 1F1B with each backward split, stage ``rank`` running the
    weight half of microbatch ``k − rank`` after the input half of microbatch ``k``.

    The input gradients then travel up the pipeline without waiting for weight passes, and the
    ``rank + 1`` weight passes left at the end fill the cool-down that 1F1B leaves idle. At unit costs
    (F = B_input = B_weight) the bubble is (p − 1)/(3m), a third of 1F1B's. Every stage holds at most
    ``p`` microbatches (``p − rank`` waiting for their input gradient, ``rank`` for their weight
    gradient), the peak of 1F1B's first stage.
    """
    warmup = min(p - rank, m)
    order: list[Compute] = [Forward(i, 0) for i in range(warmup)]
    for k in range(m):
        order.append(BackwardInput(k, 0))
        if k >= rank:
            order.append(BackwardWeight(k - rank, 0))
        if warmup + k < m:
            order.append(Forward(warmup + k, 0))
    order += [BackwardWeight(k, 0) for k in range(max(0, m - rank), m)]
    return order


class _VLayout:
    """ZB-V's computation orders, built by placing computations one by one on a unit-cost clock.

    Every chunk computation (F, B_input, B_weight) takes one step; a computation starts when its
    rank is free and its input exists. The builder tracks per rank the clock, the activation sets
    held (forward done, weight pass not) and the weight passes pending, and places:

    1. warm-up: each rank runs chunk-0 forwards until the chunk-1 input of its next microbatch can
       arrive, keeping room for ``2 + 2·rank`` more sets (a chunk-0 forward placed on rank ``r`` is
       placed on every rank below it too, so lower ranks stay ahead); then the chunk-1 forward;
    2. forwards evened out, so that every rank has run as many as the one before it;
    3. ``2m`` rounds: each rank one input-gradient pass (chunk 0 once its input is there and it is
       behind chunk 1, else chunk 1), then each rank one forward (chunk 1 when its input is there,
       else chunk 0). A weight pass goes first wherever the rank would otherwise wait for that input,
       or when the next forward would exceed ``2p`` sets;
    4. the weight passes left.
    """

    def __init__(self, p: int, m: int):
        self.p, self.m, self.cap = p, m, 2 * p
        self.orders: list[list[Compute]] = [[] for _ in range(p)]
        self.clock, self.live = [0] * p, [0] * p
        self.pending: list[list[tuple[int, int]]] = [[] for _ in range(p)]  # (microbatch, chunk)
        self.end: dict[tuple[str, int, int], int] = {}  # (phase, microbatch, global chunk) -> step
        self.count: dict[tuple[int, str, int], int] = defaultdict(int)  # (rank, phase, chunk) -> done

    def input_ready(self, r: int, phase: str, c: int) -> Optional[int]:
        """When the input of rank ``r``'s next ``phase`` (F or B) on chunk ``c`` exists (None: not
        placed yet)."""
        i, g = self.count[(r, phase, c)], global_chunk(self.p, r, c, V_SHAPE)
        if phase == "F":
            return 0 if g == 0 else self.end.get(("F", i, g - 1))
        return 0 if g == 2 * self.p - 1 else self.end.get(("B", i, g + 1))

    def place(self, r: int, phase: str, c: int) -> None:
        if phase == "W":
            i, c = self.pending[r].pop(0)
            ready = self.end[("B", i, global_chunk(self.p, r, c, V_SHAPE))]
        else:
            i, ready = self.count[(r, phase, c)], self.input_ready(r, phase, c)
        start = max(self.clock[r], ready)
        self.clock[r] = start + 1
        self.end[(phase, i, global_chunk(self.p, r, c, V_SHAPE))] = start + 1
        self.count[(r, phase, c)] += 1
        self.orders[r].append({"F": Forward, "B": BackwardInput, "W": BackwardWeight}[phase](i, c))
        self.live[r] += {"F": 1, "B": 0, "W": -1}[phase]
        if phase == "B":
            self.pending[r].append((i, c))

    def place_after_waiting(self, r: int, phase: str, c: int) -> None:
        """``phase`` on chunk ``c``, after the weight passes that fit while its input is on the way
        (and, for a forward, those that make room for its activations)."""
        ready = self.input_ready(r, phase, c)
        while self.pending[r] and (self.clock[r] + 1 <= ready or (
                phase == "F" and self.live[r] + 1 > self.cap)):
            self.place(r, "W", 0)
        self.place(r, phase, c)

    def forwards(self, r: int) -> int:
        return self.count[(r, "F", 0)] + self.count[(r, "F", 1)]

    def build(self) -> tuple[tuple[Compute, ...], ...]:
        p, m = self.p, self.m
        for r in range(p):
            self.place(r, "F", 0)
        for r in reversed(range(p)):
            if r < p - 1:
                arrives = self.input_ready(r, "F", 1)
                while (self.live[r] + 2 + 2 * r <= self.cap and self.clock[r] + 1 <= arrives
                       and self.count[(r, "F", 0)] < m):
                    for below in range(r + 1):
                        self.place(below, "F", 0)
            self.place(r, "F", 1)
        chunk = 0
        for r in range(1, p):
            while self.forwards(r) < self.forwards(r - 1) or (
                    self.count[(r, "F", 1)] <= self.count[(r - 1, "F", 1)] < m):
                for q in reversed(range(r, p)):
                    behind = chunk == 0 or self.count[(q, "F", 1)] < self.count[(q, "F", 0)]
                    if (self.count[(q, "F", chunk)] < m and behind
                            and self.input_ready(q, "F", chunk) is not None):
                        self.place(q, "F", chunk)
                chunk = 1 - chunk
        for _ in range(2 * m):
            for r, c in self._backward_round():
                # Readiness is checked now: a pass placed just before may have made this input.
                if self.count[(r, "B", c)] < m and self.input_ready(r, "B", c) is not None:
                    self.place_after_waiting(r, "B", c)
            for r in range(p):
                c = self._next_forward_chunk(r)
                if c is not None:
                    self.place_after_waiting(r, "F", c)
        for r in range(p):
            while self.pending[r]:
                self.place(r, "W", 0)
        return tuple(tuple(order) for order in self.orders)

    def _backward_round(self) -> list[tuple[int, int]]:
        """(rank, chunk) of this round's input-gradient passes: chunk-1 ranks first, from rank 0 up,
        then chunk-0 ranks from the last rank down (the order the gradients travel)."""
        up, down = [], []
        for r in range(self.p):
            b1, b0 = self.count[(r, "B", 1)], self.count[(r, "B", 0)]
            if b0 >= b1:
                c = 1
            elif r == self.p - 1 or b1 >= self.m or self.input_ready(r, "B", 0) is not None:
                c = 0
            else:
                c = 1
            (up if c == 1 else down).append((r, c))
        return up + down[::-1]

    def _next_forward_chunk(self, r: int) -> Optional[int]:
        f1, f0 = self.count[(r, "F", 1)], self.count[(r, "F", 0)]
        if f1 < f0 and self.input_ready(r, "F", 1) is not None:
            return 1
        if f0 < self.m and self.input_ready(r, "F", 0) is not None:
            return 0
        return None


@lru_cache(maxsize=64)
def _zbv_orders(p: int, m: int) -> tuple[tuple[Compute, ...], ...]:
    """ZB-V (Qi et al. 2023, §6), every rank's order: see ``_VLayout``. At unit costs no rank idles
    between its first and last computation once m ≥ 2p, and each holds at most 2p chunk activation
    sets (p full-stage microbatches, 1F1B's peak)."""
    return _VLayout(p, m).build()


def _zbv_order(p: int, v: int, m: int, rank: int) -> list[Compute]:
    return list(_zbv_orders(p, m)[rank])


_ORDERS: dict[str, Callable[[int, int, int, int], list[Compute]]] = {
    "gpipe": _gpipe_order,
    "1f1b": _one_f_one_b_order,
    "interleaved": _interleaved_order,
    "zb1p": _zb1p_order,
    "zbv": _zbv_order,
}


# Messages -----------------------------------------------------------------------------------------
def _outputs(p: int, v: int, rank: int, op: Compute, placement: str) -> list[Message]:
    """The message ``op`` produces: its output activation, or the gradient of its input."""
    g = global_chunk(p, rank, op.chunk, placement)
    if isinstance(op, Forward) and g < p * v - 1:
        peer = locate(p, g + 1, placement)[0]
        return [] if peer == rank else [SendActivation(op.microbatch, op.chunk, peer)]
    if isinstance(op, INPUT_GRAD) and g > 0:
        peer = locate(p, g - 1, placement)[0]
        return [] if peer == rank else [SendGrad(op.microbatch, op.chunk, peer)]
    return []


Costs = tuple[Fraction, Fraction, Fraction]  # forward, input-gradient and weight-gradient time
UNIT_COSTS: Costs = (Fraction(1), Fraction(1), Fraction(1))


def _duration(op: Compute, costs: Costs) -> Fraction:
    """How long a computation takes when the schedule is laid out; a whole backward is both halves."""
    forward, backward_input, backward_weight = costs
    if isinstance(op, Forward):
        return forward
    if isinstance(op, Backward):
        return backward_input + backward_weight
    return backward_input if isinstance(op, BackwardInput) else backward_weight


def _messages_by_time(p: int, v: int, orders: list[list[Compute]], placement: str,
                      costs: Costs = UNIT_COSTS) -> list[list[Action]]:
    """Every rank's actions, each message in the batches its two ends post at one moment.

    The orders are played at ``costs`` (exact fractions), each rank starting its next computation as
    soon as it is free and the input is there. At every moment a computation ends, first each
    message produced and not yet exchanged whose two ranks are both between computations (a rank
    that waits is between computations) is exchanged, stamped with that moment; then the free ranks
    start what they can. Each rank posts its messages with one stamp as one batch between its
    computations before and after that moment. The two ends of every message thus sit in batches
    with the same stamp and every rank meets its batches in stamp order, so the lists cannot
    deadlock whatever the real costs are; at the layout's costs no rank waits for a batch.
    """
    position, busy_until = [0] * p, [Fraction(0)] * p
    have: set[tuple[str, int, int]] = set()  # (phase, microbatch, global chunk) usable where it lives
    pending: list[tuple[int, int, Message, Message]] = []  # (sender, receiver, send, recv) in order
    lists: list[list[Action]] = [[] for _ in range(p)]
    batch: list[list[Message]] = [[] for _ in range(p)]
    finishing: dict[Fraction, list[tuple[tuple[str, int, int], list]]] = defaultdict(list)
    moments, remaining = [Fraction(0)], sum(len(o) for o in orders)
    while moments:
        now = heapq.heappop(moments)
        while moments and moments[0] == now:
            heapq.heappop(moments)
        for key, messages in finishing.pop(now, []):
            have.add(key)
            pending.extend(messages)
        free = [busy_until[r] <= now for r in range(p)]
        waiting = []
        for sender, receiver, send, recv in pending:
            behind = any(s == sender and q == receiver for s, q, _, _ in waiting)  # channel order
            if free[sender] and free[receiver] and not behind:
                batch[sender].append(send)
                batch[receiver].append(recv)
                have.add(("A" if isinstance(send, SendActivation) else "G", send.microbatch,
                          global_chunk(p, receiver, recv.chunk, placement)))
            else:
                waiting.append((sender, receiver, send, recv))
        pending = waiting
        for r in range(p):
            if not free[r] or position[r] == len(orders[r]):
                continue
            op = orders[r][position[r]]
            g = global_chunk(p, r, op.chunk, placement)
            if isinstance(op, Forward):
                need = None if g == 0 else ("F", op.microbatch, g - 1) if locate(
                    p, g - 1, placement)[0] == r else ("A", op.microbatch, g)
            elif isinstance(op, INPUT_GRAD):
                need = None if g == p * v - 1 else ("B", op.microbatch, g + 1) if locate(
                    p, g + 1, placement)[0] == r else ("G", op.microbatch, g)
            else:
                need = ("B", op.microbatch, g)
            if need is not None and need not in have:
                continue
            lists[r] += batch[r]
            batch[r] = []
            lists[r].append(op)
            position[r] += 1
            remaining -= 1
            busy_until[r] = now + _duration(op, costs)
            heapq.heappush(moments, busy_until[r])
            phase = "F" if isinstance(op, Forward) else "B" if isinstance(op, INPUT_GRAD) else "W"
            messages = []
            for msg in _outputs(p, v, r, op, placement):
                receiver, chunk = locate(p, g + (1 if isinstance(msg, SendActivation) else -1), placement)
                recv = RecvActivation if isinstance(msg, SendActivation) else RecvGrad
                messages.append((r, receiver, msg, recv(op.microbatch, chunk, r)))
            finishing[busy_until[r]].append(((phase, op.microbatch, g), messages))
    if remaining:
        raise RuntimeError("computation orders wait on each other: not a schedule")
    for r in range(p):
        lists[r] += batch[r]
    return lists


# Public entry points ------------------------------------------------------------------------------
def resolve(name: str, v: int) -> str:
    """``auto`` -> ``interleaved`` with virtual stages (v > 1), else ``1f1b``; other names unchanged."""
    if name == "auto":
        return "interleaved" if v > 1 else "1f1b"
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r} is not one of auto, {', '.join(SCHEDULES)}")
    return name


class ScheduleSizeError(ValueError):
    """Sizes a schedule cannot run: ``requirement`` says what it needs, ``size`` names the size to
    change (``"v"`` virtual stages or ``"m"`` microbatches); for ``"m"``, ``multiple`` is what the
    count must be a multiple of. ``str()`` is the requirement and the value given."""

    def __init__(self, size: str, requirement: str, given: str, multiple: int = 1):
        super().__init__(f"{requirement}, got {given}")
        self.size, self.requirement, self.multiple = size, requirement, multiple


def check_sizes(name: str, p: int, v: int, m: int) -> None:
    """The schedule's rules on its sizes (the one copy: ``config.validate`` calls it too).

    Raises ScheduleSizeError (one line, naming the fix) for sizes schedule ``name`` cannot run.
    """
    if p < 1 or v < 1 or m < 1:
        raise ValueError(f"pipeline sizes must be positive, got p={p}, v={v}, m={m}")
    if name == "zbv":
        if v != 2:
            raise ScheduleSizeError("v", "zbv runs exactly 2 virtual stages per rank (the V placement)",
                                    f"v={v}")
        if p < 2:
            raise ScheduleSizeError("v", "zbv needs more than one pipeline rank", f"p={p}")
        return
    if v > 1 and name != "interleaved":
        raise ScheduleSizeError("v", f"{name} cannot run virtual stages; use interleaved or zbv (v=2)",
                                f"v={v}")
    if v > 1 and p == 1:
        raise ScheduleSizeError("v", "virtual stages need more than one pipeline rank", f"p={p}")
    if name == "interleaved" and m % p:
        raise ScheduleSizeError(
            "m", f"the interleaved schedule needs a number of microbatches that is a multiple of PP={p}",
            f"m={m}", multiple=p,
        )


@lru_cache(maxsize=256)
def _all_lists(name: str, p: int, v: int, m: int, forward_only: bool,
               costs: Costs) -> tuple[tuple[Action, ...], ...]:
    placement = placement_of(name)
    orders = [_ORDERS[name](p, v, m, r) for r in range(p)]
    if forward_only:
        orders = [[op for op in order if isinstance(op, Forward)] for order in orders]
    return tuple(tuple(actions) for actions in _messages_by_time(p, v, orders, placement, costs))


def schedule(
    name: str, p: int, v: int, m: int, rank: int, forward_only: bool = False,
    costs: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[Action]:
    """The ordered actions of pipeline rank ``rank`` for schedule ``name`` (or ``auto``).

    ``forward_only`` (evaluation) keeps the schedule's forward order and drops every backward and
    gradient message. ``costs``: the relative forward, input-gradient and weight-gradient times the
    messages are laid out for (the computation order does not depend on them; any costs run, these
    run without waiting for a batch).
    """
    name = resolve(name, v)
    check_sizes(name, p, v, m)
    if not 0 <= rank < p:
        raise ValueError(f"pipeline rank {rank} is outside 0..{p - 1}")
    exact = tuple(Fraction(c).limit_denominator(1000) for c in costs)
    if min(exact) < 0 or exact[0] == 0:
        raise ValueError(f"costs must be non-negative with a positive forward time, got {costs}")
    return list(_all_lists(name, p, v, m, forward_only, exact)[rank])


def gpipe(p: int, v: int, m: int, rank: int) -> list[Action]:
    """GPipe: all forwards, then all backwards (v must be 1)."""
    return schedule("gpipe", p, v, m, rank)


def one_f_one_b(p: int, v: int, m: int, rank: int) -> list[Action]:
    """1F1B: warm-up ``min(p − rank − 1, m)`` forwards, steady one-forward-one-backward, cool-down."""
    return schedule("1f1b", p, v, m, rank)


def interleaved(p: int, v: int, m: int, rank: int) -> list[Action]:
    """Interleaved 1F1B over ``v`` virtual stages per rank (``m`` a multiple of ``p``)."""
    return schedule("interleaved", p, v, m, rank)


def all_ranks(name: str, p: int, v: int, m: int, forward_only: bool = False,
              costs: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[list[Action]]:
    """The action lists of every pipeline rank, indexed by rank."""
    return [schedule(name, p, v, m, r, forward_only, costs) for r in range(p)]


def describe(action: Action) -> str:
    """A short label: ``F3.1`` (forward, microbatch 3, local chunk 1), ``sendA3.1->2``, …"""
    short = {
        Forward: "F", Backward: "B", BackwardInput: "Bi", BackwardWeight: "W", SendActivation: "sendA",
        RecvActivation: "recvA", SendGrad: "sendG", RecvGrad: "recvG",
    }[type(action)]
    label = f"{short}{action.microbatch}.{action.chunk}"
    if isinstance(action, COMPUTE):
        return label
    arrow = "->" if isinstance(action, SENDS) else "<-"
    return f"{label}{arrow}{action.peer}"
