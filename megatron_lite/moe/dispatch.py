"""Moving tokens to their experts and back (Lepikhin et al. 2020; Megatron-LM's token dispatchers).

A routed token becomes one *assignment* per chosen expert: (token, expert, weight). Assignments are
kept in expert order (a stable sort, so within an expert in token order); each expert's rows run as
one group of the grouped GEMM (experts.py) and the results come back weighted and summed per token
(``combine``), in the same order every layout, so a token's k contributions add up identically.

Dispatchers, both autograd-transparent (their communication is autograd functions whose backward
is the reverse exchange):

- ``alltoall`` (default): the counts per (source rank, expert) are exchanged first (one small
  all-to-all), then the rows with uneven splits in one ``all_to_all_single``; received rows are
  grouped (source, expert) and sorted to (expert, source) for the GEMM; the combine undoes each step.
- ``allgather``: every EP rank gathers all the EP group's tokens and assignments (equal shapes), runs
  the assignments of its own experts, and the weighted outputs are reduce-scattered back.

FP8 dispatch (``alltoall``, FP8 training): the rows go as FP8 bytes (uint8: gloo has no float8) plus
one fp32 scale per row, exactly the operand the experts' fc1 would quantise (per-token scaling,
fp8/grouped.py), so the experts use it as received; the combine and every backward exchange stay in
the activations' precision.

With expert tensor parallelism (ETP > 1) the rows an EP rank receives are further gathered over the
ETP group (uneven sizes, counts first), the sharded experts produce partial sums, and those are
reduce-scattered back over ETP (Megatron's alltoall dispatcher with expert TP).

Capacity (``capacity_factor``, Megatron's token dropping, per rank before dispatch): each expert keeps
at most ceil(N·k/E · factor) of this rank's N tokens' assignments, the highest-weighted
(``drop_policy=probs``) or the earliest (``position``); ``pad_to_capacity`` fills every expert to
exactly its capacity with zero rows of weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..fp8.grouped import GroupedFP8
from ..fp8.tensor import Float8
from ..parallel.collectives import TPGroup, _autograd_pair, all_gather, reduce_scatter


# Communication -------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: TPGroup) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group.group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows [Σ in_splits, ...] -> [Σ out_splits, ...]: in_splits[j] rows to rank j, out_splits[j]
    from rank j. Backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, group: TPGroup, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    return x if group.size == 1 else _AllToAll.apply(x, group, out_splits, in_splits)


def _gather_v(x: torch.Tensor, group: TPGroup, sizes: list[int]) -> torch.Tensor:
    """Every rank's x [sizes[rank], ...] concatenated in rank order (an all-to-all: sends x to all)."""
    return _all_to_all(x.repeat(group.size, *[1] * (x.ndim - 1)), sizes, [x.shape[0]] * group.size, group)


def _reduce_scatter_v(x: torch.Tensor, group: TPGroup, sizes: list[int]) -> torch.Tensor:
    mine = sizes[group.rank]
    parts = _all_to_all(x, [mine] * group.size, sizes, group)
    return parts.view(group.size, mine, *x.shape[1:]).sum(0)


# Uneven all-gather (every rank's rows, concatenated in rank order; backward: each rank's rows of the
# gradient summed over the group) and its reverse; the second argument is (group, sizes per rank).
_GatherV = _autograd_pair("GatherV", lambda x, gs: _gather_v(x, *gs), lambda d, gs: _reduce_scatter_v(d, *gs))
_ReduceScatterV = _autograd_pair("ReduceScatterV", lambda x, gs: _reduce_scatter_v(x, *gs),
                                 lambda d, gs: _gather_v(d, *gs))
# All-gather along the token dimension (equal shapes) with a reduce-scatter backward, and its reverse.
_GatherEqual = _autograd_pair("GatherTokens", lambda x, g: all_gather(x, 0, g)[0], lambda d, g: reduce_scatter(d, 0, g)[0])
_ReduceScatterEqual = _autograd_pair(
    "ReduceScatterTokens", lambda x, g: reduce_scatter(x, 0, g)[0], lambda d, g: all_gather(d, 0, g)[0]
)


def _counts_exchange(counts: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """counts [group.size, n] (row j: what this rank sends to rank j) -> [group.size, n] (row j: what
    rank j sends to this rank)."""
    if group.size == 1:
        return counts
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group.group)
    return out


