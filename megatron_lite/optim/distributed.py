"""The distributed optimizer (ZeRO stage 1, as in Megatron-LM): each DP rank owns 1/d of the fp32
master weights and Adam states.

The model's parameters become views into one flat ``param_data`` buffer laid out exactly like the
``GradBuffer``. After the gradients are reduce-scattered over DP, DP rank r updates the r-th slice of
every bucket — the "pieces" of the parameters that fall in it — and the updated slices are
all-gathered so every rank holds every parameter again.

Bytes per parameter on each rank (Megatron's table; d = DP size):
  fp32 model:  4 (param) + 4 (fp32 grad) + 8/d (Adam exp_avg, exp_avg_sq; the param slice is the master)
  bf16 model:  2 (param) + 4 (fp32 grad) + 12/d (fp32 master, exp_avg, exp_avg_sq)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from .clip import NormRanks, counted_once
from .grads import GradBuffer, gather_params
from .optimizer import AdamWBase, ParamState, adam_fields, load_adam_moments


class Piece(NamedTuple):
    """The part of one parameter inside this rank's slice of its bucket (at most one per parameter,
    since buckets hold whole parameters)."""

    param: nn.Parameter  # the model's parameter
    name: str
    start: int  # [start, end) of the flattened parameter
    end: int
    master: nn.Parameter  # fp32, what AdamW updates (a view of param_data for fp32 models)
    grad: torch.Tensor  # its slice of the reduced gradient buffer
    counted: bool  # enters the gradient norm (counted_once)


class _Sharded(NamedTuple):
    """One GradBuffer's parameters as this rank's slices: ``param_data`` (the parameters' storage,
    laid out like the buffer), ``shards`` ([lo, hi) of every bucket) and their fp32 masters."""

    grads: GradBuffer
    param_data: torch.Tensor
    shards: list[tuple[int, int]]
    master_slices: list[torch.Tensor]


class DistributedOptimizer(AdamWBase):
    """AdamW over this DP rank's slice of every gradient bucket (see module docstring).

    ``grads``: one GradBuffer, or several (an MoE model's dense and expert buffers, each sharded over
    its own group: DP × CP and expert-DP). ``norm_group`` must span TP × PP × DP (None: the whole
    world), since each rank holds a distinct slice of the gradients. With ``overlap_param_gather``
    the all-gather of the updated parameters runs in the background after ``step``;
    ``wait_for(params)`` (called by forward pre-hooks, see ``install_param_gather_hooks``) blocks only
    on the buckets those parameters live in.

    Checkpoints (the named-state protocol of optimizer.py) get each parameter's piece in this rank's
    slices: every DP rank saves the state it owns, nothing is gathered.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        grads: GradBuffer | Sequence[GradBuffer],
        cfg: OptimizerConfig,
        norm_group: Optional[dist.ProcessGroup] = None,
        tp_rank: int | NormRanks = 0,
        overlap_param_gather: bool = False,
        names: Optional[Sequence[str]] = None,
    ):
        buffers = [grads] if isinstance(grads, GradBuffer) else list(grads)
        if not all(b.reduce_scatter for b in buffers):
            raise ValueError("the distributed optimizer needs a GradBuffer with reduce_scatter=True")
        super().__init__(cfg, norm_group)
        self.overlap_param_gather = overlap_param_gather
        self._gathers: dict[tuple[int, int], object] = {}  # (buffer, bucket) -> in-flight all-gather
        self.model_params = list(params)
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.model_params))]
        dtype = self.model_params[0].dtype
        self.low_precision = dtype != torch.float32
        self.sharded: list[_Sharded] = []
        self.pieces: list[Piece] = []
        for b in buffers:
            param_data = torch.zeros(b.data.numel(), dtype=dtype, device=b.data.device)
            with torch.no_grad():
                for p in b.params:
                    start, end = b.offsets[p]
                    param_data[start:end].copy_(p.detach().reshape(-1))
                    p.data = param_data[start:end].view(p.shape)
            # This rank's slices; fp32 models update param_data in place, others keep an fp32 master copy.
            shards = b.shard_ranges()
            masters = [param_data[lo:hi] if dtype == torch.float32 else param_data[lo:hi].float() for lo, hi in shards]
            self.sharded.append(_Sharded(b, param_data, shards, masters))
        for name, p in zip(self.names, self.model_params):
            grads_of_p, sharded = next((s.grads, s) for s in self.sharded if p in s.grads.offsets)
            start, end = grads_of_p.offsets[p]
            for (lo, hi), master in zip(sharded.shards, sharded.master_slices):
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    piece = nn.Parameter(master[a - lo : b - lo], requires_grad=False)
                    self.pieces.append(Piece(p, name, a - start, b - start, piece, grads_of_p.data[a:b],
                                             counted_once(p, tp_rank)))
        self.master_slices = [m for s in self.sharded for m in s.master_slices]
        self._build([(x.master, x.param.ndim >= 2) for x in self.pieces], buffers[0].data.device)

    def step(self, lr: float) -> float:
        """Clip and update this rank's slices, then all-gather; returns the global grad norm (not
        finite: the step was skipped on every rank, nothing is gathered)."""
        for x in self.pieces:
            x.master.grad = x.grad
        norm = self._update([x.grad for x in self.pieces], [x.counted for x in self.pieces], lr)
        for x in self.pieces:
            x.master.grad = None
        if not math.isfinite(norm):
            return norm
        self._masters_to_params()
        self._gather(self.overlap_param_gather)
        return norm

    def _gather(self, async_op: bool) -> None:
        for i, s in enumerate(self.sharded):
            works = gather_params(s.grads, s.param_data, async_op=async_op)
            self._gathers.update({(i, bucket): work for bucket, work in works.items()})

    def _masters_to_params(self) -> None:
        with torch.no_grad():
            for s in self.sharded:
                for (lo, hi), master in zip(s.shards, s.master_slices):
                    if master.data_ptr() != s.param_data[lo:hi].data_ptr():
                        s.param_data[lo:hi].copy_(master)

    def wait_for(self, params) -> None:
        """Block until the all-gathers of the buckets holding ``params`` are done."""
        for p in params:
            for i, s in enumerate(self.sharded):
                work = self._gathers.pop((i, s.grads.bucket_of.get(p, -1)), None)
                if work is not None:
                    work.wait()

    def finish_param_gather(self) -> None:
        """Block until every parameter is up to date (before reading them outside a forward)."""
        for work in self._gathers.values():
            work.wait()
        self._gathers.clear()

    def install_param_gather_hooks(self, modules) -> None:
        """Forward pre-hooks on every module that owns parameters: wait for just their buckets."""
        for root in modules:
            for module in root.modules():
                own = list(module.parameters(recurse=False))
                if own:
                    module.register_forward_pre_hook(lambda _m, _args, own=own: self.wait_for(own))

    # Named-state protocol (optimizer.py): this rank's pieces only -------------------------------
    def state_ranges(self) -> dict[str, tuple[int, int]]:
        return {x.name: (x.start, x.end) for x in self.pieces}

    def named_param_states(self) -> dict[str, ParamState]:
        out = {}
        for x in self.pieces:
            fields = adam_fields(self.inner, x.master)
            if self.low_precision:
                fields["master"] = x.master.detach()
            out[x.name] = ParamState(x.start, x.end, fields)
        return out

    def load_named_param_states(self, states: dict[str, ParamState]) -> None:
        """Keep this rank's pieces; masters not in ``states`` come from the (loaded) parameters. Then
        re-gather the parameters."""
        moments = {}
        with torch.no_grad():
            for x in self.pieces:
                fields = states[x.name].fields if x.name in states else {}
                loaded = x.param.detach().reshape(-1)[x.start : x.end]
                x.master.copy_(fields["master"] if "master" in fields else loaded)
                moments[x.master] = fields
        load_adam_moments(self.inner, moments)
        self._masters_to_params()
        self._gather(async_op=False)
