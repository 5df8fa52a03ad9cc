"""Learning-rate schedules: linear warmup from 0, then decay to min_lr (Megatron's set).

    constant  lr after warmup
    linear    lr → min_lr linearly over the decay iterations
    cosine    min_lr + (lr − min_lr)·½(1 + cos(π·progress))
    wsd       warmup-stable-decay: lr until the last ``lr_wsd_decay_iters``, then linear to min_lr
Past ``lr_decay_iters`` the rate stays at min_lr.
"""

from __future__ import annotations

import math

from ..config import OptimizerConfig


def learning_rate(iteration: int, cfg: OptimizerConfig, train_iters: int) -> float:
    """The learning rate for ``iteration`` (0-based: the first update uses iteration 0)."""
    step = iteration + 1
    warmup = cfg.lr_warmup_iters
    if warmup > 0 and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_end = cfg.lr_decay_iters or train_iters
    if step >= decay_end:
        return cfg.min_lr
    if cfg.lr_decay_style == "wsd":
        wsd = cfg.lr_wsd_decay_iters if cfg.lr_wsd_decay_iters is not None else max(1, decay_end // 10)
        decay_start = max(warmup, decay_end - wsd)
    else:
        decay_start = warmup
    if step <= decay_start:
        return cfg.lr
    progress = (step - decay_start) / (decay_end - decay_start)
    if cfg.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear and the decay phase of wsd
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