def _gather_counts(counts: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """counts [n] of every rank -> [group.size, n]."""
    return counts.unsqueeze(0) if group.size == 1 else all_gather(counts.unsqueeze(0), 0, group)[0]


def _expert_major(counts: torch.Tensor, device) -> torch.Tensor:
    """The permutation taking rows grouped (source, expert) with ``counts`` [sources, experts] to
    expert-major order (sources in order within each expert)."""
    sources, experts = counts.shape
    expert_of_row = torch.arange(experts, device=device).repeat(sources).repeat_interleave(counts.reshape(-1))
    return torch.argsort(expert_of_row, stable=True)


# Assignments ---------------------------------------------------------------------------------------
@dataclass
class Assignments:
    """This rank's routed assignments in expert order: ``token`` [P] (index into the tokens; the
    index N, one past the last token, is a padding row of zeros), ``expert`` [P], ``weight`` [P]
    (autograd-connected to the router); ``dropped``: assignments over capacity, not run."""

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    dropped: int = 0


def assign(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, capacity_factor: Optional[float] = None,
           drop_policy: str = "probs", pad_to_capacity: bool = False) -> Assignments:
    """The assignments of weights, experts [N, k] (router.py), sorted by expert (then token), after
    dropping over capacity (module docstring)."""
    n, k = experts.shape
    token = torch.arange(n, device=experts.device).repeat_interleave(k)
    expert, weight = experts.reshape(-1), weights.reshape(-1)
    dropped = 0
    if capacity_factor is not None:
        capacity = math.ceil(n * k / num_experts * capacity_factor)
        # Priority inside each expert: the weight (descending) or the position (token order).
        priority = -weight.detach() if drop_policy == "probs" else token.to(weight.dtype)
        order = torch.argsort(priority, stable=True)
        order = order[torch.argsort(expert[order], stable=True)]  # by expert, then priority
        counts = torch.bincount(expert, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
        keep = order[rank_in_expert < capacity]
        dropped = order.numel() - keep.numel()
        token, expert, weight = token[keep], expert[keep], weight[keep]
        if pad_to_capacity:
            missing = capacity - torch.bincount(expert, minlength=num_experts)
            pad_expert = torch.arange(num_experts, device=expert.device).repeat_interleave(missing)
            token = torch.cat((token, torch.full_like(pad_expert, n)))
            expert = torch.cat((expert, pad_expert))
            weight = torch.cat((weight, weight.new_zeros(pad_expert.numel())))
    # Canonical order: by expert, then token (the order of the dropless single rank).
    order = torch.argsort(expert * (n + 1) + token, stable=True)
    return Assignments(token[order], expert[order], weight[order], dropped)


def combine_rows(y: torch.Tensor, a: Assignments, num_tokens: int) -> torch.Tensor:
    """Σ over each token's assignments of weight · row: y [P, h] -> [num_tokens, h]."""
    weighted = y * a.weight.to(y.dtype).unsqueeze(-1)
    out = y.new_zeros((num_tokens + 1, y.shape[-1])).index_add(0, a.token, weighted)
    return out[:num_tokens]


# Dispatchers ---------------------------------------------------------------------------------------
class AllToAllDispatcher:
    """dispatch(x [N, h], a) -> (rows [M, h] for this rank's experts in expert order, counts per local
    expert); combine(y [M, h]) -> [N, h]. One dispatch, then its combine (the plan is kept between)."""

    def __init__(self, num_experts: int, ep: TPGroup, etp: TPGroup):
        self.num_experts, self.ep, self.etp = num_experts, ep, etp
        self.local = num_experts // ep.size

    def dispatch(self, x: torch.Tensor, a: Assignments, fp8: Optional[GroupedFP8] = None) -> tuple[torch.Tensor, list[int]]:
        """With ``fp8`` the rows travel as FP8 bytes (uint8) and one fp32 scale per row, quantised as
        the experts' fc1 quantises its input (per token: fp8/grouped.py); ``self.rows_fp8`` is then
        that operand for the experts' call that follows, and the rows returned are its values."""
        self.a, self.num_tokens = a, x.shape[0]
        rows = torch.cat((x, x.new_zeros((1, x.shape[1])))).index_select(0, a.token)  # expert order
        counts = torch.bincount(a.expert, minlength=self.num_experts).view(self.ep.size, self.local)
        received = _counts_exchange(counts, self.ep)  # [source, local expert]
        plan = _Plan(counts.sum(1).tolist(), received.sum(1).tolist(), _expert_major(received, x.device))
        counts = received.sum(0)
        if self.etp.size > 1:  # every ETP rank runs every row of its ETP group, on its slice
            per_source = _gather_counts(counts, self.etp)  # [ETP source, local expert]
            plan.etp_sizes, plan.etp_order = per_source.sum(1).tolist(), _expert_major(per_source, x.device)
            counts = per_source.sum(0)
        self.plan, self.rows_fp8 = plan, None
        if fp8 is None:
            return self._deliver(rows, plan), counts.tolist()
        q = fp8.tokens(rows)
        self.rows_fp8 = Float8(self._deliver(q.data.view(torch.uint8), plan).view(q.data.dtype),
                               self._deliver(q.inv_scale, plan), "rowwise")
        values = self.rows_fp8.dequantize().to(rows.dtype)
        return _Delivered.apply(rows, values, lambda grad: self._return(grad, plan)), counts.tolist()

    def _deliver(self, rows: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """Rows in (destination, expert) order -> this rank's rows in expert-major order (ETP: the
        ETP group's rows)."""
        rows = all_to_all(rows, self.ep, plan.recv_splits, plan.send_splits)
        rows = rows.index_select(0, plan.order)  # rows arrive grouped (source, expert)
        if plan.etp_order is not None:
            rows = _GatherV.apply(rows, (self.etp, plan.etp_sizes)).index_select(0, plan.etp_order)
        return rows

    def _return(self, y: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """``_deliver`` reversed (ETP partial sums reduced): expert-major rows -> (destination,
        expert) order on the rank that sent them."""
        if plan.etp_order is not None:  # back to (ETP source, expert), partial sums reduced
            y = _ReduceScatterV.apply(y.index_select(0, torch.argsort(plan.etp_order)), (self.etp, plan.etp_sizes))
        y = y.index_select(0, torch.argsort(plan.order))  # back to (source, expert)
        return all_to_all(y, self.ep, plan.send_splits, plan.recv_splits)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        return combine_rows(self._return(y, self.plan), self.a, self.num_tokens)


@dataclass
class _Plan:
    """One dispatch's exchange: rows sent to / received from each EP rank, the permutation to expert-
    major order, and under ETP the rows per ETP rank and that group's expert-major permutation."""

    send_splits: list[int]
    recv_splits: list[int]
    order: torch.Tensor
    etp_sizes: Optional[list[int]] = None
    etp_order: Optional[torch.Tensor] = None


class _Delivered(torch.autograd.Function):
    """The rows an FP8 dispatch delivered (``values``, sent as FP8), attached to the autograd graph of
    the rows that were sent (``sent``): backward, the gradient goes back by ``back`` (the combine's
    high-precision exchange)."""

    @staticmethod
    def forward(ctx, sent, values, back):
        ctx.back = back
        return values

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad), None, None


class AllGatherDispatcher:
    """The same interface; every EP rank sees all tokens of its EP group and runs those assigned to
    its experts (ETP ranks too: then the expert outputs are partial sums, reduced by the scatter)."""

    def __init__(self, num_experts: int, ep: TPGroup, etp: TPGroup):
        self.num_experts, self.ep, self.etp = num_experts, ep, etp
        self.local = num_experts // ep.size
        # The tokens cross the ETP × EP group: gather over each in turn.
        self.groups = [g for g in (ep, etp) if g.size > 1]

    def dispatch(self, x: torch.Tensor, a: Assignments, fp8: Optional[GroupedFP8] = None) -> tuple[torch.Tensor, list[int]]:
        """``fp8`` is ignored: the tokens are gathered in high precision (the experts quantise them)."""
        self.rows_fp8 = None
        n = x.shape[0]
        token, expert, weight = a.token, a.expert, a.weight
        for g in self.groups:
            x = _GatherEqual.apply(x, g)
            sizes = _gather_counts(torch.tensor([token.numel()], device=x.device), g).view(-1).tolist()
            # Token indices shift by each source's offset; a padding row (index n) maps to the end.
            src = torch.arange(g.size, device=x.device).repeat_interleave(torch.tensor(sizes, device=x.device))
            gathered = _gather_v(torch.stack((token, expert), 1), g, sizes)
            is_pad = gathered[:, 0] == n
            token = torch.where(is_pad, g.size * n, gathered[:, 0] + src * n)
            expert, weight = gathered[:, 1], _GatherV.apply(weight, (g, sizes))
            n *= g.size
        mine = (expert // self.local) == self.ep.rank
        order = torch.argsort(torch.where(mine, expert * (n + 1) + token, torch.iinfo(torch.int64).max), stable=True)
        order = order[: int(mine.sum())]
        self.a = Assignments(token[order], expert[order], weight[order])
        self.num_tokens = n
        rows = torch.cat((x, x.new_zeros((1, x.shape[1])))).index_select(0, self.a.token)
        counts = torch.bincount(self.a.expert - self.ep.rank * self.local, minlength=self.local).tolist()
        return rows, counts

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        out = combine_rows(y, self.a, self.num_tokens)
        for g in reversed(self.groups):
            out = _ReduceScatterEqual.apply(out, g)
        return out


DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
