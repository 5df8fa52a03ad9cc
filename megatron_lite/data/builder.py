"""From ``config.DataConfig`` to train/valid/test datasets: paths, weights, split, blend, cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch.distributed as dist

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.corpus import bundled_corpus_prefix
from megatron_lite.data.distributed import first_rank_then_rest
from megatron_lite.data.errors import DataError
from megatron_lite.data.gpt_dataset import GPTDataset, dataset_fingerprint
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.mock import MockGPTDataset
from megatron_lite.data.tokenizer import Tokenizer
from megatron_lite.extensions import cache_root

SPLIT_NAMES = ("train", "valid", "test")


def data_cache_dir(data_cfg) -> Path:
    """``data.cache_dir``, or ``data/`` under the megatron_lite cache."""
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else cache_root() / "data"

# Each member of a blend gets this much more than its share, so rounding never runs it dry.
BLEND_MARGIN = 1.005


def parse_paths(paths: Optional[Sequence[Any]], key: str = "data.paths") -> tuple[list[str], list[float]]:
    """``[p]``, ``[p1, p2]`` (equal weights) or ``[w1, p1, w2, p2]`` -> (prefixes, weights);
    ``key`` names the setting in errors."""
    if paths is None:
        raise DataError(f"{key}: None means the bundled corpus and has no prefixes to parse")
    items = list(paths)
    if not items:
        raise DataError(
            f"{key}: empty list; give .bin/.idx prefixes, or null for the bundled corpus"
        )
    weights = [_number(w) for w in items[0::2]] if len(items) % 2 == 0 else [None]
    if None not in weights:
        prefixes = [str(p) for p in items[1::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(
                f"{key}: weights {weights} must be non-negative and sum to a positive number"
            )
        return prefixes, weights
    if all(isinstance(item, str) for item in items):
        return list(items), [1.0] * len(items)
    raise DataError(
        f"{key}: {items!r} is neither a list of prefixes nor [weight, prefix, weight, ...]"
    )


def _number(value: Any) -> Optional[float]:
    """``value`` as a weight (a number, or a string like "0.3" from a shell), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` → normalised [train, valid, test] fractions (missing parts are 0)."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise DataError(
            f"data.split: {split!r} is not comma-separated numbers like 969,30,1"
        ) from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(f"data.split: {split!r} needs 1-3 non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_ranges(fractions: Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous document ranges per split (Megatron's rounding: the last boundary is the end)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [(max(0, bounds[i]), max(0, bounds[i + 1])) for i in range(3)]


def _build(
    prefixes: list[str], weights: list[float], fractions: list[float], seq_length: int, seed: int,
    num_samples: Sequence[int], cache_dir: Path,
) -> list[Optional[torch.utils.data.Dataset]]:
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    ranges = [split_ranges(fractions, len(ds)) for ds in indexed]
    total_weight = sum(weights)
    out: list[Optional[torch.utils.data.Dataset]] = []
    for s, name in enumerate(SPLIT_NAMES):
        members = [
            k for k in range(len(indexed)) if weights[k] > 0 and ranges[k][s][1] > ranges[k][s][0]
        ]
        if num_samples[s] <= 0 or not members:
            out.append(None)
            continue

        def member(k: int, samples: int) -> GPTDataset:
            start, end = ranges[k][s]
            return GPTDataset(indexed[k], start, end, samples, seq_length, seed, cache_dir, name)

        if len(members) == 1:
            out.append(member(members[0], num_samples[s]))
            continue
        member_weights = [weights[k] / total_weight for k in members]
        datasets = [member(k, int(np.ceil(w * num_samples[s] * BLEND_MARGIN)) + 1)
                    for k, w in zip(members, member_weights)]
        description = {
            "members": [
                [dataset_fingerprint(prefixes[k]), list(ranges[k][s]), len(d)]
                for k, d in zip(members, datasets)
            ],
            "seq_length": seq_length, "seed": seed,
        }
        out.append(
            BlendedDataset(datasets, member_weights, num_samples[s], cache_dir, name, description)
        )
    return out


SPLIT_KEYS = ("data.train_paths", "data.valid_paths", "data.test_paths")


def split_paths(data_cfg) -> Optional[list[Optional[tuple[list[str], list[float]]]]]:
    """Per-split (prefixes, weights) from ``data.train/valid/test_paths`` (None for a split not
    given), or None when the config uses ``data.paths`` + ``data.split`` (or the bundled corpus)."""
    given = [getattr(data_cfg, key.split(".")[1]) for key in SPLIT_KEYS]
    if all(g is None for g in given):
        return None
    if data_cfg.paths is not None:
        raise DataError("data.paths: set together with data.train_paths/valid_paths/test_paths; "
                        "use either paths + split or the per-split paths")
    if given[0] is None:
        raise DataError("data.train_paths: needed when data.valid_paths or data.test_paths is set")
    return [None if g is None else parse_paths(g, key) for g, key in zip(given, SPLIT_KEYS)]


def dataset_prefixes(data_cfg) -> list[str]:
    """Every .bin/.idx prefix the config names, once each; [] for the bundled corpus and mock data."""
    if data_cfg.mock:
        return []
    per_split = split_paths(data_cfg)
    if per_split is not None:
        names = [p for entry in per_split if entry is not None for p in entry[0]]
    elif data_cfg.paths is not None:
        names = parse_paths(data_cfg.paths)[0]
    else:
        names = []
    return list(dict.fromkeys(names))


def build_datasets(
    data_cfg, tokenizer: Tokenizer, seq_length: int, seed: int, num_samples: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[Optional[torch.utils.data.Dataset], ...]:
    """(train, valid, test) GPT datasets for a ``config.DataConfig``.

    ``num_samples`` = (train, valid, test) sample counts the run will read; a split with 0 samples,
    or without documents under ``data.split``, is None. ``data.mock``: synthetic samples
    (``mock.py``), no files read. Each dataset has at least that many samples
    and ``dataset[i]`` = ``{"tokens": int64[seq_length], "labels": int64[seq_length],
    "loss_mask": float32[seq_length]}``. Under torch.distributed, the first rank of ``group``
    (default: world) preprocesses the bundled corpus if needed and builds the index caches while
    the others wait; every rank then holds the same arrays. ``data.cache_dir`` must be visible to
    all ranks of ``group`` (ranks that cannot see it build their own copy).
    """
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(
            f"num_samples: expected (train, valid, test) counts >= 0, got {num_samples}"
        )
    if seq_length <= 0:
        raise DataError(f"model.seq_length: must be positive, got {seq_length}")
    if data_cfg.mock:  # synthetic tokens: no files, no indices, nothing to share between ranks
        return tuple(MockGPTDataset(int(n), seq_length, tokenizer.vocab_size, seed, name) if int(n) > 0 else None
                     for n, name in zip(num_samples, SPLIT_NAMES))
    cache_dir = data_cache_dir(data_cfg)
    fractions = parse_split(data_cfg.split)
    per_split = split_paths(data_cfg)
    if data_cfg.paths is not None:
        prefixes, weights = parse_paths(data_cfg.paths)
    counts = [int(n) for n in num_samples]

    def build() -> list[Optional[torch.utils.data.Dataset]]:
        if per_split is not None:  # each split from its own prefixes, all of their documents
            out: list[Optional[torch.utils.data.Dataset]] = []
            for s, entry in enumerate(per_split):
                if entry is None:
                    out.append(None)
                    continue
                only = [1.0 if k == s else 0.0 for k in range(3)]
                wanted = [counts[k] if k == s else 0 for k in range(3)]
                out.append(_build(*entry, only, seq_length, seed, wanted, cache_dir)[s])
            return out
        if data_cfg.paths is None:
            names, mix = [bundled_corpus_prefix(tokenizer, cache_dir)], [1.0]
        else:
            names, mix = prefixes, weights
        return _build(names, mix, fractions, seq_length, seed, counts, cache_dir)

    return tuple(first_rank_then_rest(build, group))


def describe_splits(data_cfg, splits: Sequence[Optional[torch.utils.data.Dataset]],
                    num_samples: Sequence[int]) -> list[str]:
    """The start-up summary of ``build_datasets``' result: per split its documents, tokens, blend
    weights and epochs read, and a line for a split the run asked samples of but that is empty."""
    lines = []
    for name, key, dataset, wanted in zip(SPLIT_NAMES, SPLIT_KEYS, splits, num_samples):
        if dataset is not None:
            lines.append(f"data: {name}: {dataset.summary()}")
        elif wanted > 0:
            why = (f"{key} is not set" if split_paths(data_cfg) is not None
                   else f"data.split={data_cfg.split} gives it no documents")
            effect = "training cannot run" if name == "train" else f"no {'validation' if name == 'valid' else 'test'} loss"
            lines.append(f"data: the {name} split is empty ({why}): {effect}")
    return lines
