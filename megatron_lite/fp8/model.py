"""FP8 for a model: which linears run FP8 GEMMs, and their delayed-scaling state in checkpoints.

``FP8Model.enable`` gives every column- and row-parallel linear of the transformer blocks (QKV, the
attention output, fc1, fc2; a MoE layer's shared expert) a ``LinearFP8`` (fp8/linear.py), as
torchao's ``convert_to_float8_training`` swaps linears, and every MoE layer's ``GroupedExperts`` a
``GroupedFP8`` (fp8/grouped.py: per-token and per-expert current scaling whatever the recipe, so no
delayed state), except in the layers kept in high precision (``first_last_layers_bf16``: the first
and last few transformer layers). The embedding, the output layer and the MoE router are never
converted: they are not ColumnParallelLinear / RowParallelLinear / GroupedExperts modules of a
transformer block (the router's weight is a plain parameter of ``moe.router.Router``).

Checkpoints: each converted layer's amax history is model state keyed
``fp8/<weight name>/amax_history`` ([3, amax_history_len]: input, weight, gradient), named as in the
single-rank model (global layer indices, like the parameters). It is identical on every replica, so
every layout saves the same tensor and any layout loads it (the pipeline stage holding a layer reads
its entry).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from ..tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from ..moe.experts import GroupedExperts
from .grouped import GroupedFP8
from .linear import LinearFP8
from .recipe import Recipe, update_scales

FP8_STATE = "fp8/"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def high_precision_layers(num_layers: int, training) -> set[int]:
    """The transformer layers kept out of FP8 (``training.first_last_layers_bf16``)."""
    if not training.first_last_layers_bf16:
        return set()
    start, end = training.num_layers_at_start_in_bf16, training.num_layers_at_end_in_bf16
    return set(range(start)) | set(range(num_layers - end, num_layers))


class FP8Model:
    """The FP8 layers of this rank's model chunks and what a run does with them: ``enable`` converts
    the linears; ``end_iteration`` runs delayed scaling's update (collective over ``amax_groups``:
    TP, then DP × CP); ``state_tensors`` / ``state_targets`` / ``load_state`` are the checkpoint's
    view (module docstring)."""

    def __init__(self, layers: list[tuple[str, LinearFP8]], amax_groups: list, experts: list[GroupedFP8] = ()):
        self.layers, self.amax_groups, self.experts = layers, amax_groups, list(experts)

    @classmethod
    def enable(cls, chunks: Iterable[nn.Module], recipe: Recipe, tp_group=None, token_group=None,
               dp_cp_group=None, skip_layers: set[int] = frozenset()) -> "FP8Model":
        """Give the linears of the transformer blocks in ``chunks`` FP8 GEMMs, in module order (the
        same on every rank holding these layers). ``token_group``: the group splitting the tokens
        (CP); ``tp_group`` / ``dp_cp_group``: where delayed amaxes are reduced."""
        converted, experts = [], []
        for chunk in chunks:
            for name, module in chunk.named_modules():
                match = _LAYER.search(name + ".")
                if match is None or int(match.group(1)) in skip_layers:
                    continue
                if isinstance(module, GroupedExperts):  # current per-token scaling (fp8/grouped.py)
                    module.fp8 = GroupedFP8(recipe, module.etp.group if module.etp.size > 1 else None)
                    experts.append(module.fp8)
                if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                    continue
                column = isinstance(module, ColumnParallelLinear)
                module.fp8 = LinearFP8(recipe, module.tp.group if module.tp.size > 1 else None, column, [token_group])
                converted.append((f"{name}.weight", module.fp8))
        return cls(converted, [tp_group, dp_cp_group], experts)

    def end_iteration(self) -> None:
        """After an iteration's backward: delayed scaling's amax reduction and history update."""
        update_scales([state for _, state in self.layers], self.amax_groups)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Delayed scaling's histories as checkpoint tensors (replicated)."""
        return {f"{FP8_STATE}{name}/amax_history": state.history.detach().cpu()
                for name, state in self.layers if state.recipe.delayed}

    def state_targets(self, has_key: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Tensors to read the saved histories into (those the checkpoint has)."""
        return {key: torch.empty_like(t) for key, t in self.state_tensors().items() if has_key(key)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install the histories read into ``state_targets``' tensors."""
        for name, state in self.layers:
            saved = tensors.get(f"{FP8_STATE}{name}/amax_history")
            if saved is not None:
                state.history = saved.to(state.history.device)
                state.refresh_scales()
