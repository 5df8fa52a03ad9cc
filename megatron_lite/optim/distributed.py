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

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from .clip import clip_by_norm, counted_once, global_grad_norm
from .grads import GradBuffer, gather_params
from .optimizer import load_adam_moments, make_adamw


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
        names: Optional[Sequence[str]] = None,
    ):
        if not grads.reduce_scatter:
            raise ValueError("the distributed optimizer needs a GradBuffer with reduce_scatter=True")
        self.cfg, self.grads, self.norm_group = cfg, grads, norm_group
        self.overlap_param_gather = overlap_param_gather
        self._gathers: dict[int, object] = {}  # bucket -> in-flight all-gather
        self.model_params = list(params)
        # The model's parameter names: what checkpoints key the optimizer state by.
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.model_params))]
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

    # Checkpoint interface (the same as Optimizer's) -------------------------------------------
    def _full_flat_states(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Adam moments (and fp32 masters for low-precision models) as full flat buffers laid out like
        the gradient buffer, assembled from every DP rank's slices (all-reduce over DP of zero-filled
        buffers); and the step count."""
        n, device = self.grads.data.numel(), self.param_data.device
        fields = ["exp_avg", "exp_avg_sq"] + ([] if self.param_data.dtype == torch.float32 else ["master"])
        flats = {k: torch.zeros(n, dtype=torch.float32, device=device) for k in fields}
        step = torch.zeros(1, device=device)
        for _, piece, grad, _ in self.pieces:
            start = grad.storage_offset() - self.grads.data.storage_offset()
            state = self.inner.state.get(piece, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    flats[k][start : start + piece.numel()] = state[k]
            if "master" in flats:
                flats["master"][start : start + piece.numel()] = piece.detach()
            if "step" in state:
                step = torch.maximum(step, torch.as_tensor(state["step"], dtype=torch.float32, device=device).reshape(1))
        if self.grads.dp_size > 1:
            for t in flats.values():
                dist.all_reduce(t, group=self.grads.dp_group)
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.grads.dp_group)
        return flats, step

    def named_param_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each parameter's full AdamW state (its local TP-shard shape), the same on every DP rank:
        collective over DP. Fields as ``Optimizer.named_param_states``."""
        flats, step = self._full_flat_states()
        out = {}
        for name, p in zip(self.names, self.model_params):
            start, end = self.grads.offsets[p]
            fields = {k: t[start:end].view(p.shape) for k, t in flats.items()}
            if step.item() > 0:
                fields["step"] = step.cpu().reshape(())
            else:
                fields.pop("exp_avg"), fields.pop("exp_avg_sq")
            out[name] = fields
        return out

    def load_named_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Keep this DP rank's slices of every parameter's state, then re-gather the parameters."""
        name_of = dict(zip(self.model_params, self.names))
        moments = {}
        for p, piece, grad, _ in self.pieces:
            fields = states[name_of[p]]
            offset = grad.storage_offset() - self.grads.data.storage_offset() - self.grads.offsets[p][0]

            def mine(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1)[offset : offset + piece.numel()].clone()

            if "master" in fields:
                with torch.no_grad():
                    piece.copy_(mine(fields["master"]))
            moments[piece] = {k: v if k == "step" else mine(v) for k, v in fields.items() if k != "master"}
        load_adam_moments(self.inner, moments)
        with torch.no_grad():
            for (lo, hi), master in zip(self.shards, self.master_slices):
                if master.data_ptr() != self.param_data[lo:hi].data_ptr():
                    self.param_data[lo:hi].copy_(master)
        gather_params(self.grads, self.param_data)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
