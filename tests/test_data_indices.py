"""GPT sample indices (C++ = numpy), datasets against the raw token stream, blending, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_lite.config import DataConfig
from megatron_lite.data import (
    DataError, GPTDataset, IndexedDataset, IndexedDatasetWriter, build_datasets,
)
from megatron_lite.data import indices
from megatron_lite.data.builder import parse_paths, parse_split, split_ranges


@pytest.fixture(scope="module")
def cpp():
    module = indices.helpers()
    if module is None:
        pytest.skip("the C++ data helpers could not be built (no compiler?); numpy is in use")
    return module


def write_docs(prefix: Path, lengths, base: int = 0) -> IndexedDataset:
    """Document d holds tokens base + 100·d + [0, 1, ...]: every token says where it came from."""
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for d, length in enumerate(lengths):
        writer.add_document((base + 100 * d + np.arange(length)) % 65000)
    writer.finalize()
    return IndexedDataset(prefix)


def test_sample_idx_cpp_equals_numpy(cpp):
    rng = np.random.RandomState(0)
    for trial in range(30):
        num_docs = rng.randint(1, 300)
        sizes = rng.randint(0, rng.choice([3, 40, 2000]), size=num_docs).astype(np.int32)
        sizes[rng.randint(num_docs)] += 1  # at least one token
        doc_idx = indices.build_doc_idx(np.arange(num_docs), rng.randint(1, 4), rng)
        seq_length = int(rng.choice([1, 2, 7, 64, 1000]))
        total = int(sizes[doc_idx].sum())
        num_samples = (total - 1) // seq_length
        ours = cpp.build_sample_idx(sizes, doc_idx, seq_length, num_samples)
        twin = indices.build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)
        assert ours.dtype == twin.dtype == np.int64
        np.testing.assert_array_equal(ours, twin, err_msg=f"trial {trial}")
        assert (sizes[doc_idx[ours[:, 0]]] > ours[:, 1]).all()  # never empty or past an end
        for builder in (cpp.build_sample_idx, indices.build_sample_idx_numpy):
            with pytest.raises(IndexError, match="fewer than"):
                builder(sizes, doc_idx, seq_length, num_samples + 1 + total // seq_length)


def test_blending_cpp_equals_python_and_tracks_weights(cpp):
    for weights in ([0.5, 0.5], [0.3, 0.7], [0.6, 0.25, 0.1, 0.05], [1 / 3] * 3, [0.999, 0.001]):
        w = np.asarray(weights) / np.sum(weights)
        which, within = cpp.build_blending_indices(w, 5000)
        twin = indices.build_blending_indices_python(w, 5000)
        np.testing.assert_array_equal(which, twin[0])
        np.testing.assert_array_equal(within, twin[1])
        counts = np.zeros((len(w), 5000), dtype=np.int64)  # [k, n-1]: dataset k in the first n
        for k in range(len(w)):
            counts[k] = np.cumsum(which == k)
            np.testing.assert_array_equal(within[which == k], np.arange(counts[k, -1]))
        expected = w[:, None] * np.arange(1, 5001)[None, :]
        assert np.abs(counts - expected).max() <= 1.0, weights


def test_gpt_dataset_samples_are_the_token_stream(tmp_path):
    lengths = [5, 0, 17, 3, 40, 1, 9, 0, 22]
    ds = write_docs(tmp_path / "docs", lengths)
    seq = 8
    gpt = GPTDataset(ds, 2, 9, 40, seq, seed=7, cache_dir=tmp_path / "cache", name="train")
    per_epoch = sum(lengths[2:9])
    num_epochs = len(gpt.doc_idx) // 7
    assert num_epochs == -(-(40 * seq + 1) // per_epoch) and len(gpt) >= 40
    for e in range(num_epochs):  # each epoch is a permutation of the split's documents
        assert sorted(gpt.doc_idx[7 * e: 7 * (e + 1)].tolist()) == list(range(2, 9))
    stream = np.concatenate([ds[int(d)] for d in gpt.doc_idx]).astype(np.int64)
    assert sorted(gpt.shuffle_idx.tolist()) == list(range(len(gpt)))
    for i in range(len(gpt)):
        j = int(gpt.shuffle_idx[i])
        item = gpt[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), stream[j * seq: j * seq + seq])
        labels = stream[j * seq + 1: (j + 1) * seq + 1]
        np.testing.assert_array_equal(item["labels"].numpy(), labels)
        assert item["loss_mask"].dtype.is_floating_point and item["loss_mask"].sum() == seq
    with pytest.raises(IndexError):
        gpt[len(gpt)]
    # Cached: a second build memory-maps the same arrays; another seed makes new ones.
    again = GPTDataset(ds, 2, 9, 40, seq, 7, tmp_path / "cache", "train")
    assert isinstance(again.sample_idx, np.memmap)
    np.testing.assert_array_equal(again.shuffle_idx, gpt.shuffle_idx)
    other = GPTDataset(ds, 2, 9, 40, seq, 8, tmp_path / "cache", "train")
    assert not np.array_equal(other.doc_idx, gpt.doc_idx)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_short_last_epoch_is_shuffled_apart(tmp_path):
    ds = write_docs(tmp_path / "docs", [10] * 10)  # 100 tokens per epoch, 12 samples of 8
    # 14 samples: 12 from epoch one, 2 (< 80 % of an epoch) from epoch two.
    gpt = GPTDataset(ds, 0, 10, 14, seq_length=8, seed=1, cache_dir=tmp_path, name="train")
    first = (100 - 1) // 8  # samples wholly inside epoch one
    assert sorted(gpt.shuffle_idx[:first].tolist()) == list(range(first))
    assert sorted(gpt.shuffle_idx[first:].tolist()) == list(range(first, len(gpt)))


def test_split_and_paths_parsing():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("8,2") == pytest.approx([0.8, 0.2, 0.0])
    assert split_ranges(parse_split("969,30,1"), 1189) == [(0, 1152), (1152, 1188), (1188, 1189)]
    # Megatron's rounding: the shortfall moves every boundary.
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 4), (4, 7), (7, 10)]
    assert parse_paths(["a"]) == (["a"], [1.0])
    assert parse_paths([0.3, "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_paths(["1", "a", "3", "b"]) == (["a", "b"], [1.0, 3.0])
    for bad, message in (
        ([0.0, "a", 0.0, "b"], "sum to a positive"), ([-1, "a", 2, "b"], "non-negative"),
        ([], "empty list"), ([1.0, "a", "b"], "neither"),
    ):
        with pytest.raises(DataError, match=f"data.paths: .*{message}"):
            parse_paths(bad)
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(DataError, match="data.split"):
            parse_split(bad)


def test_blended_splits_from_config(tmp_path):
    write_docs(tmp_path / "a", [30] * 50, base=0)
    write_docs(tmp_path / "b", [25] * 80, base=10000)
    cfg = DataConfig(paths=[0.25, str(tmp_path / "a"), 0.75, str(tmp_path / "b")], split="8,1,1",
                     cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(cfg, None, seq_length=16, seed=3, num_samples=(400, 40, 0))
    assert test is None and len(train) == 400 and len(valid) == 40
    from_b = np.array([int(train[i]["tokens"][0]) >= 10000 for i in range(len(train))])
    assert abs(from_b.sum() - 300) <= 1
    np.testing.assert_array_equal(train.dataset_index == 1, from_b)
    # Valid samples come only from the valid documents of each prefix (a: 40-44, b: 64-71).
    docs = {int(valid[i]["tokens"][0]) // 100 for i in range(len(valid))}
    assert docs <= set(range(40, 45)) | {100 + d for d in range(64, 72)}
    missing = DataConfig(paths=[str(tmp_path / "missing")], cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="missing.idx: not found"):
        build_datasets(missing, None, 16, 3, (4, 0, 0))
    with pytest.raises(DataError, match="fewer than one sample"):
        small = DataConfig(paths=[str(tmp_path / "a")], cache_dir=str(tmp_path))
        build_datasets(small, None, 2000, 3, (4, 0, 0))
