"""Tensor-parallel communication (Shoeybi et al. 2019; Korthikanti et al. 2022).

Three collectives over the TP group, each synchronous or asynchronous (``async_op=True`` returns the
work to wait on, so a caller can overlap it with a GEMM), and Megatron's region operators built on
them as autograd functions:

    reduce_from_tp       g: all-reduce forward,            identity backward
    reduce_scatter_to_sp    reduce-scatter sequence forward, all-gather backward
    scatter_to_sp           split sequence forward,          all-gather backward
    sum_over_tp             all-reduce forward,              all-reduce backward

Megatron's f (identity forward, all-reduce backward) and the sequence-parallel all-gather before a
column-parallel GEMM live inside the linear layer's own autograd function (tensor_parallel/layers.py),
which overlaps them with its GEMMs.

Every function takes a ``TPGroup``; with size 1 each is the identity and touches no process group,
so a single-process model needs no torch.distributed at all. Activations are [batch, seq, hidden];
the sequence dimension is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

SEQ_DIM = 1

# torch 2.13 renamed the flat-tensor collectives; the old names remain for torch < 2.13.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group as the layers see it: the process group, its size, this rank's index,
    and whether sequence parallelism is on."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @classmethod
    def from_state(cls, state, sequence_parallel: bool = False) -> "TPGroup":
        """The TP group of a ``ParallelState``; SP only takes effect with TP > 1."""
        return cls(state.tp_group, state.tp_size, state.tp_rank, sequence_parallel and state.tp_size > 1)


Work = Optional[dist.Work]


def all_reduce(x: torch.Tensor, tp: TPGroup, op=dist.ReduceOp.SUM, async_op: bool = False) -> tuple[torch.Tensor, Work]:
    """Reduce ``x`` over the TP group (in place when contiguous); returns (x, work or None)."""
    if tp.size == 1:
        return x, None
    x = x.contiguous()
    return x, dist.all_reduce(x, op=op, group=tp.group, async_op=async_op)


def all_gather(x: torch.Tensor, dim: int, tp: TPGroup, async_op: bool = False) -> tuple[torch.Tensor, Work]:
    """Concatenate every rank's ``x`` along ``dim``; returns (gathered, work or None)."""
    if tp.size == 1:
        return x, None
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((tp.size * front.shape[0], *front.shape[1:]))
    work = all_gather_flat(out, front, group=tp.group, async_op=async_op)
    return out.movedim(0, dim), work


def reduce_scatter(x: torch.Tensor, dim: int, tp: TPGroup, async_op: bool = False) -> tuple[torch.Tensor, Work]:
    """Sum ``x`` over the TP group and keep this rank's slice along ``dim``; (slice, work or None)."""
    if tp.size == 1:
        return x, None
    _check_divisible(x, dim, tp)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // tp.size, *front.shape[1:]))
    work = reduce_scatter_flat(out, front, group=tp.group, async_op=async_op)
    return out.movedim(0, dim), work


def _check_divisible(x: torch.Tensor, dim: int, tp: TPGroup) -> None:
    if x.shape[dim] % tp.size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {tp.size} TP ranks")


def _split(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    _check_divisible(x, dim, tp)
    return x.chunk(tp.size, dim=dim)[tp.rank].contiguous()


def _autograd_pair(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function computing ``forward(x, tp)`` whose backward is ``backward(grad, tp)``."""

    def fwd(ctx, x, tp):
        ctx.tp = tp
        return forward(x, tp)

    def bwd(ctx, grad):
        return backward(grad, ctx.tp), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# (forward, backward) of each operator; the lambdas look the collectives up at call time.
_ReduceFromTP = _autograd_pair("ReduceFromTP", lambda x, tp: all_reduce(x, tp)[0], lambda g, tp: g)
_ReduceScatterToSP = _autograd_pair(
    "ReduceScatterToSP", lambda x, tp: reduce_scatter(x, SEQ_DIM, tp)[0], lambda g, tp: all_gather(g, SEQ_DIM, tp)[0]
)
_ScatterToSP = _autograd_pair(
    "ScatterToSP", lambda x, tp: _split(x, SEQ_DIM, tp), lambda g, tp: all_gather(g, SEQ_DIM, tp)[0]
)
_SumOverTP = _autograd_pair(
    "SumOverTP", lambda x, tp: all_reduce(x.clone(), tp)[0], lambda g, tp: all_reduce(g.clone(), tp)[0]
)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Leave a TP region by summing the partial results of all TP ranks (all-reduce forward)."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def reduce_scatter_to_sp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/t, h] reduced shard; backward all-gathers."""
    return x if tp.size == 1 else _ReduceScatterToSP.apply(x, tp)


def scatter_to_sp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[b, s, h] replicated -> [b, s/t, h] this rank's shard; backward all-gathers."""
    return x if tp.size == 1 else _ScatterToSP.apply(x, tp)


def sum_over_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The sum of every TP rank's ``x``, which each rank then uses on its own shard (a statistic over a
    dimension split over TP, e.g. RMSNorm over a column-parallel projection): all-reduce forward, and
    all-reduce backward, since every rank's result depends on every rank's ``x``."""
    return x if tp.size == 1 else _SumOverTP.apply(x, tp)
