"""The MoE layer: router → dispatch → experts → combine, plus an optional shared expert.

    x [b, s, h] ──router──> (weights, experts) [N, k] per token
      │                         └─ assign: (token, expert, weight) in expert order, capacity drops
      ├──dispatch──> rows for this rank's experts ──grouped experts──> ──combine──> Σ_k w · expert(x)
      └──shared expert (· sigmoid gate)──────────────────────────────────────────────────┘ (+)

x is what the block's MLP would get: [b, s, h], or [b, s/t, h] under sequence parallelism and s/c
tokens under context parallelism; every rank routes its own tokens (TP > 1 requires SP, so no two
ranks of a stage hold the same token). The shared expert is the dense MLP (tensor-parallel over TP).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..parallel.collectives import TPGroup
from ..tensor_parallel import ParamMeta, new_parameter
from .dispatch import DISPATCHERS, assign
from .experts import GroupedExperts
from .groups import ExpertGroups
from .router import Router, in_recomputation


class MoE(nn.Module):
    """forward(x [b, s_local, h]) -> [b, s_local, h]. Buffers ``dropped`` / ``assigned``: this
    step's assignments over capacity and in all, on this rank (statistics, not saved)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, groups: ExpertGroups):
        super().__init__()
        from ..model.transformer import MLP  # the shared expert is the dense MLP

        moe = self.cfg = cfg.moe
        self.router = Router(cfg, tp, groups)
        self.experts = GroupedExperts(cfg, groups.ep, groups.etp)
        self.dispatcher = DISPATCHERS[moe.token_dispatcher](moe.num_experts, groups.ep, groups.etp)
        self.shared_expert = self.shared_gate = None
        if moe.shared_expert_ffn_hidden_size is not None:
            self.shared_expert = MLP(dataclasses.replace(cfg, ffn_hidden_size=moe.shared_expert_ffn_hidden_size), tp)
            if moe.shared_expert_gate:
                meta = ParamMeta(init_std=cfg.init_std, grad_summed_over_tp=tp.sequence_parallel)
                self.shared_gate = new_parameter((1, cfg.hidden_size), meta)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("assigned", torch.zeros((), dtype=torch.float64), persistent=False)

    def _apply(self, fn, recurse=True):
        kept = {n: getattr(self, n) for n in ("dropped", "assigned")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            setattr(self, name, getattr(self, name).to(dtype=old.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        weights, experts = self.router(tokens, b)
        moe = self.cfg
        a = assign(weights, experts, moe.num_experts, moe.capacity_factor, moe.drop_policy, moe.pad_to_capacity)
        if self.training and torch.is_grad_enabled() and not in_recomputation():
            self.dropped += a.dropped
            self.assigned += experts.numel()
        rows, counts = self.dispatcher.dispatch(tokens, a, self.experts.fp8)
        out = self.dispatcher.combine(self.experts(rows, counts, self.dispatcher.rows_fp8)).view(b, s, h)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(x @ self.shared_gate.t())
            out = out + shared
        return out
