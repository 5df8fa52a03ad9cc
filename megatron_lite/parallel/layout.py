"""The rank grid: which global rank holds which (TP, CP, DP, PP) coordinate. Pure math, no processes.

Order (Megatron-LM's default): TP varies fastest, then CP, then DP, then PP, so

    rank = tp + TP·(cp + CP·(dp + DP·pp))

and a tensor-parallel group is a run of consecutive ranks, which keeps it inside one node.

Experts (mixture of experts) use Megatron's parallel folding: within each pipeline stage the same
TP·CP·DP ranks form a second grid ETP × EP × EDP (EDP = TP·CP·DP / (ETP·EP)), ETP fastest::

    rank = etp + ETP·(ep + EP·(edp + EDP·pp))

so the pipeline groups are the dense grid's, and an EP group is as compact as a TP group.

Command line, printing every group as JSON without starting any process::

    python -m megatron_lite.parallel.layout --world-size 16 --tp 2 --pp 4
    python -m megatron_lite.parallel.layout --world-size 8 --tp 2 --ep 2 --etp 1
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
# Groups only an MoE model uses, over the dense axes: token counts of the aux losses are summed over
# TP × CP (one microbatch's sequences), the expert-bias counts over the whole stage.
MOE_GROUP_AXES = {
    "tensor_context": ("tp", "cp"),
    "stage": ("tp", "cp", "dp"),
}

# The expert grid's axes, fastest first, and its groups.
EXPERT_AXES = ("etp", "ep", "edp", "pp")
EXPERT_GROUP_AXES = {
    "expert_tensor": ("etp",),  # one expert's matrices split (Megatron's expert_tensor_parallel_group)
    "expert": ("ep",),  # the experts split; the all-to-all dispatcher's group
    "expert_data": ("edp",),  # replicas of the same experts: expert gradients reduced here
    "expert_tensor_model": ("etp", "ep"),  # Megatron's expert_tensor_and_model_parallel_group
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
    ep: int = 1  # expert-parallel size
    etp: int = 1  # expert-tensor-parallel size
    experts: bool = False  # an MoE model: the expert grid's groups exist (also at EP = ETP = 1)

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by TP×CP×PP = "
                f"{self.tp}×{self.cp}×{self.pp}"
            )

        if self.world_size % (self.tp * self.pp * self.cp) == 0 and (self.tp * self.cp * self.dp) % (self.etp * self.ep):
            raise ValueError(
                f"ETP×EP = {self.etp}×{self.ep} does not divide TP×CP×DP = {self.tp * self.cp * self.dp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the replicas of each expert within a stage."""
        return self.tp * self.cp * self.dp // (self.etp * self.ep)

    @property
    def has_expert_grid(self) -> bool:
        return self.experts or self.ep > 1 or self.etp > 1

    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}

    def expert_sizes(self) -> dict[str, int]:
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp}

    def expert_coord_of(self, rank: int) -> dict[str, int]:
        """``rank``'s coordinates in the expert grid: {etp, ep, edp, pp}."""
        self.coord_of(rank)  # range check
        return dict(zip(EXPERT_AXES, _digits(rank, [self.expert_sizes()[a] for a in EXPERT_AXES])))

    def expert_groups_along(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every expert-grid group whose members differ only along ``axes`` (sorted, by first rank)."""
        sizes = self.expert_sizes()
        by_rest: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            coord = self.expert_coord_of(rank)
            by_rest.setdefault(tuple(coord[a] for a in EXPERT_AXES if a not in axes), []).append(rank)
        assert all(len(g) == _prod(sizes[a] for a in axes) for g in by_rest.values())
        return sorted(sorted(g) for g in by_rest.values())

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
        if self.has_expert_grid:
            groups.update({kind: self.groups_along(axes) for kind, axes in MOE_GROUP_AXES.items()})
            groups.update({kind: self.expert_groups_along(axes) for kind, axes in EXPERT_GROUP_AXES.items()})
        return groups


def _digits(n: int, radices: list[int]) -> list[int]:
    """``n`` in the mixed radix ``radices`` (least significant first)."""
    out = []
    for r in radices:
        out.append(n % r)
        n //= r
    return out


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_lite.parallel.layout",
        description="Print every process group of a TP×CP×DP×PP rank grid as JSON.",
    )
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
    parser.add_argument("--etp", type=int, default=1, help="expert-tensor-parallel size (MoE)")
    args = parser.parse_args(argv)
    try:
        grid = RankGrid(args.world_size, tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    groups = grid.all_groups()
    if grid.cp == 1:
        groups.pop("context")
        groups.pop("data_context")
    sizes = {**grid.sizes(), **({"ep": grid.ep, "etp": grid.etp, "edp": grid.edp} if grid.has_expert_grid else {})}
    print(json.dumps({"world_size": grid.world_size, **sizes, **groups}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
