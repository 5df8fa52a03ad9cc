"""Gradient accumulation in fp32 and the reductions that finish a step's gradients.

``GradBuffer`` gives every parameter a ``main_grad``: an fp32 view into one flat buffer per rank
(tensor_parallel/weight_grad.py:attach_main_grad). The linear and embedding layers hand their
weight-gradient work to the buffer (``accumulate``: gradient-accumulation fusion, weight_grad.py);
for the other parameters (norms, biases, position embeddings) a post-accumulate hook takes each
microbatch's ``param.grad`` (fp32, bf16 or fp16) and frees it. Either way gradients accumulate over
microbatches in fp32 whatever the model dtype, and the data-parallel reduction is a few large
bucketed collectives on the flat buffer. A step's first contribution to a parameter overwrites its
``main_grad`` and later ones add to it, so the buffer is never zeroed as a whole: what no backward
wrote is zeroed by ``finish_accumulation`` (finalize_grads' first step).

The buffer is cut into buckets (in reverse parameter order, roughly the order in which the backward
produces gradients), each padded to a multiple of the DP size. The DP reduction is an all-reduce of
every bucket, or with the distributed optimizer a reduce-scatter after which DP rank r holds the
reduced r-th slice of each bucket (``shard_ranges``). With ``overlap``, a bucket's reduction starts
(asynchronously) as soon as the backward of the last microbatch has produced all its gradients
(every contribution is counted, also when a split backward runs the weight gradients later:
weight_grad.py:WeightGradStore).

``finalize_grads`` runs once per step after the last backward, in this order (after zeroing the
main_grads no backward wrote):
  1. tied embedding: the first stage's embedding and the last stage's output copy summed over the
     embedding group (before DP: their buckets sit at different offsets on the two stages, so they
     must be whole when this runs; those buckets are never reduced early);
  2. data parallelism: every bucket averaged over the DP group (waiting for early ones);
  3. sequence-parallel grads (norms, row-parallel biases: ``meta.grad_summed_over_tp``) summed over
     the TP group.
All three are sums or means, so their order does not change the result.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.collectives import all_gather_flat, reduce_scatter_flat
from ..parallel.state import ParallelState
from ..tensor_parallel.weight_grad import attach_main_grad

DEFAULT_BUCKET_ELEMENTS = 40_000_000  # 160 MB of fp32 (optimizer.grad_bucket_elements)


def overlaps_reduction(setting: Optional[bool], dp_group: Optional[dist.ProcessGroup]) -> bool:
    """``optimizer.overlap_grad_reduce`` resolved: ``setting`` when given; None means on where the
    reduction has a device of its own to run on, the NCCL backend (a separate CUDA stream), and off
    on gloo, whose reduction shares the CPU cores with the backward."""
    if setting is not None:
        return setting
    return dist.is_initialized() and dist.get_backend(dp_group) == dist.Backend.NCCL


class GradBuffer:
    """fp32 gradients of ``params`` in one flat tensor, cut into DP-shardable buckets.

    ``dp_group``/``dp_size``: the group the buckets are reduced over. ``reduce_scatter``: keep only
    this DP rank's reduced slice of each bucket (distributed optimizer) instead of all-reducing.
    ``grad_divisor``: what the sum over the group is divided by (None: ``dp_size``, the mean). Expert
    parameters (an MoE model's second buffer) are summed over the expert-data-parallel group and
    divided by DP × CP: their replicas together saw every token of the stage exactly once, and the
    dense gradients are means over DP × CP.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        dp_group: Optional[dist.ProcessGroup] = None,
        dp_size: int = 1,
        dp_rank: int = 0,
        reduce_scatter: bool = False,
        overlap: bool = False,
        bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
        grad_divisor: Optional[int] = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.grad_divisor = dp_size if grad_divisor is None else grad_divisor
        if not self.params:
            raise ValueError("GradBuffer needs at least one trainable parameter")
        self.dp_group, self.dp_size, self.dp_rank = dp_group, dp_size, dp_rank
        self.reduce_scatter, self.overlap = reduce_scatter, overlap

        # Layout: buckets of whole parameters, each padded to a multiple of dp_size.
        self.offsets: dict[nn.Parameter, tuple[int, int]] = {}
        self.buckets: list[tuple[int, int]] = []
        self.bucket_of: dict[nn.Parameter, int] = {}
        offset = bucket_start = 0
        for p in reversed(self.params):
            self.offsets[p] = (offset, offset + p.numel())
            self.bucket_of[p] = len(self.buckets)
            offset += p.numel()
            if offset - bucket_start >= bucket_elements or p is self.params[0]:
                offset = bucket_start + -(-(offset - bucket_start) // dp_size) * dp_size
                self.buckets.append((bucket_start, offset))
                bucket_start = offset
        self.data = torch.zeros(offset, dtype=torch.float32, device=self.params[0].device)
        for p, (start, end) in self.offsets.items():
            attach_main_grad(p, self.data[start:end].view(p.shape), self)
            p.register_post_accumulate_grad_hook(self._on_grad)

        self._members = [sum(1 for q in self.params if self.bucket_of[q] == b) for b in range(len(self.buckets))]
        # Buckets holding a tied embedding wait for the embedding-group sum (finalize_grads step 1).
        self.deferred = {self.bucket_of[p] for p in self.params if p.meta.grad_summed_over_embedding_group}
        self._expected = 0
        self._written: set[nn.Parameter] = set()  # parameters with a contribution since start_step
        self._fired: dict[nn.Parameter, int] = {}
        self._ready = [0] * len(self.buckets)
        self._pending: dict[int, tuple] = {}
        self.early_launches = 0

    # Layout ------------------------------------------------------------------------------------
    def shard_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of this DP rank's slice of every bucket, in buffer coordinates."""
        ranges = []
        for start, end in self.buckets:
            size = (end - start) // self.dp_size
            ranges.append((start + self.dp_rank * size, start + (self.dp_rank + 1) * size))
        return ranges

    # A step ------------------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Begin a step's accumulation (each parameter's first contribution will overwrite its
        main_grad); with overlap, a parameter is complete after ``num_microbatches`` backwards."""
        self._written = set()
        self._expected = num_microbatches
        self._fired = {p: 0 for p in self.params}
        self._ready = [0] * len(self.buckets)
        self._pending.clear()
        self.early_launches = 0  # buckets whose reduction started during the backward

    def accumulate(self, param: nn.Parameter, work, notify: bool = True) -> None:
        """A layer's weight-gradient work (weight_grad.py:WeightGradWork) into ``param.main_grad``;
        ``notify``: it completes this microbatch's gradient of ``param``."""
        if param in self._written:
            work.add_to(param.main_grad)
        else:
            work.write_to(param.main_grad)
            self._written.add(param)
        if notify:
            self._grad_ready(param)

    def _on_grad(self, param: nn.Parameter) -> None:
        """Post-accumulate hook: a gradient autograd produced goes into the buffer. (It also runs,
        with no gradient, for the weights whose layers hand their work to ``accumulate``.)"""
        if param.grad is None:
            return
        if param in self._written:
            param.main_grad.add_(param.grad)
        else:
            param.main_grad.copy_(param.grad)
            self._written.add(param)
        param.grad = None
        self._grad_ready(param)

    def finish_accumulation(self) -> None:
        """Zero the main_grads of parameters no backward wrote since ``start_step`` (they still hold
        an earlier step's values); after this every main_grad is this step's gradient."""
        for p in self.params:
            if p not in self._written:
                p.main_grad.zero_()
        self._written.update(self.params)

    def _grad_ready(self, param: nn.Parameter) -> None:
        """One microbatch's gradient of ``param`` is in ``main_grad``; start a complete bucket's reduction."""
        if not (self.overlap and self._expected):
            return
        self._fired[param] += 1
        if self._fired[param] == self._expected:
            bucket = self.bucket_of[param]
            self._ready[bucket] += 1
            if self._ready[bucket] == self._members[bucket] and bucket not in self.deferred:
                self._launch(bucket)
                self.early_launches += 1

    def _launch(self, bucket: int) -> None:
        if self.dp_size == 1 or bucket in self._pending:
            return
        start, end = self.buckets[bucket]
        data = self.data[start:end]
        if self.reduce_scatter:
            out = torch.empty(data.numel() // self.dp_size, dtype=data.dtype, device=data.device)
            work = reduce_scatter_flat(out, data, group=self.dp_group, async_op=True)
            self._pending[bucket] = (work, out)
        else:
            self._pending[bucket] = (dist.all_reduce(data, group=self.dp_group, async_op=True), None)

    def reduce(self) -> None:
        """Finish the DP mean of every bucket (launching those not started yet)."""
        if self.dp_size == 1:
            if self.grad_divisor != 1:
                self.data.div_(self.grad_divisor)
            return
        for bucket in range(len(self.buckets)):
            self._launch(bucket)
        shards = self.shard_ranges()
        for bucket, (work, out) in sorted(self._pending.items()):
            work.wait()
            start, end = self.buckets[bucket]
            if out is None:
                self.data[start:end].div_(self.grad_divisor)
            else:
                lo, hi = shards[bucket]
                self.data[lo:hi].copy_(out).div_(self.grad_divisor)
        self._pending.clear()


def _sum_over(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """All-reduce (sum) the main_grads of ``params`` over ``group`` as one flat tensor."""
    if not params:
        return
    flat = torch.cat([p.main_grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    for p, reduced in zip(params, flat.split([p.numel() for p in params])):
        p.main_grad.copy_(reduced.view(p.shape))


def finalize_grads(buffer: GradBuffer, state: ParallelState, experts: Optional[GradBuffer] = None) -> None:
    """Steps 1–3 of the module docstring, on ``buffer``'s main_grads; an MoE model's ``experts``
    buffer is reduced over the expert-data-parallel group (its only reduction)."""
    if experts is not None:
        experts.finish_accumulation()
        experts.reduce()
    buffer.finish_accumulation()
    if state.pp_size > 1 and state.in_embedding_group:
        _sum_over([p for p in buffer.params if p.meta.grad_summed_over_embedding_group], state.embedding_group)
    buffer.reduce()
    if state.tp_size > 1:
        _sum_over([p for p in buffer.params if p.meta.grad_summed_over_tp], state.tp_group)


def gather_params(buffer: GradBuffer, param_data: torch.Tensor, async_op: bool = False) -> dict:
    """All-gather every bucket of ``param_data`` (laid out like ``buffer``) from the DP rank that
    owns each slice: after a distributed-optimizer step, every rank holds every updated parameter.
    With ``async_op``, returns {bucket: work} to wait on; otherwise waits and returns {}."""
    works = {}
    if buffer.dp_size == 1:
        return works
    for bucket, ((start, end), (lo, hi)) in enumerate(zip(buffer.buckets, buffer.shard_ranges())):
        works[bucket] = all_gather_flat(
            param_data[start:end], param_data[lo:hi].clone(), group=buffer.dp_group, async_op=async_op
        )
    return works if async_op else {}
