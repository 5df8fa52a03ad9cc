"""Column- and row-parallel linear layers and the vocab-parallel embedding (Shoeybi et al. 2019).

A column-parallel linear splits the output features over TP ranks (weight [out/t, in]); a row-parallel
linear splits the input features (weight [out, in/t]) and sums the partial products. An MLP or an
attention block is column → (local math) → row, with one all-reduce forward and one backward. With
sequence parallelism the activations between blocks are split along the sequence instead of
replicated: the column layer all-gathers its input along the sequence and the row layer
reduce-scatters its output (Korthikanti et al. 2022).

Parameters are created empty and tagged with ``init_std`` (normal init) or ``init_value`` (a
constant); the model initialises every full tensor from a seed and keeps this rank's shard.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.collectives import (
    TPGroup,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from .sharding import mark_sharded


def _param(shape: tuple[int, ...], dim: Optional[int], stride: int = 1, **init) -> nn.Parameter:
    """An uninitialised parameter with its sharding (see sharding.py) and init tags."""
    param = mark_sharded(nn.Parameter(torch.empty(shape)), dim, stride)
    for key, value in init.items():
        setattr(param, key, value)
    return param


def _divide(n: int, tp: TPGroup, what: str) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {tp.size}")
    return n // tp.size


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ + b with A split by rows (output features) over the TP group.

    Input: [b, s, in], replicated over TP (or [b, s/t, in] with sequence parallelism, gathered here).
    Output: [b, s, out/t] on each TP rank, or [b, s, out] with ``gather_output``.
    ``stride`` > 1 declares the full weight as that many stacked blocks, each split separately.
    ``skip_bias_add`` returns the bias instead of adding it, for a fused bias + activation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TPGroup,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        init_std: float = 0.02,
        skip_bias_add: bool = False,
    ):
        super().__init__()
        self.tp, self.gather_output, self.skip_bias_add = tp, gather_output, skip_bias_add
        out_local = _divide(out_features, tp, "output features")
        self.weight = _param((out_local, in_features), dim=0, stride=stride, init_std=init_std)
        self.bias = _param((out_local,), dim=0, stride=stride, init_value=0.0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = gather_from_sp(x, self.tp) if self.tp.sequence_parallel else copy_to_tp(x, self.tp)
        bias = None if self.skip_bias_add else self.bias
        y = F.linear(x, self.weight, bias)
        if self.gather_output:
            y = gather_from_tp(y, self.tp)
        return (y, self.bias) if self.skip_bias_add else y


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with A split by columns (input features) over the TP group.

    Input: [b, s, in/t], already split (the output of a column-parallel layer).
    Output: [b, s, out] summed over TP (all-reduce), or [b, s/t, out] with sequence parallelism
    (reduce-scatter). The bias is replicated and added after the reduction; under sequence
    parallelism its gradient is partial on each TP rank (``sequence_parallel`` tag) and is summed by
    ``allreduce_sequence_parallel_grads``.
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.tp = tp
        in_local = _divide(in_features, tp, "input features")
        self.weight = _param((out_features, in_local), dim=1, init_std=init_std)
        self.bias = None
        if bias:
            self.bias = _param((out_features,), dim=None, init_value=0.0)
            self.bias.sequence_parallel = tp.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, self.tp) if self.tp.sequence_parallel else reduce_from_tp(y, self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP: rank r holds rows [r·V/t, (r+1)·V/t).

    Input: token ids [b, s] (the same on every TP rank). Each rank looks up the ids it owns, zeroes
    the others, and the partial embeddings are summed over TP: all-reduce → [b, s, h], or with
    sequence parallelism reduce-scatter → [b, s/t, h].
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, init_std: float = 0.02):
        super().__init__()
        self.tp = tp
        rows = _divide(vocab_size, tp, "padded vocabulary size")
        self.vocab_start, self.vocab_end = tp.rank * rows, (tp.rank + 1) * rows
        self.weight = _param((rows, hidden_size), dim=0, init_std=init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sp(partial, self.tp)
        return reduce_from_tp(partial, self.tp)
