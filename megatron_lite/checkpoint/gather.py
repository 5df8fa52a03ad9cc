"""The model's full (unsharded) state dict, gathered from any TP × PP layout.

Keys are the parameter names of the single-rank model (global layer indices), so the result does
not depend on the layout it came from: what the HF export, layout-equivalence tests and tools use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.gpt import TIED_OUTPUT_NAME, GPTChunk
from ..parallel.state import ParallelState
from ..tensor_parallel.sharding import gather_by_cuts, shard_cuts


@torch.no_grad()
def gather_full_state_dict(chunks: list[GPTChunk], state: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter at full shape, in fp32 on CPU, on every rank of the model-parallel group.

    Collective over the TP group (per chunk), for MoE layers the expert groups (ETP, then EP: experts
    at their full [E, ...] shape), and the pipeline group. The last stage's copy of a tied embedding
    is skipped: it equals ``embedding.weight``.
    """
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        groups = {"tp": chunk.tp, "ep": chunk.experts.ep, "etp": chunk.experts.etp}
        for name, p in chunk.named_parameters():
            if name == TIED_OUTPUT_NAME:
                continue
            full = gather_by_cuts(p, shard_cuts(p.meta, chunk.tp, chunk.experts), groups)
            local[name] = full.float().cpu()
    if state.pp_size == 1:
        return local
    per_stage: list = [None] * state.pp_size
    dist.all_gather_object(per_stage, local, group=state.pp_group)
    merged: dict[str, torch.Tensor] = {}
    for stage in per_stage:
        merged.update(stage)
    return merged
