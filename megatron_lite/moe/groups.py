"""The process groups an MoE layer talks over, as the layers see them.

Each is a ``TPGroup`` (group, size, rank): the collectives of parallel/collectives.py work over any
group, and with size 1 they touch no process group, so a single-process MoE needs no
torch.distributed. Built from a ``ParallelState`` (parallel/state.py creates every group at start-up
with the collective timeout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..parallel.collectives import TPGroup


def _view(state, name: str) -> TPGroup:
    return TPGroup(getattr(state, f"{name}_group"), getattr(state, f"{name}_size"), getattr(state, f"{name}_rank"))


@dataclass(frozen=True)
class ExpertGroups:
    """``ep``: ranks holding different experts (the dispatcher's all-to-all / all-gather);
    ``etp``: ranks holding slices of the same experts' matrices; ``tp_cp``: the ranks that share one
    microbatch's sequences (router token counts and aux-loss totals are summed over it); ``stage``:
    TP × CP × DP of this pipeline stage (the expert-bias counts and the logged statistics);
    ``cp_size``: the context-parallel size (each CP rank's losses carry a factor CP, see
    parallel/context.py:masked_mean_over_cp)."""

    ep: TPGroup = field(default_factory=TPGroup)
    etp: TPGroup = field(default_factory=TPGroup)
    tp_cp: TPGroup = field(default_factory=TPGroup)
    stage: TPGroup = field(default_factory=TPGroup)
    cp_size: int = 1

    @classmethod
    def from_state(cls, state) -> "ExpertGroups":
        """The groups of a ``ParallelState`` built with the expert grid (single-process defaults
        otherwise)."""
        if not getattr(state, "has_experts", False):
            return cls()
        return cls(_view(state, "ep"), _view(state, "etp"), _view(state, "tp_cp"), _view(state, "stage"),
                   state.cp_size)
