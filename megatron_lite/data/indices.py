"""The index arrays behind the GPT and blended datasets, and a disk cache for them.

The two loops that grow with the data (sample index, blending index) run in C++
(``csrc/data/helpers.cpp``, built on first use); the numpy/Python twins here give identical arrays
and are used when no compiler is available. The shuffles use numpy's ``RandomState`` seeded from
``training.seed``, so every rank and every run computes the same arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import numpy as np

from megatron_lite.extensions import load_extension


def helpers() -> Optional[ModuleType]:
    """The compiled helpers, or None (with one warning) when they cannot be built."""
    return load_extension("megatron_lite_data_helpers", ["data/helpers.cpp"], extra_cflags=["-O3"])


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """int64[num_epochs × len(documents)]: each epoch a fresh permutation of ``documents``.

    Every document appears once per epoch, so no document repeats before all have been seen.
    """
    epochs = [rng.permutation(documents).astype(np.int64) for _ in range(num_epochs)]
    return np.concatenate(epochs) if epochs else np.zeros(0, np.int64)


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int, use_cpp: bool = True
) -> np.ndarray:
    """int64[num_samples + 1, 2]: where each sample of ``seq_length + 1`` tokens starts.

    Concatenate the documents ``sizes[doc_idx[0]], sizes[doc_idx[1]], ...`` into one token stream.
    Sample i is stream tokens ``i·seq_length ... (i+1)·seq_length`` inclusive, so neighbouring
    samples share one token (the last label of one is the first input of the next). Row i is
    (position in doc_idx of the document holding stream token i·seq_length, offset within that
    document); row i + 1 therefore marks where sample i ends. Empty documents are never pointed at.
    """
    module = helpers() if use_cpp else None
    if module is not None:
        return module.build_sample_idx(
            np.ascontiguousarray(sizes, np.int32), np.ascontiguousarray(doc_idx, np.int64),
            seq_length, num_samples,
        )
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)


def build_sample_idx_numpy(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """The numpy twin of the C++ builder (same arguments, identical result)."""
    if seq_length <= 0 or num_samples < 0:
        raise ValueError("build_sample_idx: seq_length must be positive, num_samples >= 0")
    if len(doc_idx) and (doc_idx.min() < 0 or doc_idx.max() >= len(sizes)):
        raise IndexError("build_sample_idx: doc_idx holds an id outside sizes")
    starts = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(sizes[doc_idx], dtype=np.int64, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if positions[-1] >= starts[-1]:
        raise IndexError(
            "build_sample_idx: the documents hold fewer than num_samples * seq_length + 1 tokens"
        )
    # The last document starting at or before each position; an empty document shares its start
    # with the next one, and side="right" steps past it, like the C++ walk.
    doc = np.searchsorted(starts, positions, side="right") - 1
    return np.stack([doc, positions - starts[doc]], axis=1)


def build_shuffle_idx(num_samples: int, num_first: int, rng: np.random.RandomState) -> np.ndarray:
    """int64[num_samples]: a permutation of the samples; ``[0, num_first)`` and the rest apart.

    Keeping a short final epoch separate stops its few samples from being spread over the whole run
    (Megatron's rule, see ``GPTDataset``).
    """
    first = rng.permutation(num_first).astype(np.int64)
    rest = num_first + rng.permutation(num_samples - num_first).astype(np.int64)
    return np.concatenate([first, rest])


def build_blending_indices(
    weights: np.ndarray, size: int, use_cpp: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(int16[size] dataset of each blended sample, int64[size] its index within that dataset).

    Megatron's greedy rule: blended sample s comes from the dataset whose count lags its share the
    most, ``argmax_k(weights[k] · max(s, 1) − taken[k])`` (first on ties). Each dataset's count
    in every prefix of the stream then stays within one sample of its weight.
    """
    weights = np.ascontiguousarray(weights, np.float64)
    module = helpers() if use_cpp else None
    if module is not None:
        return module.build_blending_indices(weights, size)
    return build_blending_indices_python(weights, size)


def build_blending_indices_python(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The pure-Python twin of the C++ builder (identical result; slow beyond ~10⁶ samples)."""
    weights = [float(w) for w in weights]
    taken = [0] * len(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for s in range(size):
        target = float(max(s, 1))
        errors = [w * target - t for w, t in zip(weights, taken)]
        best = errors.index(max(errors))
        dataset_index[s] = best
        sample_index[s] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def cached_arrays(
    cache_dir: Path, name: str, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays ``build()`` returns, saved once under ``cache_dir`` and memory-mapped afterwards.

    The file names carry a hash of ``description`` (everything the arrays depend on), so a change of
    seed, length, split or data makes new files instead of reusing stale ones. Each file is written
    under a temporary name and renamed, and the description is written last, so a reader never sees
    a half-written set. Callers make one rank build while the others wait (``distributed.py``).
    """
    text = json.dumps(description, sort_keys=True)
    stem = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    marker = cache_dir / f"{stem}.json"
    if marker.is_file():
        keys = json.loads(marker.read_text())["arrays"]
        return {key: np.load(cache_dir / f"{stem}-{key}.npy", mmap_mode="r") for key in keys}
    arrays = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        tmp = cache_dir / f"{stem}-{key}.tmp{os.getpid()}.npy"
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, cache_dir / f"{stem}-{key}.npy")
    tmp_marker = cache_dir / f"{stem}.json.tmp{os.getpid()}"
    record = {"description": description, "arrays": sorted(arrays)}
    tmp_marker.write_text(json.dumps(record, indent=1))
    os.replace(tmp_marker, marker)
    return arrays
