"""The one executor: runs any schedule's action list on this pipeline rank.

Interface (what the trainer and a model's pipeline wrapper rely on)::

    loss = run_schedule(actions, chunks, state, microbatches, forward_step, tensor_shape, dtype,
                        forward_only=False, trace=None, broadcast_loss=False, stats=None,
                        on_action=None, placement="looped", deallocate_outputs=True)

- ``actions``: this rank's list from ``schedules.schedule(name, p, v, m, state.pp_rank)``, and
  ``placement`` the schedule's chunk placement (``schedules.placement_of(name)``: ``v`` for zbv).
- ``chunks``: this rank's ``v`` model chunks; local chunk ``c`` is global chunk
  ``schedules.global_chunk(p, pp_rank, c, placement)``.
- ``microbatches``: the ``m`` microbatches of this iteration (any objects; each rank gets the same
  list, and a stage uses what it needs of them: inputs on the first, labels on the last).
- ``forward_step(chunk_index, input_tensor, microbatch) -> Tensor``: runs local chunk
  ``chunk_index``. ``input_tensor`` is ``None`` on global chunk 0 (read the microbatch) and otherwise
  the received activation of shape ``tensor_shape``. It returns the chunk's output activation (of
  shape ``tensor_shape``), or on the last global chunk that microbatch's scalar loss (its mean over
  the microbatch's tokens).
- ``tensor_shape`` / ``dtype``: the activation exchanged between stages, as the model decides it
  (with sequence parallelism, the SP-sharded shape).

The executor divides each microbatch's loss by ``m`` so that the gradients it accumulates are those
of the mean loss over the global batch (it does not zero them first; data-parallel reduction is the
caller's job). Memory, as Megatron-LM keeps it:

- a chunk's output is sent and then its data freed (Megatron's ``deallocate_output_tensor``,
  ``deallocate_outputs=False`` keeps it): the backward needs only the autograd graph behind it and
  the gradient that arrives for it; the storage goes, an expanded one-element tensor of the same
  shape stays for ``torch.autograd.backward``'s shape check;
- the input and the graph go when the microbatch's backward on the chunk is done; with the split
  backward (``BackwardInput``, then ``BackwardWeight``) the input half runs the autograd backward
  with the linear layers' weight gradients deferred into a ``WeightGradStore``
  (``tensor_parallel/weight_grad.py``: they keep their inputs and output gradients) and the weight
  half runs that store. Activation recomputation happens in the input half, once.

It returns the mean loss (detached, 0-dim) on the rank holding the last chunk and ``None``
elsewhere; ``broadcast_loss=True`` sums it over the pipeline group so every stage returns it.
``forward_only`` runs the forwards without autograd (evaluation; the action list must be
forward-only too). ``trace``, a list, receives one event per computation and per message batch with
wall-clock start and end (``save_trace`` writes a run's events for ``simulate --trace``; on a GPU
these are host times: kernels may still run after an event ends). ``stats``, a ``ScheduleStats``,
receives the peak number of live (microbatch, chunk) activation sets. ``on_action(label)`` is called
before each computation (``F3.0``: forward of microbatch 3 on local chunk 0) and each message batch
(``recvA3.0<-0 sendG2.0->1``), e.g. by the hang watchdog.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..tensor_parallel.weight_grad import WeightGradStore, defer_weight_grads
from . import schedules as S
from .p2p import PipelineLink

if TYPE_CHECKING:
    from ..parallel.state import ParallelState

ForwardStep = Callable[[int, Optional[torch.Tensor], Any], torch.Tensor]


@dataclass
class ScheduleStats:
    """What one ``run_schedule`` call held: the most (microbatch, chunk) activation sets stored at
    once, from their forward until their weight gradients are done (1F1B: at most p on stage 0;
    GPipe: m)."""

    peak_live_activations: int = 0


class _Run:
    """The state of one schedule run on this rank: tensors waiting for a computation or a send."""

    def __init__(self, state: ParallelState, v: int, m: int, forward_only: bool, placement: str,
                 deallocate_outputs: bool):
        self.p, self.rank, self.v, self.m = state.pp_size, state.pp_rank, v, m
        self.forward_only, self.placement = forward_only, placement
        self.deallocate_outputs = deallocate_outputs
        self.received: dict[tuple, torch.Tensor] = {}  # (kind, microbatch, consuming chunk) -> tensor
        self.to_send: dict[tuple, torch.Tensor] = {}  # (kind, microbatch, producing chunk) -> tensor
        self.stored: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self.weights_pending: dict[tuple[int, int], WeightGradStore] = {}
        self.loss_sum: Optional[torch.Tensor] = None
        self.peak = 0

    def global_chunk(self, chunk: int) -> int:
        return S.global_chunk(self.p, self.rank, chunk, self.placement)

    def is_last(self, chunk: int) -> bool:
        return self.global_chunk(chunk) == self.p * self.v - 1

    def is_first(self, chunk: int) -> bool:
        return self.global_chunk(chunk) == 0

    def local_neighbour(self, chunk: int, step: int) -> Optional[int]:
        """The local chunk holding global chunk ``global_chunk(chunk) + step`` if this rank holds
        it (ZB-V's turn at the last rank), else None."""
        rank, local = S.locate(self.p, self.global_chunk(chunk) + step, self.placement)
        return local if rank == self.rank else None

    def hand_over(self, kind: str, microbatch: int, chunk: int, tensor: torch.Tensor) -> None:
        """An output of local ``chunk``: to the neighbouring chunk on this rank, else to its send."""
        neighbour = self.local_neighbour(chunk, 1 if kind == "activation" else -1)
        if neighbour is None:
            self.to_send[(kind, microbatch, chunk)] = tensor
        else:
            self.received[(kind, microbatch, neighbour)] = tensor

    def live(self) -> int:
        return len(self.stored) + len(self.weights_pending)


def _free_data(tensor: torch.Tensor) -> None:
    """Release ``tensor``'s storage, keeping its shape, dtype and autograd graph (Megatron's
    ``deallocate_output_tensor``). A view is left alone: its base would keep the storage anyway."""
    if tensor._base is None:
        tensor.data = torch.empty(1, dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)


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
        run.hand_over("activation", op.microbatch, op.chunk, out.detach())
    if not run.forward_only:
        run.stored[key] = (x, out)
        run.peak = max(run.peak, run.live())


def _backward(run: _Run, op: S.Compute) -> None:
    """``Backward`` or its input half ``BackwardInput``: the autograd backward of (microbatch, chunk)."""
    key = (op.microbatch, op.chunk)
    x, out = run.stored.pop(key)  # the last reference: the graph and the input go with this backward
    grad = None if run.is_last(op.chunk) else run.received.pop(("grad", *key))
    if isinstance(op, S.BackwardInput):
        store = run.weights_pending[key] = WeightGradStore()
        with defer_weight_grads(store):
            torch.autograd.backward(out, grad_tensors=grad)
    else:
        torch.autograd.backward(out, grad_tensors=grad)
    if not run.is_first(op.chunk):
        if x.grad is None:
            raise ValueError(f"chunk {op.chunk}'s output does not depend on its input tensor")
        run.hand_over("grad", op.microbatch, op.chunk, x.grad)


def _backward_weight(run: _Run, op: S.BackwardWeight) -> None:
    run.weights_pending.pop((op.microbatch, op.chunk)).run()


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
    link.exchange(sends, recvs)  # returns once every send is done too
    for msg in batch if run.deallocate_outputs else ():
        if isinstance(msg, S.SendActivation) and (msg.microbatch, msg.chunk) in run.stored:
            _free_data(run.stored[(msg.microbatch, msg.chunk)][1])


_COMPUTE: dict[type, Callable[..., None]] = {
    S.Backward: _backward, S.BackwardInput: _backward, S.BackwardWeight: _backward_weight,
}


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
    placement: str = S.LOOPED,
    deallocate_outputs: bool = True,
) -> Optional[torch.Tensor]:
    """Run ``actions`` on this pipeline rank (see the module docstring for every argument).

    ``state`` is the ``ParallelState``; messages go over ``state.pp_group``. Returns the mean loss
    over the ``m`` microbatches on the rank holding the last chunk (every stage with
    ``broadcast_loss``), else None.
    """
    tensor_shape = tuple(tensor_shape)
    run = _Run(state, len(chunks), len(microbatches), forward_only, placement, deallocate_outputs)
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
                _COMPUTE[type(op)](run, op)
            i += 1
            event = dict(kind=S.EVENT_KIND[type(op)], microbatch=op.microbatch, chunk=op.chunk)
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
    if run.stored or run.received or run.to_send or run.weights_pending:
        raise RuntimeError("the schedule left activations behind: it is not a complete schedule")
    if stats is not None:
        stats.peak_live_activations = run.peak
    return _mean_loss(run, state, broadcast_loss)


