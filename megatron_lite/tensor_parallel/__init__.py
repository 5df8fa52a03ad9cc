"""Megatron's tensor-parallel layers, vocab-parallel cross-entropy and TP-aware random numbers."""

from ..parallel.collectives import TPGroup
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .random import ModelRNG, dropout
from .sharding import allreduce_sequence_parallel_grads, full_shape, gather_full, shard_tensor

__all__ = [
    "TPGroup", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "ModelRNG", "dropout", "full_shape", "gather_full",
    "shard_tensor", "allreduce_sequence_parallel_grads",
]
