"""Synthetic GPT samples (``data.mock=true``, Megatron's ``--mock-data``): no corpus is read.

Sample ``i`` of a split is ``seq_length + 1`` ids drawn uniformly below ``vocab_size`` by a
generator seeded with (seed, split, i), so every rank and every resume sees the same tokens without
any index files. Meant for throughput runs and smoke tests: the loss stays near ln(vocab_size).
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT_SEEDS = {"train": 0, "valid": 1, "test": 2}


class MockGPTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of uniform random ids in [0, vocab_size); items as ``GPTDataset``'s."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, name: str):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed, self.name = seed, name

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"mock {self.name} sample {i} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, SPLIT_SEEDS[self.name], i])
        sample = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64))
        return {"tokens": sample[:-1], "labels": sample[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32)}

    def summary(self) -> str:
        return f"{self.num_samples:,} synthetic samples (uniform ids below {self.vocab_size:,}; data.mock)"
