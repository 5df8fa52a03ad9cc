"""The harness itself: results come back, exceptions and hangs are reported by rank."""

import pytest
import torch
import torch.distributed as dist

from harness import RankFailure, RankPool


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    return "ok"


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        import time

        time.sleep(60)
    return "ok"


def test_results_by_rank(ranks):
    assert ranks(2).run(_rank_and_sum) == [(0, 1.0), (1, 1.0)]


def test_exception_names_rank(ranks):
    with pytest.raises(RankFailure, match=r"(?s)rank 1.*boom on rank one"):
        ranks(2).run(_fail_on_rank_one)
    assert ranks(2).run(_rank_and_sum) == [(0, 1.0), (1, 1.0)]  # the pool restarts


def test_hang_names_ranks():
    pool = RankPool(2)
    try:
        with pytest.raises(RankFailure, match=r"ranks \[1\] did not finish"):
            pool.run(_hang_on_rank_one, timeout=5)
    finally:
        pool.close()
