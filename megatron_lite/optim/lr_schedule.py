"""Learning-rate schedules: linear warmup from 0, then decay to min_lr (Megatron's set).

    constant  lr after warmup
    linear    lr → min_lr linearly over the decay iterations
    cosine    min_lr + (lr − min_lr)·½(1 + cos(π·progress))
    wsd       warmup-stable-decay: lr until the last ``lr_wsd_decay_iters``, then linear to min_lr
Past ``lr_decay_iters`` the rate stays at min_lr.
"""

from __future__ import annotations

import math

from ..config import ConfigError, OptimizerConfig


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


def schedule_parameters(cfg: OptimizerConfig, train_iters: int) -> dict[str, object]:
    """The settings ``learning_rate`` depends on, each under its config key (the decay end under
    ``training.train_iters`` when ``optimizer.lr_decay_iters`` is null): what checkpoints store so
    that a resume can tell whether it continues the same schedule."""
    params: dict[str, object] = {"optimizer.lr": cfg.lr, "optimizer.lr_warmup_iters": cfg.lr_warmup_iters,
                                 "optimizer.lr_decay_style": cfg.lr_decay_style}
    if cfg.lr_decay_style != "constant":
        params["optimizer.min_lr"] = cfg.min_lr
        if cfg.lr_decay_iters is None:
            params["training.train_iters"] = train_iters
        else:
            params["optimizer.lr_decay_iters"] = cfg.lr_decay_iters
    if cfg.lr_decay_style == "wsd":
        params["optimizer.lr_wsd_decay_iters"] = cfg.lr_wsd_decay_iters
    return params


def check_resumed_schedule(saved: dict[str, object], now: dict[str, object], override: bool) -> str | None:
    """Compare a checkpoint's ``schedule_parameters`` with this run's. Different without ``override``
    (``optimizer.override_opt_param_scheduler``): ConfigError naming the changed keys; different with
    it: a line saying this run's schedule is used; the same: None."""
    keys = list(dict.fromkeys([*saved, *now]))
    changed = [f"{k} {saved.get(k, 'unset')} -> {now.get(k, 'unset')}" for k in keys if saved.get(k) != now.get(k)]
    if not changed:
        return None
    if override:
        return f"optimizer: this run's learning-rate schedule replaces the checkpoint's ({', '.join(changed)})"
    raise ConfigError("optimizer.override_opt_param_scheduler", (
        f"the learning-rate schedule differs from the checkpoint's ({', '.join(changed)}); restore those "
        "values, or set optimizer.override_opt_param_scheduler=true to continue under this run's schedule"))
