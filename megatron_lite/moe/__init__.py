"""Mixture of experts (docs/moe.md): the MoE layer, its router, dispatchers and grouped experts, and
the per-step bookkeeping the trainer calls (statistics, expert-bias update)."""

from .groups import ExpertGroups
from .layer import MoE
from .router import Router, set_loss_scale
from .stats import after_step, console_part, moe_metrics

__all__ = ["ExpertGroups", "MoE", "Router", "after_step", "console_part", "moe_metrics", "set_loss_scale"]
