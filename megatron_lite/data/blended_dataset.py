"""Weighted blends of datasets: a fixed, cached interleaving that tracks the weights closely."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_lite.data.errors import DataError
from megatron_lite.data.indices import build_blending_indices, cached_arrays


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised).

    The order is Megatron's greedy error-minimising index (``indices.build_blending_indices``):
    after any number n of samples, dataset k has supplied within one sample of ``weights[k] · n``.
    ``description`` identifies the member datasets in the cache key.
    """

    def __init__(
        self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int,
        cache_dir: Path, name: str, description: dict,
    ):
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        key = {"kind": "blend", "version": 1, "weights": self.weights.tolist(), "size": size,
               **description}

        def build() -> dict[str, np.ndarray]:
            dataset_index, sample_index = build_blending_indices(self.weights, size)
            return {"dataset_index": dataset_index, "sample_index": sample_index}

        arrays = cached_arrays(cache_dir, f"blend-{name}", key, build)
        self.dataset_index, self.sample_index = arrays["dataset_index"], arrays["sample_index"]
        for k, dataset in enumerate(self.datasets):
            needed = int(self.sample_index[self.dataset_index == k].max(initial=-1)) + 1
            if needed > len(dataset):
                raise DataError(
                    f"blend {name}: dataset {k} has {len(dataset)} samples, the blend needs "
                    f"{needed}"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def summary(self) -> str:
        """One line for the start-up log: each member's weight and summary, with the samples the
        blend takes from it."""
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        return f"blend of {len(self.datasets)}: " + "; ".join(
            f"weight {w:.3g} {d.summary(int(n))}" for w, d, n in zip(self.weights, self.datasets, taken))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"blended sample {i} out of range [0, {len(self)})")
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
