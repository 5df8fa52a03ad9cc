"""How a tensor-parallel parameter relates to its full (unsharded) tensor.

A parameter's ``meta.tp_shard_dim`` is the dimension split over TP ranks (None when replicated) and
``meta.tp_shard_stride`` how many stacked sub-matrices the full tensor holds along that dimension,
each split separately (2 for SwiGLU's fused [gate; up] weight). The full tensor is the same whatever
the TP size, so initialisation and checkpoints are layout-independent.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

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


class Cut(NamedTuple):
    """One split of a parameter's full tensor: along ``dim`` (``stride`` stacked blocks, each cut
    separately) into ``size`` pieces, of which this rank holds piece ``rank``; ``group``: which
    process group the pieces lie across ("tp", "ep" or "etp")."""

    dim: int
    stride: int
    rank: int
    size: int
    group: str


def shard_cuts(meta, tp: TPGroup, experts=None) -> list[Cut]:
    """Every split of a parameter with ``meta``, outermost first. Dense: TP along ``tp_shard_dim``.
    Experts (``meta.expert_parallel``; ``experts`` an ExpertGroups, None in a single process): EP along
    dim 0, then ETP along ``tp_shard_dim``."""
    if not meta.expert_parallel:
        return [] if meta.tp_shard_dim is None else [Cut(meta.tp_shard_dim, meta.tp_shard_stride, tp.rank, tp.size, "tp")]
    ep, etp = (experts.ep, experts.etp) if experts is not None else (TPGroup(), TPGroup())  # None: one process
    cuts = [Cut(0, 1, ep.rank, ep.size, "ep")]
    if meta.tp_shard_dim is not None:
        cuts.append(Cut(meta.tp_shard_dim, meta.tp_shard_stride, etp.rank, etp.size, "etp"))
    return cuts


def full_shape_of(local_shape, cuts: list[Cut]) -> tuple[int, ...]:
    shape = list(local_shape)
    for cut in cuts:
        shape[cut.dim] *= cut.size
    return tuple(shape)


def shard_by_cuts(full: torch.Tensor, cuts: list[Cut]) -> torch.Tensor:
    """This rank's piece of ``full`` after every cut (``shard_tensor`` applied in turn)."""
    for cut in cuts:
        full = shard_tensor(full, cut.dim, cut.stride, cut.rank, cut.size)
    return full


def gather_by_cuts(shard: torch.Tensor, cuts: list[Cut], groups: dict[str, TPGroup]) -> torch.Tensor:
    """Inverse of ``shard_by_cuts`` (collective over each cut's group in ``groups``, innermost first):
    a new tensor."""
    shard = shard.detach().clone()
    for cut in reversed(cuts):
        shard = gather_full(shard, cut.dim, cut.stride, groups[cut.group])
    return shard
