"""AdamW with fp32 master weights, reading the fp32 ``main_grad`` of each parameter.

fp32 training: the model's parameters are the master weights. bf16/fp16: the model holds
low-precision parameters, the optimizer an fp32 copy of each; after every step the copy is written
back. Biases and norm weights (every parameter with fewer than 2 dimensions) get no weight decay.
torch's AdamW everywhere, its fused kernel on GPU and CPU (one state format, see ``adamw_options``).

``AdamWBase`` is what the plain ``Optimizer`` (below) and the ``DistributedOptimizer`` share: the
two parameter groups, the learning rate set each step, clipping by the global norm. Checkpoints see
either through the named-state protocol (``NamedStateOptimizer``): each parameter's state by
parameter name, as the elements of the flattened local parameter this rank holds (``ParamState``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import OptimizerConfig
from .clip import clip_by_norm, counted_once, global_grad_norm

ADAM_FIELDS = ("step", "exp_avg", "exp_avg_sq")


# Where torch.optim.AdamW has a fused kernel (one pass over parameter, gradient and both moments).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw_options(cfg: OptimizerConfig, device_type: str) -> dict:
    """torch.optim.AdamW's keyword arguments on ``device_type``: the fused kernel on GPU (as fast as
    apex's FusedAdam, and unlike it keeping ``step`` per parameter) and on CPU (4–7× faster than
    foreach, which makes six passes over memory; docs/performance.md); foreach elsewhere. All keep
    the same state (a checkpoint of one loads into the other); their updates differ by rounding."""
    kernel = {"fused": True} if device_type in FUSED_ADAMW_DEVICES else {"foreach": True}
    return dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)


def make_adamw(groups: list[dict], cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW over ``groups`` with ``adamw_options`` for ``device``."""
    return torch.optim.AdamW(groups, **adamw_options(cfg, device.type))


def load_adam_moments(inner: torch.optim.Optimizer, fields_by_param: dict[nn.Parameter, dict]) -> None:
    """Set ``inner``'s AdamW state (``step``, ``exp_avg``, ``exp_avg_sq`` where present) per parameter,
    through ``load_state_dict`` so torch casts each field to its device/dtype policy."""
    index = {id(m): i for i, m in enumerate(m for g in inner.param_groups for m in g["params"])}
    packed = inner.state_dict()
    packed["state"] = {}
    for param, fields in fields_by_param.items():
        moments = {k: fields[k] for k in ADAM_FIELDS if k in fields}
        if moments:
            packed["state"][index[id(param)]] = moments
    inner.load_state_dict(packed)


@dataclass
class ParamState:
    """This rank's optimizer state of one parameter: elements [start, end) of the parameter's
    flattened local (TP-shard) tensor. ``fields``: ``exp_avg``, ``exp_avg_sq`` (fp32) and, when the
    model is not fp32, ``master`` (the fp32 weights), each 1-D of end − start elements; ``step``
    (0-d fp32). A parameter that has not been stepped has no moments."""

    start: int
    end: int
    fields: dict[str, torch.Tensor] = field(default_factory=dict)


class NamedStateOptimizer(Protocol):
    """What a checkpoint needs from an optimizer."""

    def state_ranges(self) -> dict[str, tuple[int, int]]:
        """{parameter name: [start, end) of its flattened local tensor whose state this rank holds}."""

    def named_param_states(self) -> dict[str, ParamState]:
        """This rank's state of every parameter in ``state_ranges`` (live tensors, not copies)."""

    def load_named_param_states(self, states: dict[str, ParamState]) -> None:
        """Take ``states`` (shaped as ``named_param_states``; fields may be missing). Master weights
        the states do not hold are rebuilt from the model's (just loaded) parameters."""

    def finish_param_gather(self) -> None:
        """Block until every model parameter holds its updated value."""


