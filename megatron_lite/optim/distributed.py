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

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from .clip import clip_by_norm, counted_once, global_grad_norm
from .grads import GradBuffer, gather_params
from .optimizer import make_adamw


class DistributedOptimizer:
    """AdamW over this DP rank's slice of every gradient bucket (see module docstring).

    ``norm_group`` must span TP × PP × DP (None: the whole world), since each rank holds a distinct
    slice of the gradients. With ``overlap_param_gather`` the all-gather of the updated parameters
    runs in the background after ``step``; ``wait_for(params)`` (called by forward pre-hooks, see
    ``install_param_gather_hooks``) blocks only on the buckets those parameters live in.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        grads: GradBuffer,
        cfg: OptimizerConfig,
        norm_group: Optional[dist.ProcessGroup] = None,
        tp_rank: int = 0,
        overlap_param_gather: bool = False,
    ):
        if not grads.reduce_scatter:
            raise ValueError("the distributed optimizer needs a GradBuffer with reduce_scatter=True")
        self.cfg, self.grads, self.norm_group = cfg, grads, norm_group
        self.overlap_param_gather = overlap_param_gather
        self._gathers: dict[int, object] = {}  # bucket -> in-flight all-gather
        self.model_params = list(params)
        dtype = self.model_params[0].dtype
        self.param_data = torch.zeros(grads.data.numel(), dtype=dtype, device=grads.data.device)
        with torch.no_grad():
            for p in self.model_params:
                start, end = grads.offsets[p]
                self.param_data[start:end].copy_(p.detach().reshape(-1))
                p.data = self.param_data[start:end].view(p.shape)

        # This rank's slices; fp32 models update param_data in place, others keep an fp32 master copy.
        self.shards = grads.shard_ranges()
        self.master_slices = [
            self.param_data[lo:hi] if dtype == torch.float32 else self.param_data[lo:hi].float()
            for lo, hi in self.shards
        ]
        self.pieces: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, bool]] = []
        for p in self.model_params:
            start, end = grads.offsets[p]
            for (lo, hi), master in zip(self.shards, self.master_slices):
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    piece = nn.Parameter(master[a - lo : b - lo], requires_grad=False)
                    self.pieces.append((p, piece, grads.data[a:b], counted_once(p, tp_rank)))
        decay = [piece for p, piece, _, _ in self.pieces if p.ndim >= 2]
        no_decay = [piece for p, piece, _, _ in self.pieces if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner = make_adamw([g for g in groups if g["params"]], cfg, self.param_data.device)

    def step(self, lr: float) -> float:
        """Clip and update this rank's slices, then all-gather; returns the global grad norm."""
        for _, piece, grad, _ in self.pieces:
            piece.grad = grad
        norm = global_grad_norm([g for _, _, g, counted in self.pieces if counted], self.norm_group)
        clip_by_norm([g for _, _, g, _ in self.pieces], norm, self.cfg.clip_grad)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        with torch.no_grad():
            for (lo, hi), master in zip(self.shards, self.master_slices):
                if master.data_ptr() != self.param_data[lo:hi].data_ptr():
                    self.param_data[lo:hi].copy_(master)
        for _, piece, _, _ in self.pieces:
            piece.grad = None
        if self.overlap_param_gather:
            self._gathers = gather_params(self.grads, self.param_data, async_op=True)
        else:
            gather_params(self.grads, self.param_data)
        return norm

    def wait_for(self, params) -> None:
        """Block until the all-gathers of the buckets holding ``params`` are done."""
        for p in params:
            work = self._gathers.pop(self.grads.bucket_of.get(p, -1), None)
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

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
