"""FP8 over the wire: the sequence-parallel all-gather of a column-parallel layer's input sent as
FP8 bytes (half of bf16's, a quarter of fp32's) instead of the high-precision activations.

The shard is quantised with the scale of the whole gathered tensor (its amax reduced over TP, or
delayed scaling's scale, the same on every rank), so the gathered bytes are exactly the bytes the
single rank would have quantised, and only the bytes travel: one scale serves every shard. gloo
refuses float8 dtypes, so they travel as uint8 (a view, no copy) on every backend.
"""

from __future__ import annotations

import torch

from ..parallel.collectives import TPGroup, Work, all_gather
from .tensor import Float8


def all_gather_fp8(q: Float8, dim: int, tp: TPGroup, async_op: bool = False) -> tuple[Float8, Work]:
    """Concatenate every TP rank's tensor-wide-scaled ``q`` along ``dim``; (gathered, work or None)."""
    assert q.granularity == "tensorwise", "only a tensor-wide scale is shared by every shard"
    data, work = all_gather(q.data.view(torch.uint8), dim, tp, async_op=async_op)
    return Float8(data.view(q.data.dtype), q.inv_scale), work
