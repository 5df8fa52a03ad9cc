"""The microbatch sampler (DP slices, exact resume) and dataset building across gloo ranks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.config import DataConfig, TokenizerConfig
from megatron_lite.data import (
    FIELDS, DataError, MicrobatchSampler, build_datasets, build_tokenizer, collate,
    microbatch_loader, stage_fields,
)
from megatron_lite.data.distributed import first_rank_then_rest


def all_ranks(total, consumed, mbs, gbs, dp) -> list[list[list[list[int]]]]:
    """[rank][iteration][microbatch] -> indices, for every DP rank."""
    return [list(MicrobatchSampler(total, consumed, mbs, gbs, r, dp)) for r in range(dp)]


def test_dp_ranks_partition_each_global_batch_without_repeats_or_gaps():
    total, gbs = 96, 16
    reference = None
    for mbs, dp in ((1, 1), (2, 1), (2, 2), (1, 4), (4, 4), (2, 8)):
        per_rank = all_ranks(total, 0, mbs, gbs, dp)
        iterations = len(per_rank[0])
        assert iterations == total // gbs and all(len(r) == iterations for r in per_rank)
        batches = []
        for it in range(iterations):
            # Microbatch m of the iteration is one slice of mbs·dp samples, rank r taking its part.
            for m in range(gbs // (mbs * dp)):
                joined = [i for r in range(dp) for i in per_rank[r][it][m]]
                assert joined == list(range(it * gbs + m * mbs * dp, it * gbs + (m + 1) * mbs * dp))
            batches.append(sorted(i for r in range(dp) for mb in per_rank[r][it] for i in mb))
        flat = [i for batch in batches for i in batch]
        assert flat == list(range(total))  # every sample once, in order of iterations
        reference = reference or batches
        assert batches == reference  # a global batch's content does not depend on the DP size


def test_resume_from_consumed_samples_gives_the_very_next_batch(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    tok = build_tokenizer(TokenizerConfig())
    train, _, _ = build_datasets(cfg, tok, seq_length=32, seed=5, num_samples=(200, 0, 0))
    sampler = MicrobatchSampler(200, 0, 2, 8, dp_rank=1, dp_size=2)
    stream = iter(sampler)
    for _ in range(3):
        next(stream)
    saved = sampler.consumed_samples
    assert saved == 24
    expected = next(stream)
    resumed = MicrobatchSampler(200, saved, 2, 8, dp_rank=1, dp_size=2)
    assert len(resumed) == (200 - 24) // 8
    got = next(iter(resumed))
    assert got == expected
    for a, b in zip(got, expected):
        for field, value in collate(train, a).items():
            torch.testing.assert_close(value, collate(train, b)[field], rtol=0, atol=0)
    # Stops before a batch that would pass total_samples.
    assert len(list(MicrobatchSampler(30, 0, 2, 8, 0, 2))) == 3


def test_collate_and_stage_fields(tmp_path):
    tok = build_tokenizer(TokenizerConfig())
    train, _, _ = build_datasets(DataConfig(cache_dir=str(tmp_path)), tok, 16, 1, (10, 0, 0))
    batch = collate(train, [3, 1, 4])
    assert batch["tokens"].shape == (3, 16) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert stage_fields(True, False) == ("tokens",)
    assert stage_fields(False, True) == ("labels", "loss_mask")
    assert stage_fields(True, True) == ("tokens", "labels", "loss_mask")
    assert collate(train, [0], stage_fields(False, False)) == {}
    assert set(collate(train, [0], stage_fields(False, True))) == {"labels", "loss_mask"}
    # The loader yields the same microbatches in-process and from DataLoader workers.
    in_process = list(microbatch_loader(train, MicrobatchSampler(10, 2, 1, 4, 1, 2)))
    workers = list(microbatch_loader(train, MicrobatchSampler(10, 2, 1, 4, 1, 2), num_workers=2))
    assert len(in_process) == len(workers) == 2 and len(workers[0]) == 2
    for ours, theirs in zip(in_process, workers):
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() == set(FIELDS)
            for field in FIELDS:
                torch.testing.assert_close(a[field], b[field], rtol=0, atol=0)
    middle = list(microbatch_loader(train, MicrobatchSampler(10, 2, 1, 4, 1, 2), fields=()))
    assert middle == [[{}, {}], [{}, {}]]


def test_sampler_rejects_bad_settings():
    with pytest.raises(DataError, match="global_batch_size: 10 is not a positive multiple"):
        MicrobatchSampler(100, 0, 2, 10, 0, 3)
    with pytest.raises(DataError, match="dp_rank 2"):
        MicrobatchSampler(100, 0, 2, 8, 2, 2)
    with pytest.raises(DataError, match="consumed_samples 120"):
        MicrobatchSampler(100, 120, 2, 8, 0, 2)


def _digest(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _claim(path: Path) -> str:
    """Idempotent build step: the first caller to find no file writes its rank into it."""
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(os.environ["RANK"])
        os.replace(tmp, path)
    return path.read_text()


def _fail_on_rank0() -> None:
    if os.environ["RANK"] == "0":
        raise DataError("deliberate failure")


def _ranks_build_and_read(cache: str):
    from megatron_lite.parallel.state import ParallelState

    state = ParallelState(tp=2, pp=1)
    try:
        claimed = [
            first_rank_then_rest(lambda: _claim(Path(cache) / f"claim{k}")) for k in range(3)
        ]
        try:
            first_rank_then_rest(_fail_on_rank0)
            failure = None
        except DataError as err:
            failure = str(err)
        tok = build_tokenizer(TokenizerConfig())
        train, valid, _ = build_datasets(DataConfig(cache_dir=cache), tok, 32, 11, (64, 16, 0))
        sampler = MicrobatchSampler(64, 16, 2, 8, state.dp_rank, state.dp_size)
        microbatches = next(iter(sampler))
        tokens = [collate(train, mb)["tokens"] for mb in microbatches]
        return {
            "claimed": claimed, "failure": failure, "dp_rank": state.dp_rank,
            "arrays": _digest(
                train.doc_idx, train.sample_idx, train.shuffle_idx, valid.shuffle_idx
            ),
            "microbatches": microbatches, "tokens": tokens,
        }
    finally:
        state.destroy()


def test_ranks_share_one_build_and_tp_peers_read_the_same_data(ranks, tmp_path):
    results = ranks(4).run(_ranks_build_and_read, str(tmp_path))
    assert all(r["claimed"] == ["0", "0", "0"] for r in results)  # rank 0 built, the others reused
    for r in results[1:]:  # the others raise rank 0's error at once, without waiting for a timeout
        assert "rank 0 failed" in r["failure"] and "deliberate failure" in r["failure"]
    assert "deliberate failure" in results[0]["failure"]
    assert len({r["arrays"] for r in results}) == 1
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1]  # TP varies fastest
    # Single-process reference over the same cache: the global batch after 16 consumed samples.
    tok = build_tokenizer(TokenizerConfig())
    train, _, _ = build_datasets(DataConfig(cache_dir=str(tmp_path)), tok, 32, 11, (64, 16, 0))
    for r in results:
        peer = results[r["dp_rank"] * 2]  # TP peers: ranks 2d and 2d+1
        assert r["microbatches"] == peer["microbatches"]
        for mb, got in zip(r["microbatches"], r["tokens"]):
            torch.testing.assert_close(got, collate(train, mb)["tokens"], rtol=0, atol=0)
    served = sorted(i for r in results[0::2] for mb in r["microbatches"] for i in mb)
    assert served == list(range(16, 24))
