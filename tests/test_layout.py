"""The rank grid as pure math: Megatron-LM's documented example and every factorisation."""

import json
import subprocess
import sys

import pytest

from megatron_lite.parallel.layout import RankCoord, RankGrid, main


def test_megatron_documented_example():
    groups = RankGrid(16, tp=2, pp=4).all_groups()
    assert groups["tensor"] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert groups["data"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["pipeline"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["model"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert groups["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]


def factorisations(world):
    return [(tp, pp) for tp in range(1, world + 1) for pp in range(1, world + 1) if world % (tp * pp) == 0]


@pytest.mark.parametrize("world", [1, 2, 4, 8, 12, 16])
def test_groups_partition_the_world(world):
    for tp, pp in factorisations(world):
        grid = RankGrid(world, tp=tp, pp=pp)
        for kind, groups in grid.all_groups().items():
            if kind == "embedding":
                continue
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world)), (kind, tp, pp)
        for rank in range(world):
            coord = grid.coord_of(rank)
            assert grid.rank_of(coord) == rank
        # TP is fastest: the TP group of rank r is a run of consecutive ranks.
        for g in grid.all_groups()["tensor"]:
            assert g == list(range(g[0], g[0] + tp))
        assert len(grid.all_groups()["model"]) == grid.dp


def test_coordinates_follow_megatron_order():
    grid = RankGrid(16, tp=2, pp=4)
    assert grid.coord_of(7) == RankCoord(tp=1, cp=0, dp=1, pp=1)
    assert grid.rank_of(RankCoord(tp=0, cp=0, dp=1, pp=3)) == 14


def test_context_groups_sit_between_tp_and_dp():
    groups = RankGrid(8, tp=2, cp=2).all_groups()
    assert groups["context"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["data_context"] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # Megatron's data_parallel_group_with_cp


def test_invalid_grid_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        RankGrid(6, tp=4)


def test_cli_prints_json(capsys):
    assert main(["--world-size", "8", "--tp", "2", "--pp", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert set(out) >= {"tensor", "data", "pipeline", "model", "embedding"}


def test_cli_bad_input_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lite.parallel.layout", "--world-size", "6", "--tp", "4"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not divisible" in proc.stderr


def _megatron_rank_groups(world_size, parallel_size, mask):
    """Megatron-LM's ``generate_masked_orthogonal_rank_groups`` (parallel_state.py), restated: the
    groups whose members differ only along the masked dimensions of the mixed-radix rank."""
    def prefix_product(a):
        out = [1]
        for v in a:
            out.append(out[-1] * v)
        return out

    def decompose(index, shape):
        return [(index // d) % s for s, d in zip(shape, prefix_product(shape))]

    masked = [s for s, m in zip(parallel_size, mask) if m]
    unmasked = [s for s, m in zip(parallel_size, mask) if not m]
    stride = prefix_product(parallel_size)
    masked_stride = [d for d, m in zip(stride, mask) if m]
    unmasked_stride = [d for d, m in zip(stride, mask) if not m]
    size = prefix_product(masked)[-1]
    groups = []
    for g in range(world_size // size):
        base = sum(i * d for i, d in zip(decompose(g, unmasked), unmasked_stride))
        groups.append(sorted(base + sum(i * d for i, d in zip(decompose(r, masked), masked_stride))
                             for r in range(size)))
    return sorted(groups)


def test_expert_grid_matches_megatron_rank_generator():
    """Megatron's expert RankGenerator (order tp-ep-dp-pp with tp = ETP, dp = EDP) for every
    factorisation of 8 and 16 ranks, and the MoE groups over the dense axes."""
    checked = 0
    for world in (8, 16):
        for tp, pp in factorisations(world):
            for cp in (1, 2):
                if world % (tp * pp * cp):
                    continue
                dense = world // pp
                for ep in range(1, dense + 1):
                    for etp in range(1, dense + 1):
                        if dense % (ep * etp):
                            continue
                        grid = RankGrid(world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, experts=True)
                        sizes = [etp, ep, grid.edp, pp]
                        groups = grid.all_groups()
                        for kind, mask in (("expert_tensor", [1, 0, 0, 0]), ("expert", [0, 1, 0, 0]),
                                           ("expert_data", [0, 0, 1, 0]), ("expert_tensor_model", [1, 1, 0, 0]),
                                           ("pipeline", [0, 0, 0, 1])):
                            assert groups[kind] == _megatron_rank_groups(world, sizes, mask), (kind, tp, cp, pp, ep, etp)
                        dense_sizes = [tp, cp, grid.dp, pp]
                        assert groups["tensor_context"] == _megatron_rank_groups(world, dense_sizes, [1, 1, 0, 0])
                        assert groups["stage"] == _megatron_rank_groups(world, dense_sizes, [1, 1, 1, 0])
                        checked += 1
    assert checked > 50


def test_expert_grid_cli_and_errors():
    out = subprocess.run([sys.executable, "-m", "megatron_lite.parallel.layout", "--world-size", "8", "--tp", "2",
                          "--ep", "2", "--etp", "1"], capture_output=True, text=True, check=True).stdout
    groups = json.loads(out)
    assert (groups["ep"], groups["edp"]) == (2, 4)
    assert groups["expert"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["expert_data"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="does not divide"):
        RankGrid(8, tp=2, ep=3)
    assert main(["--world-size", "8", "--ep", "16"]) == 2
