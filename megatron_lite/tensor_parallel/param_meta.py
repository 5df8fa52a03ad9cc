"""What the rest of the code needs to know about a parameter: one typed record, ``param.meta``.

The layer that creates a parameter sets its ``ParamMeta`` once; initialisation (model/gpt.py),
checkpoints (shard layout), gradient reductions (optim/grads.py) and the gradient norm
(optim/clip.py) read it. Every parameter of the model has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ParamMeta:
    """How a parameter is sharded, initialised and reduced.

    Sharding over the TP group (tensor_parallel/sharding.py): ``tp_shard_dim`` is the dimension cut
    over TP ranks (None: replicated), ``tp_shard_stride`` the number of stacked blocks along it, each
    cut separately (2 for SwiGLU's fused [gate; up] weight).

    Initialisation, on the full tensor: ``init_std`` (normal with mean 0) or ``init_value`` (a
    constant); exactly one is set.

    Gradient reductions besides data parallelism (optim/grads.py:finalize_grads):
    ``grad_summed_over_tp``: replicated over TP but fed only this rank's sequence shard under
    sequence parallelism (norm weights and biases, row-parallel biases), so the TP ranks' gradients
    are partial sums. ``grad_summed_over_embedding_group``: a tied embedding whose two copies (the
    first stage's embedding, the last stage's output weight) live on different pipeline stages.
    ``counted_in_grad_norm``: False for the last stage's tied copy, whose gradient equals the
    embedding's after that sum (the first stage counts it). Parameters replicated over TP are
    counted on TP rank 0 only (optim/clip.py:counted_once).

    Experts (megatron_lite/moe/): ``expert_parallel`` marks a parameter of the expert grid. Its dim 0
    indexes experts and is split over EP (rank r holds experts [r·E/EP, (r+1)·E/EP)); its
    ``tp_shard_dim`` is split over the expert-tensor-parallel group (ETP), not TP; its gradients are
    reduced over the expert-data-parallel group (EDP), and it is counted in the norm once per EDP
    group (sharding.py:shard_cuts gives every split of any parameter).
    """

    tp_shard_dim: Optional[int] = None
    tp_shard_stride: int = 1
    init_std: Optional[float] = None
    init_value: Optional[float] = None
    grad_summed_over_tp: bool = False
    grad_summed_over_embedding_group: bool = False
    counted_in_grad_norm: bool = True
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if (self.init_std is None) == (self.init_value is None):
            raise ValueError(f"a parameter needs exactly one of init_std and init_value: {self}")

    def replace(self, **changes) -> "ParamMeta":
        return dataclasses.replace(self, **changes)


def new_parameter(shape: tuple[int, ...], meta: ParamMeta) -> nn.Parameter:
    """An uninitialised parameter carrying ``meta`` (the model initialises it from its full tensor)."""
    param = nn.Parameter(torch.empty(shape))
    param.meta = meta
    return param