def adam_fields(inner: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """``param``'s AdamW moments (flattened views) and step (0-d fp32 on CPU), where they exist."""
    state = inner.state.get(param, {})
    fields = {k: state[k].reshape(-1) for k in ("exp_avg", "exp_avg_sq") if k in state}
    if "step" in state:
        fields["step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().reshape(())
    return fields


class AdamWBase:
    """AdamW over fp32 ``masters`` in two groups (weight decay for tensors of matrices, none for
    biases and norm weights), clipped by the global norm over ``norm_group``.

    Subclasses say which masters there are (``_build``) and implement ``step`` with ``_update``.
    """

    def __init__(self, cfg: OptimizerConfig, norm_group: Optional[dist.ProcessGroup]):
        self.cfg, self.norm_group = cfg, norm_group

    def _build(self, masters: list[tuple[nn.Parameter, bool]], device: torch.device) -> None:
        """``masters``: (fp32 tensor the optimizer updates, whether it decays)."""
        groups = [
            {"params": [m for m, decays in masters if decays], "weight_decay": self.cfg.weight_decay},
            {"params": [m for m, decays in masters if not decays], "weight_decay": 0.0},
        ]
        self.inner = make_adamw([g for g in groups if g["params"]], self.cfg, device)

    def _update(self, grads: list[torch.Tensor], counted: list[bool], lr: float) -> float:
        """Clip ``grads`` (the masters' ``.grad``; ``counted``: which enter the norm) and run AdamW
        with ``lr``; returns the global gradient norm before clipping. A non-finite norm (some
        gradient on some rank holds an inf or NaN) updates nothing, on every rank."""
        norm = global_grad_norm([g for g, c in zip(grads, counted) if c], self.norm_group,
                                uncounted=[g for g, c in zip(grads, counted) if not c])
        if not math.isfinite(norm):
            return norm
        clip_by_norm(grads, norm, self.cfg.clip_grad)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        return norm

    def finish_param_gather(self) -> None:
        """Nothing to wait for unless a subclass gathers parameters in the background."""


class Optimizer(AdamWBase):
    """One optimizer step over this rank's parameters: global-norm clipping, then AdamW.

    ``params`` must have ``main_grad`` (see GradBuffer), already reduced over every group.
    ``norm_group`` is the group the gradient norm is summed over (TP × PP: the model-parallel group).
    ``names``: the parameters' names (the model's, global layer indices), what checkpoints key
    state by.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        cfg: OptimizerConfig,
        norm_group: Optional[dist.ProcessGroup],
        tp_rank: int = 0,
        names: Optional[Sequence[str]] = None,
    ):
        super().__init__(cfg, norm_group)
        self.model_params = list(params)
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.model_params))]
        self.master_params = [
            p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()) for p in self.model_params
        ]
        self.counted = [counted_once(p, tp_rank) for p in self.model_params]
        masters = [(m, p.ndim >= 2) for m, p in zip(self.master_params, self.model_params)]
        self._build(masters, self.model_params[0].device)

    def step(self, lr: float) -> float:
        """Clip and update; returns the global gradient norm before clipping (not finite: the step
        was skipped on every rank)."""
        for master, p in zip(self.master_params, self.model_params):
            master.grad = p.main_grad
        norm = self._update([m.grad for m in self.master_params], self.counted, lr)
        with torch.no_grad():
            for master, p in zip(self.master_params, self.model_params):
                if master is not p and math.isfinite(norm):
                    p.copy_(master)
                master.grad = None
        return norm

    # Named-state protocol ----------------------------------------------------------------------
    def state_ranges(self) -> dict[str, tuple[int, int]]:
        return {name: (0, p.numel()) for name, p in zip(self.names, self.model_params)}

    def named_param_states(self) -> dict[str, ParamState]:
        out = {}
        for name, master, p in zip(self.names, self.master_params, self.model_params):
            fields = adam_fields(self.inner, master)
            if master is not p:
                fields["master"] = master.detach().reshape(-1)
            out[name] = ParamState(0, p.numel(), fields)
        return out

    def load_named_param_states(self, states: dict[str, ParamState]) -> None:
        moments = {}
        with torch.no_grad():
            for name, master, p in zip(self.names, self.master_params, self.model_params):
                fields = states[name].fields if name in states else {}
                if "master" in fields:
                    master.copy_(fields["master"].view(master.shape))
                    if master is not p:
                        p.copy_(master)
                elif master is not p:
                    master.copy_(p)  # no fp32 weights saved: start from the loaded parameters
                moments[master] = {k: v.view(master.shape) if v.ndim else v for k, v in fields.items()}
        load_adam_moments(self.inner, moments)
