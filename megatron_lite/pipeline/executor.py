"""The one executor: runs any schedule's action list on this pipeline rank.

Interface (what the trainer and a model's pipeline wrapper rely on)::

    loss = run_schedule(actions, chunks, state, microbatches, forward_step, tensor_shape, dtype,
                        forward_only=False, trace=None, broadcast_loss=False, stats=None,
                        on_action=None)

- ``actions``: this rank's list from ``schedules.schedule(name, p, v, m, state.pp_rank)``.
- ``chunks``: this rank's ``v`` model chunks; local chunk ``c`` is global chunk ``c·p + pp_rank``.
- ``microbatches``: the ``m`` microbatches of this iteration (any objects; each rank gets the same
  list, and a stage uses what it needs of them: inputs on the first, labels on the last).
- ``forward_step(chunk_index, input_tensor, microbatch) -> Tensor``: runs local chunk
  ``chunk_index``. ``input_tensor`` is ``None`` on global chunk 0 (read the microbatch) and otherwise
  the received activation of shape ``tensor_shape``. It returns the chunk's output activation (of
  shape ``tensor_shape``), or on the last global chunk that microbatch's scalar loss (its mean over
  the microbatch's tokens).
- ``tensor_shape`` / ``dtype``: the activation exchanged between stages, as the model decides it
  (with sequence parallelism, the SP-sharded shape).

The executor divides each microbatch's loss by ``m`` so that the gradients it accumulates into the
chunks' ``.grad`` are those of the mean loss over the global batch (it does not zero them first;
data-parallel reduction is the caller's job). It keeps each forward's input and output only until
that microbatch's backward on the chunk is done. It returns the mean loss (detached, 0-dim) on the
last stage and ``None`` elsewhere; ``broadcast_loss=True`` broadcasts it over the pipeline group so
every stage returns it. ``forward_only`` runs the forwards without autograd (evaluation; the action
list must be forward-only too). ``trace``, a list, receives one event per computation and per
message batch with wall-clock start and end (``save_trace`` writes a run's events for ``simulate
--trace``; on a GPU these are host times: kernels may still run after an event ends). ``stats``, a
``ScheduleStats``, receives the peak number of live (microbatch, chunk) activation sets.
``on_action(label)`` is called before each computation (``F3.0``: forward of microbatch 3 on local
chunk 0) and each message batch (``recvA3.0<-0 sendG2.0->1``), e.g. by the hang watchdog.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import schedules as S
from .p2p import PipelineLink

if TYPE_CHECKING:
    from ..parallel.state import ParallelState

ForwardStep = Callable[[int, Optional[torch.Tensor], Any], torch.Tensor]


@dataclass
class ScheduleStats:
    """What one ``run_schedule`` call held: the most (microbatch, chunk) activation sets stored at
    once, waiting for their backward (1F1B: at most p on stage 0; GPipe: m)."""

    peak_live_activations: int = 0


class _Run:
    """The state of one schedule run on this rank: tensors waiting for a computation or a send."""

    def __init__(self, state: ParallelState, v: int, m: int, forward_only: bool):
        self.p, self.rank, self.v, self.m = state.pp_size, state.pp_rank, v, m
        self.forward_only = forward_only
        self.received: dict[tuple, torch.Tensor] = {}  # (kind, microbatch, chunk) -> tensor
        self.to_send: dict[tuple, torch.Tensor] = {}  # (kind, microbatch, chunk) -> tensor
        self.stored: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self.loss_sum: Optional[torch.Tensor] = None
        self.peak = 0

    def is_last(self, chunk: int) -> bool:
        return S.global_chunk(self.p, self.rank, chunk) == self.p * self.v - 1

    def is_first(self, chunk: int) -> bool:
        return S.global_chunk(self.p, self.rank, chunk) == 0


def _forward(run: _Run, op: S.Forward, microbatches: Sequence[Any], forward_step: ForwardStep,
             tensor_shape: tuple[int, ...]) -> None:
    key = (op.microbatch, op.chunk)
    x = None if run.is_first(op.chunk) else run.received.pop(("activation", *key))
    if x is not None and not run.forward_only:
        x.requires_grad_()
    with torch.set_grad_enabled(not run.forward_only):
        out = forward_step(op.chunk, x, microbatches[op.microbatch])
    if run.is_last(op.chunk):
        if out.numel() != 1:
            raise ValueError(
                f"forward_step on the last chunk must return a scalar loss, got shape {tuple(out.shape)}"
            )
        out = out.reshape(()) / run.m  # the mean over the global batch
        loss = out.detach().float()  # summed in fp32 whatever the compute precision
        run.loss_sum = loss if run.loss_sum is None else run.loss_sum + loss
    else:
        if tuple(out.shape) != tuple(tensor_shape):
            raise ValueError(
                f"forward_step(chunk {op.chunk}) returned shape {tuple(out.shape)}, but stages "
                f"exchange tensor_shape={tuple(tensor_shape)}; pass the shape the model produces"
            )
        run.to_send[("activation", *key)] = out.detach()
    if not run.forward_only:
        run.stored[key] = (x, out)
        run.peak = max(run.peak, len(run.stored))


def _backward(run: _Run, op: S.Backward) -> None:
    key = (op.microbatch, op.chunk)
    x, out = run.stored.pop(key)  # the last reference: the activations go once backward is done
    if run.is_last(op.chunk):
        torch.autograd.backward(out)
    else:
        torch.autograd.backward(out, grad_tensors=run.received.pop(("grad", *key)))
    if not run.is_first(op.chunk):
        if x.grad is None:
            raise ValueError(f"chunk {op.chunk}'s output does not depend on its input tensor")
        run.to_send[("grad", *key)] = x.grad


def _exchange(run: _Run, link: PipelineLink, batch: Sequence[S.Message],
              tensor_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    sends, recvs = [], []
    for msg in batch:
        kind = "activation" if isinstance(msg, (S.SendActivation, S.RecvActivation)) else "grad"
        key = (kind, msg.microbatch, msg.chunk)
        if isinstance(msg, S.SENDS):
            sends.append((run.to_send.pop(key), msg.peer))
        else:
            buffer = torch.empty(tensor_shape, dtype=dtype, device=device)
            run.received[key] = buffer
            recvs.append((buffer, msg.peer))
    link.exchange(sends, recvs)


def run_schedule(
    actions: Sequence[S.Action],
    chunks: Sequence[nn.Module],
    state: ParallelState,
    microbatches: Sequence[Any],
    forward_step: ForwardStep,
    tensor_shape: Sequence[int],
    dtype: torch.dtype,
    forward_only: bool = False,
    trace: Optional[list[dict[str, Any]]] = None,
    broadcast_loss: bool = False,
    stats: Optional[ScheduleStats] = None,
    on_action: Optional[Callable[[str], None]] = None,
) -> Optional[torch.Tensor]:
    """Run ``actions`` on this pipeline rank (see the module docstring for every argument).

    ``state`` is the ``ParallelState``; messages go over ``state.pp_group``. Returns the mean loss
    over the ``m`` microbatches on the last stage (every stage with ``broadcast_loss``), else None.
    """
    tensor_shape = tuple(tensor_shape)
    run = _Run(state, len(chunks), len(microbatches), forward_only)
    link = PipelineLink(state.pp_group, state.pp_ranks)
    _check_actions(actions, run)
    i = 0
    while i < len(actions):
        op = actions[i]
        start = time.time()
        if isinstance(op, S.COMPUTE):
            if on_action is not None:
                on_action(S.describe(op))
            if isinstance(op, S.Forward):
                _forward(run, op, microbatches, forward_step, tensor_shape)
            else:
                _backward(run, op)
            i += 1
            event = dict(kind="forward" if isinstance(op, S.Forward) else "backward",
                         microbatch=op.microbatch, chunk=op.chunk)
        else:
            j = i
            while j < len(actions) and not isinstance(actions[j], S.COMPUTE):
                j += 1
            label = " ".join(S.describe(a) for a in actions[i:j])
            if on_action is not None:
                on_action(label)
            _exchange(run, link, actions[i:j], tensor_shape, dtype, state.device)
            event = dict(kind="p2p", label=label)
            i = j
        if trace is not None:
            trace.append(dict(rank=run.rank, start=start, end=time.time(), **event))
    link.finish()
    if run.stored or run.received or run.to_send:
        raise RuntimeError("the schedule left activations behind: it is not a complete schedule")
    if stats is not None:
        stats.peak_live_activations = run.peak
    return _mean_loss(run, state, broadcast_loss)


def _check_actions(actions: Sequence[S.Action], run: _Run) -> None:
    for a in actions:
        if not (0 <= a.chunk < run.v and 0 <= a.microbatch < run.m):
            raise ValueError(
                f"action {S.describe(a)} does not fit {run.v} chunks and {run.m} microbatches; "
                "build the actions with the same v and m"
            )
        if run.forward_only and isinstance(a, (S.Backward, S.SendGrad, S.RecvGrad)):
            raise ValueError("forward_only needs a forward-only schedule (forward_only=True)")


def _mean_loss(run: _Run, state: ParallelState, broadcast: bool) -> Optional[torch.Tensor]:
    loss = run.loss_sum
    if not broadcast or state.pp_size == 1:
        return loss
    if loss is None:
        loss = torch.zeros((), device=state.device)
    loss = loss.float().contiguous()
    dist.broadcast(loss, src=state.pp_ranks[-1], group=state.pp_group)
    return loss


def save_trace(
    path: str, events: list[dict[str, Any]], state: ParallelState, schedule: str, v: int, m: int
) -> None:
    """Gather this pipeline group's trace events and write them as JSON (global rank 0 writes).

    Collective over ``state.pp_group``: every stage calls it. ``simulate --trace PATH`` reads it.
    """
    gathered: list[Any] = [None] * state.pp_size
    dist.all_gather_object(gathered, events, group=state.pp_group)
    if state.rank != 0:
        return
    merged = [e for rank_events in gathered for e in rank_events]
    with open(path, "w") as f:
        json.dump(dict(schedule=schedule, pp=state.pp_size, vpp=v, microbatches=m, events=merged), f)
