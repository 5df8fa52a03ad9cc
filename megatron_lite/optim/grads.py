"""Gradient accumulation in fp32 and the reductions that finish a step's gradients.

``GradBuffer`` gives every parameter a ``main_grad``: an fp32 view into one flat buffer per rank.
A post-accumulate hook adds each microbatch's ``param.grad`` (fp32, bf16 or fp16) into it and frees
``param.grad``, so gradients accumulate over microbatches in fp32 whatever the model dtype, and the
data-parallel reduction is a few large bucketed collectives on the flat buffer.

``finalize_grads`` runs once per step after the last microbatch's backward, in this order:
  1. sequence-parallel grads (norms, row-parallel biases) summed over the TP group;
  2. tied embedding: the first stage's embedding and the last stage's output copy summed over the
     embedding group;
  3. data parallelism: every bucket averaged over the DP group.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.state import ParallelState

DEFAULT_BUCKET_ELEMENTS = 40_000_000  # 160 MB of fp32 per bucket, Megatron's order of magnitude


class GradBuffer:
    """fp32 gradients of ``params`` in one flat tensor, cut into buckets (in reverse parameter order,
    roughly the order in which the backward produces them)."""

    def __init__(self, params: Iterable[nn.Parameter], bucket_elements: int = DEFAULT_BUCKET_ELEMENTS):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradBuffer needs at least one trainable parameter")
        device = self.params[0].device
        total = sum(p.numel() for p in self.params)
        self.data = torch.zeros(total, dtype=torch.float32, device=device)
        self.buckets: list[tuple[int, int]] = []
        offset, bucket_start = 0, 0
        for p in reversed(self.params):
            p.main_grad = self.data[offset : offset + p.numel()].view(p.shape)
            p.register_post_accumulate_grad_hook(_accumulate_into_main_grad)
            offset += p.numel()
            if offset - bucket_start >= bucket_elements:
                self.buckets.append((bucket_start, offset))
                bucket_start = offset
        if bucket_start < offset:
            self.buckets.append((bucket_start, offset))

    def zero(self) -> None:
        self.data.zero_()

    def all_reduce_mean(self, group: dist.ProcessGroup, size: int) -> None:
        """Average every bucket over ``group`` (the data-parallel group)."""
        if size == 1:
            return
        for start, end in self.buckets:
            bucket = self.data[start:end]
            dist.all_reduce(bucket, group=group)
            bucket.div_(size)


def _accumulate_into_main_grad(param: nn.Parameter) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


def _sum_over(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """All-reduce (sum) the main_grads of ``params`` over ``group`` as one flat tensor."""
    if not params:
        return
    flat = torch.cat([p.main_grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    for p, reduced in zip(params, flat.split([p.numel() for p in params])):
        p.main_grad.copy_(reduced.view(p.shape))


def finalize_grads(buffer: GradBuffer, state: ParallelState, sequence_parallel: bool) -> None:
    """Steps 1–3 of the module docstring, on ``buffer``'s main_grads."""
    if sequence_parallel and state.tp_size > 1:
        _sum_over([p for p in buffer.params if getattr(p, "sequence_parallel", False)], state.tp_group)
    if state.pp_size > 1 and state.in_embedding_group:
        _sum_over([p for p in buffer.params if getattr(p, "shared_embedding", False)], state.embedding_group)
    buffer.all_reduce_mean(state.dp_group, state.dp_size)
