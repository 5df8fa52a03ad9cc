"""ParallelState on real gloo ranks: every group checked with a real collective."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_lite.parallel.layout import RankGrid
from megatron_lite.parallel.state import ParallelState
from test_layout import factorisations


# (TP, CP, PP) layouts with context parallelism checked besides every (TP, PP) factorisation.
CP_LAYOUTS = {1: [], 2: [(1, 2, 1)], 4: [(1, 2, 1), (1, 4, 1), (2, 2, 1)], 8: [(2, 2, 2)]}


def _membership_sums(tp: int, pp: int, cp: int = 1) -> dict:
    """All-reduce 2**rank over each of this rank's groups: the sum identifies the members exactly."""
    state = ParallelState(tp=tp, pp=pp, cp=cp)
    me = torch.tensor([2.0 ** state.rank], dtype=torch.float64)
    sums = {}
    for kind, group in [
        ("tensor", state.tp_group), ("data", state.dp_group), ("pipeline", state.pp_group),
        ("model", state.mp_group), ("embedding", state.embedding_group), ("context", state.cp_group),
        ("data_context", state.dp_cp_group),
    ]:
        if group is None:
            continue
        t = me.clone()
        dist.all_reduce(t, group=group)
        sums[kind] = int(t.item())
    coords = (state.tp_rank, state.cp_rank, state.dp_rank, state.pp_rank, state.is_first_stage,
              state.is_last_stage, state.dp_cp_rank)
    state.destroy()
    return {"sums": sums, "coords": coords}


def _check_all_factorisations() -> float:
    world = dist.get_world_size()
    start = time.perf_counter()
    out = {}
    for tp, pp in factorisations(world):
        out[(tp, 1, pp)] = _membership_sums(tp, pp)
    for tp, cp, pp in CP_LAYOUTS[world]:
        out[(tp, cp, pp)] = _membership_sums(tp, pp, cp)
    return {"elapsed_s": time.perf_counter() - start, "results": out}


def _expected(world, tp, cp, pp, rank):
    grid = RankGrid(world, tp=tp, pp=pp, cp=cp)
    sums = {}
    for kind, groups in grid.all_groups().items():
        for g in groups:
            if rank in g:
                sums[kind] = sum(2**r for r in g)
    c = grid.coord_of(rank)
    return sums, (c.tp, c.cp, c.dp, c.pp, c.pp == 0, c.pp == pp - 1, c.cp + cp * c.dp)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_with_real_collectives(ranks, world):
    per_rank = ranks(world).run(_check_all_factorisations)
    for rank, report in enumerate(per_rank):
        for (tp, cp, pp), got in report["results"].items():
            sums, coords = _expected(world, tp, cp, pp, rank)
            assert got["sums"] == sums, (world, tp, cp, pp, rank)
            assert got["coords"] == coords
    if world == 8:
        slowest = max(r["elapsed_s"] for r in per_rank)
        print(f"\n8 ranks: groups for all {len(factorisations(8))} factorisations in {slowest:.2f} s")
