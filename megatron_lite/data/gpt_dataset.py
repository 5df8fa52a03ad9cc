"""GPT training samples cut from an indexed dataset: ``seq_length + 1`` tokens across document ends.

Three arrays, built once from ``training.seed`` and cached (see ``indices.py``):

- document index: the split's documents, a fresh permutation per epoch, for as many epochs as the
  requested samples need;
- sample index: where each sample starts in that document stream;
- shuffle index: the order in which samples are served.

``dataset[i]`` is ``{"tokens", "labels", "loss_mask"}``, each of length ``seq_length``: tokens are
the sample without its last token, labels without its first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_lite.data.errors import DataError
from megatron_lite.data.indexed_dataset import IndexedDataset, data_paths
from megatron_lite.data.indices import (
    build_doc_idx, build_sample_idx, build_shuffle_idx, cached_arrays,
)

# A final epoch contributing fewer samples than this share of a full epoch is shuffled on its own.
SEPARATE_LAST_EPOCH_BELOW = 0.80


def dataset_fingerprint(prefix: str) -> str:
    """A cheap identity of a .bin/.idx pair: sizes plus the head and tail of the index."""
    bin_path, idx_path = data_paths(prefix)
    digest = hashlib.sha256(f"{bin_path.stat().st_size}:{idx_path.stat().st_size}".encode())
    with open(idx_path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, idx_path.stat().st_size - (1 << 20)))
        digest.update(handle.read())
    return digest.hexdigest()[:16]


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens from documents ``[doc_start, doc_end)`` of ``indexed``.

    Builds enough epochs for at least ``num_samples`` samples; ``len(self)`` is every sample those
    epochs hold (≥ num_samples). ``name`` ("train", "valid", "test") keys the cache files.
    """

    def __init__(
        self, indexed: IndexedDataset, doc_start: int, doc_end: int, num_samples: int,
        seq_length: int, seed: int, cache_dir: Path, name: str,
    ):
        self.indexed, self.seq_length, self.name = indexed, seq_length, name
        documents = np.arange(doc_start, doc_end, dtype=np.int64)
        tokens_per_epoch = int(indexed.sequence_lengths[doc_start:doc_end].sum(dtype=np.int64))
        if tokens_per_epoch <= seq_length:
            raise DataError(
                f"{indexed.prefix}: the {name} split holds {tokens_per_epoch} tokens, fewer than "
                f"one sample of {seq_length + 1}; give it more documents (data.split) or shorten "
                "model.seq_length"
            )
        # Enough epochs that num_samples samples (num_samples·seq_length + 1 tokens) fit.
        num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
        description = {
            "kind": "gpt", "version": 1, "data": dataset_fingerprint(indexed.prefix),
            "documents": [doc_start, doc_end], "num_samples": num_samples,
            "seq_length": seq_length, "seed": seed, "num_epochs": num_epochs,
        }

        def build() -> dict[str, np.ndarray]:
            rng = np.random.RandomState(seed)
            doc_idx = build_doc_idx(documents, num_epochs, rng)
            total = (num_epochs * tokens_per_epoch - 1) // seq_length
            sample_idx = build_sample_idx(indexed.sequence_lengths, doc_idx, seq_length, total)
            # Samples wholly inside the first num_epochs - 1 epochs; the rest come from the last.
            from_full_epochs = max(0, ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length)
            per_epoch = (tokens_per_epoch - 1) // seq_length
            # The run reads num_samples - from_full_epochs samples of the final epoch.
            from_last = num_samples - from_full_epochs
            separate = num_epochs > 1 and from_last < SEPARATE_LAST_EPOCH_BELOW * per_epoch
            shuffle_idx = build_shuffle_idx(total, from_full_epochs if separate else total, rng)
            return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

        self.num_documents, self.tokens_per_epoch, self.num_samples = doc_end - doc_start, tokens_per_epoch, num_samples
        stem = f"{Path(indexed.prefix).name}-{name}"
        arrays = cached_arrays(cache_dir, stem, description, build)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        )

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def summary(self, samples: Optional[int] = None) -> str:
        """One line for the start-up log: documents and tokens of the split, and how many epochs of
        them ``samples`` (default: the samples asked for) read."""
        samples = self.num_samples if samples is None else samples
        epochs = samples * self.seq_length / self.tokens_per_epoch
        return (f"{Path(self.indexed.prefix).name}: {self.num_documents:,} documents, {self.tokens_per_epoch:,} tokens; "
                f"{samples:,} samples of {self.seq_length} = {epochs:.3g} epochs")

    def sample_tokens(self, i: int) -> np.ndarray:
        """int64[seq_length + 1]: the tokens of sample ``i`` (after shuffling)."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name} sample {i} out of range [0, {len(self)})")
        j = int(self.shuffle_idx[i])
        (first, start), (last, end) = self.sample_idx[j], self.sample_idx[j + 1]
        if first == last:
            parts = [self.indexed.get(int(self.doc_idx[first]), int(start), int(end - start + 1))]
        else:
            parts = [self.indexed.get(int(self.doc_idx[first]), int(start))]
            parts += [self.indexed.get(int(self.doc_idx[d])) for d in range(first + 1, last)]
            parts.append(self.indexed.get(int(self.doc_idx[last]), 0, int(end) + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = torch.from_numpy(self.sample_tokens(i))
        return {
            "tokens": sample[:-1],
            "labels": sample[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
        }