def _check_actions(actions: Sequence[S.Action], run: _Run) -> None:
    backward = (S.Backward, S.BackwardInput, S.BackwardWeight, S.SendGrad, S.RecvGrad)
    for a in actions:
        if not (0 <= a.chunk < run.v and 0 <= a.microbatch < run.m):
            raise ValueError(
                f"action {S.describe(a)} does not fit {run.v} chunks and {run.m} microbatches; "
                "build the actions with the same v and m"
            )
        if run.forward_only and isinstance(a, backward):
            raise ValueError("forward_only needs a forward-only schedule (forward_only=True)")
        if isinstance(a, S.COMPUTE):
            continue
        g = run.global_chunk(a.chunk)
        other = g + (1 if isinstance(a, (S.SendActivation, S.RecvGrad)) else -1)
        if not 0 <= other < run.p * run.v or S.locate(run.p, other, run.placement)[0] != a.peer:
            raise ValueError(
                f"action {S.describe(a)} does not fit the {run.placement!r} chunk placement; pass "
                "placement=schedules.placement_of(name) for the schedule that made the actions"
            )


def _mean_loss(run: _Run, state: ParallelState, broadcast: bool) -> Optional[torch.Tensor]:
    loss = run.loss_sum
    if not broadcast or state.pp_size == 1:
        return loss
    # A sum over the pipeline group, zero except on the rank holding the last chunk (which rank
    # that is depends on the placement): every stage gets that rank's value exactly.
    loss = torch.zeros((), device=state.device) if loss is None else loss.float().clone()
    dist.all_reduce(loss, group=state.pp_group)
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
