"""ParallelState on real gloo ranks: every group checked with a real collective."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite.parallel.layout import RankGrid
from megatron_lite.parallel.state import ParallelState
from test_layout import factorisations


def _membership_sums(tp: int, pp: int) -> dict:
    """All-reduce 2**rank over each of this rank's groups: the sum identifies the members exactly."""
    state = ParallelState(tp=tp, pp=pp)
    me = torch.tensor([2.0 ** state.rank], dtype=torch.float64)
    sums = {}
    for kind, group in [
        ("tensor", state.tp_group), ("data", state.dp_group), ("pipeline", state.pp_group),
        ("model", state.mp_group), ("embedding", state.embedding_group),
    ]:
        if group is None:
            continue
        t = me.clone()
        dist.all_reduce(t, group=group)
        sums[kind] = int(t.item())
    coords = (state.tp_rank, state.dp_rank, state.pp_rank, state.is_first_stage, state.is_last_stage)
    state.destroy()
    return {"sums": sums, "coords": coords}


def _check_all_factorisations() -> float:
    world = dist.get_world_size()
    start = time.perf_counter()
    out = {}
    for tp, pp in factorisations(world):
        out[(tp, pp)] = _membership_sums(tp, pp)
    return {"elapsed_s": time.perf_counter() - start, "results": out}


def _expected(world, tp, pp, rank):
    grid = RankGrid(world, tp=tp, pp=pp)
    sums = {}
    for kind, groups in grid.all_groups().items():
        for g in groups:
            if rank in g and kind != "context":
                sums[kind] = sum(2**r for r in g)
    c = grid.coord_of(rank)
    return sums, (c.tp, c.dp, c.pp, c.pp == 0, c.pp == pp - 1)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_with_real_collectives(ranks, world):
    per_rank = ranks(world).run(_check_all_factorisations)
    for rank, report in enumerate(per_rank):
        for (tp, pp), got in report["results"].items():
            sums, coords = _expected(world, tp, pp, rank)
            assert got["sums"] == sums, (world, tp, pp, rank)
            assert got["coords"] == coords
    if world == 8:
        slowest = max(r["elapsed_s"] for r in per_rank)
        print(f"\n8 ranks: groups for all {len(factorisations(8))} factorisations in {slowest:.2f} s")
