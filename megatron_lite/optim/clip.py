"""The global gradient norm over TP × PP (× DP for sharded optimizer states), each gradient counted
once, and clipping by it. The norm's one all-reduce is also how the ranks agree that a step's
gradients are finite: it is inf/NaN on every rank of the group as soon as any element of any rank's
gradients is."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

# Elements per fp32 partial norm. A single fp32 norm over a 38 M-element gradient is ~1e-3 off the
# fp64 value; norms of 1024-element rows are exact to ~1e-7 each, and their squares are summed in
# fp64 (5e-10 off over gpt2_124m's gradients, at a tenth of the time of an fp64 norm).
NORM_ROW = 1024


@dataclass(frozen=True)
class NormRanks:
    """This rank's place in the groups a gradient is replicated over, for counting it once when the
    norm is summed over them. ``tp`` / ``etp``: TP and expert-TP rank; ``dense_replica`` /
    ``expert_replica``: the DP × CP rank and the expert-DP rank when the norm's group spans those
    replicas (an MoE model's norm is over the world: experts differ across EP ranks, which lie in
    DP), 0 when it does not (or the optimizer shards over them)."""

    tp: int = 0
    etp: int = 0
    dense_replica: int = 0
    expert_replica: int = 0


def counted_once(param: nn.Parameter, ranks: Union[int, NormRanks]) -> bool:
    """Whether this rank's copy of ``param`` enters the norm (``ranks``: a NormRanks or the TP rank):
    TP shards always; parameters replicated across TP only on TP rank 0; expert parameters likewise
    over ETP, and on the first expert-DP replica only; the last stage's tied copy of the embedding
    never (the first stage counts the embedding, whose gradient it equals after the embedding-group
    sum)."""
    ranks = ranks if isinstance(ranks, NormRanks) else NormRanks(tp=ranks)
    if not param.meta.counted_in_grad_norm:
        return False
    if param.meta.expert_parallel:
        return ranks.expert_replica == 0 and (param.meta.tp_shard_dim is not None or ranks.etp == 0)
    return ranks.dense_replica == 0 and (param.meta.tp_shard_dim is not None or ranks.tp == 0)


def global_grad_norm(
    grads: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup], uncounted: Iterable[torch.Tensor] = ()
) -> float:
    """sqrt(Σ‖g‖²) over ``grads`` on every rank of ``group`` (None: the whole world); NaN or inf on
    every rank if any element of ``grads`` or ``uncounted`` (this rank's other gradients, not part of
    the norm) on any rank is not finite."""
    grads = list(grads)
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        squares += _sum_of_squares(g)
    for g in uncounted:  # adds 0 when g is finite, NaN when it holds an inf or NaN
        squares += torch.sum(g, dtype=torch.float64) * 0.0
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(squares, group=group)
    return math.sqrt(squares.item())


def _sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """Σ g² in fp64, from fp32 norms of NORM_ROW-element rows (no fp64 copy of the gradient)."""
    flat = g.reshape(-1)
    rows = flat.numel() // NORM_ROW
    body = flat[: rows * NORM_ROW].view(rows, NORM_ROW)
    total = torch.linalg.vector_norm(body, dim=1, dtype=torch.float32).double().square().sum()
    if flat.numel() > rows * NORM_ROW:
        total = total + torch.linalg.vector_norm(flat[rows * NORM_ROW :], dtype=torch.float64) ** 2
    return total


def clip_by_norm(grads: Iterable[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale ``grads`` in place so their global norm is at most ``max_norm`` (0 disables)."""
    if max_norm <= 0 or not math.isfinite(norm):
        return
    coefficient = max_norm / (norm + 1e-6)
    grads = list(grads)
    if coefficient < 1.0 and grads:
        torch._foreach_mul_(grads, coefficient)
