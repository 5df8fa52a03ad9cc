"""Every valid layout for a world size, predicted and ranked: fastest first among those that fit,
the smaller memory first among equally fast ones."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..config import Config, ConfigError
from .devices import Device
from .estimate import Prediction, predict, setup_from_config

MICRO_BATCHES = (1, 2, 4, 8, 16)
MAX_VPP = 8


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(cfg: Config, world_size: int) -> list[Config]:
    """``cfg`` with every TP × CP × PP × VPP × micro-batch combination over ``world_size`` ranks, and
    for an MoE model every EP dividing the experts (ETP as configured); sequence parallelism on
    whenever TP > 1. Validity is left to ``config.validate``."""
    out = []
    experts = cfg.model.moe.num_experts
    eps = [e for e in _divisors(experts) if e <= world_size] if experts else [1]
    for tp in _divisors(world_size):
        for cp in _divisors(world_size // tp):
            for pp in _divisors(world_size // (tp * cp)):
                for vpp in [None] + [v for v in range(2, MAX_VPP + 1) if pp > 1]:
                    for mbs in MICRO_BATCHES:
                        for ep in eps:
                            parallel = replace(cfg.parallel, tensor_model_parallel_size=tp, context_parallel_size=cp,
                                               pipeline_model_parallel_size=pp,
                                               virtual_pipeline_model_parallel_size=vpp, pipeline_schedule="auto",
                                               sequence_parallel=tp > 1, expert_model_parallel_size=ep)
                            training = replace(cfg.training, micro_batch_size=mbs)
                            out.append(replace(cfg, parallel=parallel, training=training))
    return out


def search(cfg: Config, world_size: int, vocab_size: int, dev: Device, recompute: Optional[str] = None,
           overlap: bool = False, include_unfit: bool = False) -> list[Prediction]:
    """Predictions for every valid layout, those that fit in ``dev``'s memory, fastest first."""
    predictions = []
    for candidate in candidate_configs(cfg, world_size):
        try:
            setup = setup_from_config(candidate, world_size, vocab_size, recompute, overlap)
        except ConfigError:
            continue
        prediction = predict(setup, dev)
        if prediction.fits or include_unfit:
            predictions.append(prediction)
    return sorted(predictions, key=lambda p: (not p.fits, p.time.total, p.memory.total))
