"""The rank grid: which global rank holds which (TP, CP, DP, PP) coordinate. Pure math, no processes.

Order (Megatron-LM's default): TP varies fastest, then CP, then DP, then PP, so

    rank = tp + TP·(cp + CP·(dp + DP·pp))

and a tensor-parallel group is a run of consecutive ranks, which keeps it inside one node.

Command line, printing every group as JSON without starting any process::

    python -m megatron_lite.parallel.layout --world-size 16 --tp 2 --pp 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass

# Grid axes from fastest- to slowest-varying.
AXES = ("tp", "cp", "dp", "pp")

# Group kind -> the axes its members differ in (all other coordinates are shared).
GROUP_AXES = {
    "tensor": ("tp",),
    "context": ("cp",),
    "data": ("dp",),
    "pipeline": ("pp",),
    "model": ("tp", "pp"),
    # Megatron's data_parallel_group_with_cp: parameters are replicated over CP as over DP, so
    # gradients are averaged (and the distributed optimizer shards) over both.
    "data_context": ("cp", "dp"),
}


@dataclass(frozen=True)
class RankCoord:
    tp: int
    cp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class RankGrid:
    """A world of ``world_size`` ranks arranged as TP × CP × DP × PP (DP derived)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    head_on_first_stage: bool = False  # the V placement (ZB-V): output layer on the first stage

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by TP×CP×PP = "
                f"{self.tp}×{self.cp}×{self.pp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def rank_of(self, coord: RankCoord) -> int:
        sizes = self.sizes()
        rank, stride = 0, 1
        for axis in AXES:
            rank += getattr(coord, axis) * stride
            stride *= sizes[axis]
        return rank

    def coord_of(self, rank: int) -> RankCoord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        sizes, values = self.sizes(), {}
        for axis in AXES:
            values[axis] = rank % sizes[axis]
            rank //= sizes[axis]
        return RankCoord(**values)

    def groups_along(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every group whose members differ only along ``axes``, each sorted, ordered by first rank."""
        sizes = self.sizes()
        fixed_axes = [a for a in AXES if a not in axes]
        groups = []
        for fixed in itertools.product(*(range(sizes[a]) for a in fixed_axes)):
            base = dict(zip(fixed_axes, fixed))
            members = [
                self.rank_of(RankCoord(**base, **dict(zip(axes, varying))))
                for varying in itertools.product(*(range(sizes[a]) for a in axes))
            ]
            groups.append(sorted(members))
        return sorted(groups)

    def embedding_groups(self) -> list[list[int]]:
        """The stage holding the embedding (the first) and the one holding the output layer (the last,
        or the first itself in the V placement) of each pipeline group: they share a tied embedding."""
        head = 0 if self.head_on_first_stage else -1
        return [sorted({g[0], g[head]}) for g in self.groups_along(GROUP_AXES["pipeline"])]

    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every process group of the grid by kind, in the order ParallelState creates them."""
        groups = {kind: self.groups_along(axes) for kind, axes in GROUP_AXES.items()}
        groups["embedding"] = self.embedding_groups()
        return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_lite.parallel.layout",
        description="Print every process group of a TP×CP×DP×PP rank grid as JSON.",
    )
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    args = parser.parse_args(argv)
    try:
        grid = RankGrid(args.world_size, tp=args.tp, pp=args.pp, cp=args.cp)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    groups = grid.all_groups()
    if grid.cp == 1:
        groups.pop("context")
        groups.pop("data_context")
    print(json.dumps({"world_size": grid.world_size, **grid.sizes(), **groups}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
