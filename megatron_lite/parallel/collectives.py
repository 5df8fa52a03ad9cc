"""Tensor-parallel communication as autograd functions (Shoeybi et al. 2019; Korthikanti et al. 2022).

Megatron's two operators f and g, and the sequence-parallel pair that replaces them:

    copy_to_tp        f: identity forward,           all-reduce backward
    reduce_from_tp    g: all-reduce forward,         identity backward
    scatter_to_tp        split last dim forward,      all-gather backward
    gather_from_tp       all-gather last dim forward, split backward
    gather_from_sp       all-gather sequence forward, reduce-scatter backward
    reduce_scatter_to_sp reduce-scatter sequence forward, all-gather backward
    scatter_to_sp        split sequence forward,      all-gather backward

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


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if x.shape[dim] % tp.size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {tp.size} TP ranks")
    return x.chunk(tp.size, dim=dim)[tp.rank].contiguous()


def _all_gather(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((tp.size * front.shape[0], *front.shape[1:]))
    all_gather_flat(out, front, group=tp.group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if x.shape[dim] % tp.size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {tp.size} TP ranks")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // tp.size, *front.shape[1:]))
    reduce_scatter_flat(out, front, group=tp.group)
    return out.movedim(0, dim)


def _autograd_pair(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function computing ``forward(x, tp)`` whose backward is ``backward(grad, tp)``."""

    def fwd(ctx, x, tp):
        ctx.tp = tp
        return forward(x, tp)

    def bwd(ctx, grad):
        return backward(grad, ctx.tp), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# (forward, backward) of each operator; the lambdas look the collectives up at call time.
_CopyToTP = _autograd_pair("CopyToTP", lambda x, tp: x, lambda g, tp: _all_reduce(g, tp))
_ReduceFromTP = _autograd_pair("ReduceFromTP", lambda x, tp: _all_reduce(x, tp), lambda g, tp: g)
_ScatterToTP = _autograd_pair("ScatterToTP", lambda x, tp: _split(x, -1, tp), lambda g, tp: _all_gather(g, -1, tp))
_GatherFromTP = _autograd_pair("GatherFromTP", lambda x, tp: _all_gather(x, -1, tp), lambda g, tp: _split(g, -1, tp))
_GatherFromSP = _autograd_pair(
    "GatherFromSP", lambda x, tp: _all_gather(x, SEQ_DIM, tp), lambda g, tp: _reduce_scatter(g, SEQ_DIM, tp)
)
_ReduceScatterToSP = _autograd_pair(
    "ReduceScatterToSP", lambda x, tp: _reduce_scatter(x, SEQ_DIM, tp), lambda g, tp: _all_gather(g, SEQ_DIM, tp)
)
_ScatterToSP = _autograd_pair(
    "ScatterToSP", lambda x, tp: _split(x, SEQ_DIM, tp), lambda g, tp: _all_gather(g, SEQ_DIM, tp)
)


def copy_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, gradient all-reduced backward."""
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Leave a TP region by summing the partial results of all TP ranks (all-reduce forward)."""
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def scatter_to_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; backward all-gathers it."""
    return x if tp.size == 1 else _ScatterToTP.apply(x, tp)


def gather_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension; backward keeps this rank's slice."""
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp)


def gather_from_sp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[b, s/t, h] -> [b, s, h] by all-gather along the sequence; backward reduce-scatters."""
    return x if tp.size == 1 else _GatherFromSP.apply(x, tp)


def reduce_scatter_to_sp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/t, h] reduced shard; backward all-gathers."""
    return x if tp.size == 1 else _ReduceScatterToSP.apply(x, tp)


def scatter_to_sp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[b, s, h] replicated -> [b, s/t, h] this rank's shard; backward all-gathers."""
    return x if tp.size == 1 else _ScatterToSP.apply(x, tp)
