"""Pipeline schedules as data: ``schedule(p, v, m, rank) -> list[Action]``.

A pipeline of ``p`` ranks with ``v`` virtual stages per rank cuts the model into ``p·v`` chunks; rank
``r`` holds the global chunks ``r, r + p, r + 2p, …`` (Megatron's assignment), which it calls local
chunks ``0 … v−1``: local chunk ``c`` of rank ``r`` is global chunk ``c·p + r``. A batch is split into
``m`` microbatches. A schedule is a pure function returning, for one rank, the ordered list of what
that rank does:

- ``Forward(i, c)`` / ``Backward(i, c)``: compute microbatch ``i`` on local chunk ``c``;
- ``SendActivation`` / ``RecvActivation``: the output of a forward, passed to the next global chunk;
- ``SendGrad`` / ``RecvGrad``: the gradient of that output, passed back to the previous global chunk.

Each message names the microbatch, the *local* chunk on this rank that produces (send) or consumes
(recv) it, and the peer's pipeline rank. Consecutive messages form one batch that the executor posts
together (``batch_isend_irecv``); it then waits for the batch's receives, while its sends stay in
flight and never hold the rank back. The simulator checks every list under exactly these semantics:
no deadlock, each microbatch's forward and backward once per chunk in dependency order, and messages
on each rank-to-rank channel received in the order they are sent.

The three schedules differ only in the order of their computations (``_compute_order``); the messages
are then placed mechanically around them (``_with_messages``): each input is received just before the
computation that needs it, each output sent just after the computation that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

SCHEDULES = ("gpipe", "1f1b", "interleaved")


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
class SendActivation(_Message):
    """Send the output of ``Forward(microbatch, chunk)`` to pipeline rank ``peer``."""


@dataclass(frozen=True)
class RecvActivation(_Message):
    """Receive from pipeline rank ``peer`` the input of ``Forward(microbatch, chunk)``."""


@dataclass(frozen=True)
class SendGrad(_Message):
    """Send the input gradient made by ``Backward(microbatch, chunk)`` to pipeline rank ``peer``."""


@dataclass(frozen=True)
class RecvGrad(_Message):
    """Receive from pipeline rank ``peer`` the output gradient ``Backward(microbatch, chunk)`` needs."""


Compute = Union[Forward, Backward]
Message = Union[SendActivation, RecvActivation, SendGrad, RecvGrad]
Action = Union[Forward, Backward, SendActivation, RecvActivation, SendGrad, RecvGrad]
COMPUTE = (Forward, Backward)
SENDS = (SendActivation, SendGrad)


# Chunk geometry -----------------------------------------------------------------------------------
def global_chunk(p: int, rank: int, chunk: int) -> int:
    """The position in the whole model of local chunk ``chunk`` of pipeline rank ``rank``."""
    return chunk * p + rank


def locate(p: int, g: int) -> tuple[int, int]:
    """(pipeline rank, local chunk) holding global chunk ``g``."""
    return g % p, g // p


def message_id(p: int, rank: int, action: Message) -> tuple[str, int, int]:
    """What a message carries, the same on both ends: (kind, microbatch, producing global chunk).

    An activation is produced by a forward, a gradient by a backward; the receiver's chunk is one
    further along (activation) or one back (gradient), so both ends name the same producer.
    """
    g = global_chunk(p, rank, action.chunk)
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


_ORDERS: dict[str, Callable[[int, int, int, int], list[Compute]]] = {
    "gpipe": _gpipe_order,
    "1f1b": _one_f_one_b_order,
    "interleaved": _interleaved_order,
}


# Messages around the computations -----------------------------------------------------------------
def _inputs(p: int, v: int, rank: int, op: Compute) -> list[Message]:
    """The message ``op`` waits for: its input activation, or the gradient of its output."""
    g = global_chunk(p, rank, op.chunk)
    if isinstance(op, Forward) and g > 0:
        return [RecvActivation(op.microbatch, op.chunk, locate(p, g - 1)[0])]
    if isinstance(op, Backward) and g < p * v - 1:
        return [RecvGrad(op.microbatch, op.chunk, locate(p, g + 1)[0])]
    return []


def _outputs(p: int, v: int, rank: int, op: Compute) -> list[Message]:
    """The message ``op`` produces: its output activation, or the gradient of its input."""
    g = global_chunk(p, rank, op.chunk)
    if isinstance(op, Forward) and g < p * v - 1:
        return [SendActivation(op.microbatch, op.chunk, locate(p, g + 1)[0])]
    if isinstance(op, Backward) and g > 0:
        return [SendGrad(op.microbatch, op.chunk, locate(p, g - 1)[0])]
    return []


def _with_messages(p: int, v: int, rank: int, order: list[Compute]) -> list[Action]:
    actions: list[Action] = []
    for op in order:
        actions += _inputs(p, v, rank, op)
        actions.append(op)
        actions += _outputs(p, v, rank, op)
    return actions


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
    if v > 1 and name != "interleaved":
        raise ScheduleSizeError("v", f"{name} cannot run virtual stages; use interleaved", f"v={v}")
    if v > 1 and p == 1:
        raise ScheduleSizeError("v", "virtual stages need more than one pipeline rank", f"p={p}")
    if name == "interleaved" and m % p:
        raise ScheduleSizeError(
            "m", f"the interleaved schedule needs a number of microbatches that is a multiple of PP={p}",
            f"m={m}", multiple=p,
        )


def schedule(
    name: str, p: int, v: int, m: int, rank: int, forward_only: bool = False
) -> list[Action]:
    """The ordered actions of pipeline rank ``rank`` for schedule ``name`` (or ``auto``).

    ``forward_only`` (evaluation) keeps the schedule's forward order and drops every backward and
    gradient message.
    """
    name = resolve(name, v)
    check_sizes(name, p, v, m)
    if not 0 <= rank < p:
        raise ValueError(f"pipeline rank {rank} is outside 0..{p - 1}")
    order = _ORDERS[name](p, v, m, rank)
    if forward_only:
        order = [op for op in order if isinstance(op, Forward)]
    return _with_messages(p, v, rank, order)


def gpipe(p: int, v: int, m: int, rank: int) -> list[Action]:
    """GPipe: all forwards, then all backwards (v must be 1)."""
    return schedule("gpipe", p, v, m, rank)


def one_f_one_b(p: int, v: int, m: int, rank: int) -> list[Action]:
    """1F1B: warm-up ``min(p − rank − 1, m)`` forwards, steady one-forward-one-backward, cool-down."""
    return schedule("1f1b", p, v, m, rank)


def interleaved(p: int, v: int, m: int, rank: int) -> list[Action]:
    """Interleaved 1F1B over ``v`` virtual stages per rank (``m`` a multiple of ``p``)."""
    return schedule("interleaved", p, v, m, rank)


def all_ranks(name: str, p: int, v: int, m: int, forward_only: bool = False) -> list[list[Action]]:
    """The action lists of every pipeline rank, indexed by rank."""
    return [schedule(name, p, v, m, r, forward_only) for r in range(p)]


def describe(action: Action) -> str:
    """A short label: ``F3.1`` (forward, microbatch 3, local chunk 1), ``sendA3.1->2``, …"""
    short = {
        Forward: "F", Backward: "B", SendActivation: "sendA", RecvActivation: "recvA",
        SendGrad: "sendG", RecvGrad: "recvG",
    }[type(action)]
    label = f"{short}{action.microbatch}.{action.chunk}"
    if isinstance(action, COMPUTE):
        return label
    arrow = "->" if isinstance(action, SENDS) else "<-"
    return f"{label}{arrow}{action.peer}"
