"""How a tensor-parallel parameter relates to its full (unsharded) tensor.

A parameter's ``meta.tp_shard_dim`` is the dimension split over TP ranks (None when replicated) and
``meta.tp_shard_stride`` how many stacked sub-matrices the full tensor holds along that dimension,
each split separately (2 for SwiGLU's fused [gate; up] weight). The full tensor is the same whatever
the TP size, so initialisation and checkpoints are layout-independent.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..parallel.collectives import TPGroup


def shard_tensor(full: torch.Tensor, dim: Optional[int], stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of ``full``: along ``dim``, each of the ``stride`` stacked blocks is cut into
    ``size`` pieces and piece ``rank`` of every block is kept, in block order."""
    if dim is None or size == 1:
        return full.clone()
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    """The shape of ``param``'s full tensor (its ``meta`` says which dimension is split)."""
    dim = param.meta.tp_shard_dim
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def gather_full(shard: torch.Tensor, dim: Optional[int], stride: int, tp: TPGroup) -> torch.Tensor:
    """Inverse of ``shard_tensor`` (collective over the TP group): the full tensor on every rank."""
    if dim is None or tp.size == 1:
        return shard.detach().clone()
    pieces = [torch.empty_like(shard) for _ in range(tp.size)]
    dist.all_gather(pieces, shard.detach().contiguous(), group=tp.group)
    per_rank_blocks = [p.chunk(stride, dim=dim) for p in pieces]
    blocks = [torch.cat([blocks[b] for blocks in per_rank_blocks], dim=dim) for b in range(stride)]
    return torch.cat(blocks, dim=dim)
