"""Megatron's tensor-parallel layers, vocab-parallel cross-entropy and TP-aware random numbers."""

from ..parallel.collectives import TPGroup
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .param_meta import ParamMeta, new_parameter
from .random import ModelRNG, dropout
from .sharding import full_shape, gather_full, shard_tensor
from .weight_grad import WeightGradStore, defer_weight_grads

__all__ = [
    "TPGroup", "ColumnParallelLinear", "ParallelLMHead", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "ModelRNG", "dropout", "full_shape", "gather_full", "shard_tensor",
    "ParamMeta", "new_parameter", "WeightGradStore", "defer_weight_grads",
]
