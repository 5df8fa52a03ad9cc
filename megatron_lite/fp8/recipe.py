"""An FP8 recipe (Megatron-LM's ``--fp8-format`` / ``--fp8-recipe`` meanings) and delayed scaling's
end-of-iteration update.

Formats: ``e4m3`` quantises every GEMM operand to e4m3 (max 448, 3 mantissa bits); ``hybrid``
keeps e4m3 for the forward (activations, weights) and uses e5m2 (max 57344, 2 mantissa bits) for
the gradients, whose range is wider and whose precision matters less.

Recipes: ``tensorwise`` (current scaling: each tensor's scale from its own amax, at the GEMM);
``delayed`` (Transformer Engine's DelayedScaling: the scale from the amaxes of the last
``amax_history_len`` iterations, by ``amax_compute_algo``: their max or the most recent); ``rowwise``;
``blockwise`` (DeepSeek-V3). fp8/tensor.py describes the granularities, fp8/linear.py the GEMMs.

Delayed scaling, layout-invariant: within an iteration every GEMM uses the scales of the history as
it stood at the iteration's start, and each rank records the amax of what it quantised (``pending``,
max over its microbatches). ``update_scales``, once per iteration after the backward, reduces the
pending amaxes (MAX) over TP and DP × CP — the ranks that hold the same layers — so the recorded
amax is the single rank's (max over all microbatches of the whole tensors), and rolls it into every
replica's identical history. A history that is still all zero (the first iteration) scales from the
current amax instead (as tensorwise does), rather than from an arbitrary initial scale. A
non-finite amax (a step the trainer skips) is recorded as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from .tensor import BLOCK, FORMATS, amax_to_scale

if TYPE_CHECKING:
    from .linear import LinearFP8

INPUT, WEIGHT, GRAD = 0, 1, 2  # a linear layer's three quantised tensors (its amax histories' rows)
RECIPES = ("tensorwise", "delayed", "rowwise", "blockwise")


@dataclass(frozen=True)
class Recipe:
    """What a run's FP8 GEMMs do (``training.fp8_*``)."""

    format: str = "hybrid"  # e4m3 | hybrid
    recipe: str = "tensorwise"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0

    @classmethod
    def from_config(cls, t) -> Optional["Recipe"]:
        """The recipe of a ``TrainingConfig`` (None: FP8 off)."""
        if t.fp8_format is None:
            return None
        return cls(t.fp8_format, t.fp8_recipe, t.fp8_amax_history_len, t.fp8_amax_compute_algo, t.fp8_margin)

    @property
    def delayed(self) -> bool:
        return self.recipe == "delayed"

    @property
    def granularity(self) -> str:
        """What one scale covers: tensorwise (tensorwise and delayed), rowwise, blockwise."""
        return "tensorwise" if self.recipe in ("tensorwise", "delayed") else self.recipe

    @property
    def tensor_scaled(self) -> bool:
        return self.granularity == "tensorwise"

    @property
    def forward_dtype(self) -> torch.dtype:
        return FORMATS["e4m3"]

    @property
    def backward_dtype(self) -> torch.dtype:
        return FORMATS["e5m2" if self.format == "hybrid" else "e4m3"]

    @property
    def weight_block_rows(self) -> int:
        return BLOCK if self.recipe == "blockwise" else 1

    def role_dtype(self, role: int) -> torch.dtype:
        return self.backward_dtype if role == GRAD else self.forward_dtype


def update_scales(layers: Sequence["LinearFP8"], groups: Sequence[Optional[dist.ProcessGroup]]) -> None:
    """Delayed scaling's end of iteration (module docstring): reduce every layer's pending amaxes
    over ``groups`` (TP, then DP × CP) in one all-reduce each, roll them into the histories, compute
    the next iteration's scales. Collective over ``groups``; layers in the same order on every rank.
    No-op for the other recipes."""
    layers = [layer for layer in layers if layer.recipe.delayed]
    if not layers:
        return
    pending = torch.stack([layer.pending for layer in layers])  # [layers, 3]
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(pending, op=dist.ReduceOp.MAX, group=group)
    pending = torch.where(torch.isfinite(pending), pending, torch.zeros_like(pending))
    for layer, amax in zip(layers, pending):
        layer.history = torch.cat([amax.unsqueeze(1).to(layer.history), layer.history[:, :-1]], dim=1)
        layer.pending = torch.zeros_like(layer.pending)
        layer.refresh_scales()
