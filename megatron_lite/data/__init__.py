"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, GPT samples, blending and the sampler.

The trainer's entry points:

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    train, valid, test = build_datasets(cfg.data, tokenizer, seq_len, seed, (n_train, n_valid, 0))
    sampler = MicrobatchSampler(total, consumed, mbs, gbs, dp_rank, dp_size)
    for microbatches in microbatch_loader(train, sampler, stage_fields(first, last), num_workers):
        ...  # microbatches: list of {"tokens": [mbs, seq], "labels": ..., "loss_mask": ...}
"""

from megatron_lite.data.builder import build_datasets
from megatron_lite.data.errors import DataError
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megatron_lite.data.sampler import (
    FIELDS, MicrobatchSampler, collate, microbatch_loader, stage_fields,
)
from megatron_lite.data.tokenizer import build_tokenizer, load_tokenizer

__all__ = [
    "FIELDS", "DataError", "GPTDataset", "IndexedDataset", "IndexedDatasetWriter",
    "MicrobatchSampler", "build_datasets", "build_tokenizer", "collate", "load_tokenizer",
    "microbatch_loader", "stage_fields",
]
