"""After each step: the MoE layers' statistics, summed over the stage, and the expert-bias update.

Every MoE layer's router and layer count, per step and rank, the tokens each expert received, the
aux / z-loss shares and the assignments dropped over capacity (counted once per microbatch: not in
evaluation, not again when recomputation repeats a forward). ``after_step`` sums them over TP × CP ×
DP of the stage (one all-reduce per stage), moves the expert biases (identical on every rank, since
all hold the same sums), and returns per layer:

    moe/layers.<i>/aux_loss          the balancing loss, mean over the step's microbatches
    moe/layers.<i>/z_loss            the router z-loss, likewise
    moe/layers.<i>/load_imbalance    max / mean of the tokens per expert over the global batch
    moe/layers.<i>/dropped_fraction  assignments dropped over capacity / all assignments
    moe/layers.<i>/tokens_per_expert the counts themselves (a list; metrics.jsonl only)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..parallel.collectives import all_reduce
from .groups import ExpertGroups
from .layer import MoE


def moe_layers(chunks) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer in ``chunks`` (global layer names)."""
    return [(name, m) for chunk in chunks for name, m in chunk.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def after_step(chunks, groups: ExpertGroups, microbatches: int) -> dict[str, float]:
    """Sum this step's statistics over the stage, update the expert biases, reset the counters and
    return the metrics above. ``microbatches``: of the whole global batch (per-DP × DP)."""
    layers = moe_layers(chunks)
    if not layers:
        return {}
    rows = [torch.cat((m.router.tokens_per_expert, torch.stack((m.router.aux_loss, m.router.z_loss, m.dropped,
                                                                  m.assigned)))) for _, m in layers]
    flat = all_reduce(torch.cat(rows), groups.stage)[0]
    out = {}
    for (name, m), row in zip(layers, flat.split([r.numel() for r in rows])):
        counts, (aux, z, dropped, assigned) = row[:-4], row[-4:].tolist()
        m.router.update_expert_bias(counts.to(torch.float32))
        key = f"moe/{name.removesuffix('.mlp')}/"
        out[key + "aux_loss"] = aux / microbatches
        out[key + "z_loss"] = z / microbatches
        out[key + "load_imbalance"] = (counts.max() / counts.mean().clamp_min(1e-12)).item()
        out[key + "dropped_fraction"] = dropped / max(assigned, 1.0)
        out[key + "tokens_per_expert"] = counts.long().tolist()
        m.router.reset_statistics()
        m.dropped.zero_()
        m.assigned.zero_()
    return out


def moe_metrics(local: dict[str, float], pp_group: Optional[dist.ProcessGroup], pp_size: int) -> dict[str, float]:
    """Every stage's ``after_step`` metrics on every rank of the pipeline group."""
    if pp_size == 1:
        return dict(local)
    stages: list = [None] * pp_size
    dist.all_gather_object(stages, local, group=pp_group)
    return {k: v for stage in stages for k, v in sorted(stage.items())}


def console_part(metrics: dict[str, float]) -> str:
    """The console line's MoE figures: each statistic's mean over the MoE layers."""
    def mean(stat: str) -> float:
        values = [v for k, v in metrics.items() if k.endswith("/" + stat)]
        return sum(values) / len(values)

    part = f"moe aux {mean('aux_loss'):.4g} z {mean('z_loss'):.3g} imbalance {mean('load_imbalance'):.2f}"
    dropped = mean("dropped_fraction")
    return part + (f" dropped {100 * dropped:.1f}%" if dropped else "")
