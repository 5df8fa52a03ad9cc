"""AdamW with fp32 master weights, reading the fp32 ``main_grad`` of each parameter.

fp32 training: the model's parameters are the master weights. bf16/fp16: the model holds
low-precision parameters, the optimizer an fp32 copy of each; after every step the copy is written
back. Biases and norm weights (every parameter with fewer than 2 dimensions) get no weight decay.
torch's fused (GPU) or foreach (CPU) AdamW is used; apex's FusedAdam when installed, on GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from .clip import clip_by_norm, counted_once, global_grad_norm


def make_adamw(groups: list[dict], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``groups``: apex FusedAdam or torch's fused kernel on GPU, foreach on CPU."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def load_adam_moments(inner: torch.optim.Optimizer, fields_by_param: dict[nn.Parameter, dict]) -> None:
    """Set ``inner``'s AdamW state (``step``, ``exp_avg``, ``exp_avg_sq`` where present) per parameter,
    through ``load_state_dict`` so torch casts each field to its device/dtype policy."""
    index = {id(m): i for i, m in enumerate(m for g in inner.param_groups for m in g["params"])}
    packed = inner.state_dict()
    packed["state"] = {}
    for param, fields in fields_by_param.items():
        moments = {k: fields[k] for k in ("step", "exp_avg", "exp_avg_sq") if k in fields}
        if moments:
            packed["state"][index[id(param)]] = moments
    inner.load_state_dict(packed)


class Optimizer:
    """One optimizer step over this rank's parameters: global-norm clipping, then AdamW.

    ``params`` must have ``main_grad`` (see GradBuffer), already reduced over every group.
    ``norm_group`` is the group the gradient norm is summed over (TP × PP: the model-parallel group).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        cfg: OptimizerConfig,
        norm_group: Optional[dist.ProcessGroup],
        tp_rank: int = 0,
        names: Optional[Sequence[str]] = None,
    ):
        self.cfg, self.norm_group = cfg, norm_group
        self.model_params = list(params)
        # Names of the parameters (the model's, global layer indices): what checkpoints key state by.
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.model_params))]
        self.master_params = [
            p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()) for p in self.model_params
        ]
        self.counted = [counted_once(p, tp_rank) for p in self.model_params]
        decay = [m for m in self.master_params if m.ndim >= 2]
        no_decay = [m for m in self.master_params if m.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.inner = make_adamw([g for g in groups if g["params"]], cfg, self.model_params[0].device)

    def step(self, lr: float) -> float:
        """Clip and update; returns the global gradient norm before clipping."""
        for master, p in zip(self.master_params, self.model_params):
            master.grad = p.main_grad
        grads = [m.grad for m in self.master_params]
        norm = global_grad_norm([g for g, c in zip(grads, self.counted) if c], self.norm_group)
        clip_by_norm(grads, norm, self.cfg.clip_grad)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        with torch.no_grad():
            for master, p in zip(self.master_params, self.model_params):
                if master is not p:
                    p.copy_(master)
                master.grad = None
        return norm

    def named_param_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each parameter's AdamW state by parameter name, in that parameter's local (TP-shard) shape,
        the same on every DP rank: ``exp_avg``, ``exp_avg_sq`` (fp32), ``step`` (0-d fp32) and, when
        the model is not fp32, the fp32 ``master`` weights. Live tensors, not copies; a parameter
        that has not been stepped yet has no moments."""
        out = {}
        for name, master, p in zip(self.names, self.master_params, self.model_params):
            state = self.inner.state.get(master, {})
            fields = {k: state[k] for k in ("exp_avg", "exp_avg_sq") if k in state}
            if "step" in state:
                fields["step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().reshape(())
            if master is not p:
                fields["master"] = master.detach()
            out[name] = fields
        return out

    def load_named_param_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of ``named_param_states`` (every name of this optimizer must be present)."""
        moments = {}
        for name, master in zip(self.names, self.master_params):
            fields = states[name]
            if "master" in fields:
                with torch.no_grad():
                    master.copy_(fields["master"])
            moments[master] = fields
        load_adam_moments(self.inner, moments)
        with torch.no_grad():
            for master, p in zip(self.master_params, self.model_params):
                if master is not p:
                    p.copy_(master)

    def finish_param_gather(self) -> None:
        """Nothing to wait for: every rank updates its own full parameters."""

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
