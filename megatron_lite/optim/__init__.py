"""Optimizer, fp32 gradient buffers and their reductions, clipping, LR schedules."""

from .clip import NormRanks, clip_by_norm, counted_once, global_grad_norm
from .distributed import DistributedOptimizer
from .grads import GradBuffer, finalize_grads, overlaps_reduction
from .lr_schedule import learning_rate
from .optimizer import Optimizer

__all__ = ["DistributedOptimizer", "GradBuffer", "NormRanks", "Optimizer", "clip_by_norm", "counted_once", "finalize_grads", "global_grad_norm",
           "learning_rate", "overlaps_reduction"]
