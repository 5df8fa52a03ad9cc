"""The GPT model: transformer blocks, pipeline chunks, FLOPs count, HuggingFace weight mapping."""

from .flops import model_flops_per_iteration
from .gpt import ChunkSpec, GPTChunk, build_gpt, build_model_chunks, chunk_specs, init_weights

__all__ = [
    "ChunkSpec", "GPTChunk", "build_gpt", "build_model_chunks", "chunk_specs", "init_weights",
    "model_flops_per_iteration",
]
