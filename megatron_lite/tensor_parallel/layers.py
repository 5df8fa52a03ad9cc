"""Column- and row-parallel linear layers, the output layer and the vocab-parallel embedding
(Shoeybi et al. 2019).

A column-parallel linear splits the output features over TP ranks (weight [out/t, in]); a row-parallel
linear splits the input features (weight [out, in/t]) and sums the partial products. An MLP or an
attention block is column → (local math) → row, with one all-reduce forward and one backward. With
sequence parallelism the activations between blocks are split along the sequence instead of
replicated: the column layer all-gathers its input along the sequence and the row layer
reduce-scatters its output (Korthikanti et al. 2022).

Both linears run one autograd function, ``linear``, whose backward writes the weight gradient
itself (into the fp32 ``main_grad``, or deferred: weight_grad.py) and, for a column-parallel layer,
does the input's TP communication overlapped with its GEMMs:

- under SP the forward all-gathers the [b, s/t, in] shard, uses the gathered input and keeps only the
  shard for the backward (Megatron's choice: (t − 1)/t of the input's memory saved per layer); the
  backward starts the all-gather again, computes the input gradient meanwhile, waits, then starts the
  reduce-scatter of the input gradient and computes the weight gradient meanwhile;
- without SP the input gradient's all-reduce (Megatron's f) runs during the weight-gradient GEMM.

Overlap is what the backend gives asynchronous collectives: on NCCL they run on their own stream
while the GEMM runs on the compute stream (Megatron sets CUDA_DEVICE_MAX_CONNECTIONS=1 so that the
collective is scheduled first); on gloo they run on gloo's background thread.

Parameters are created empty with their ``ParamMeta`` (param_meta.py); the model initialises every
full tensor from a seed and keeps this rank's shard.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.collectives import (
    SEQ_DIM,
    TPGroup,
    all_gather,
    all_reduce,
    reduce_from_tp,
    reduce_scatter,
    reduce_scatter_to_sp,
    scatter_to_sp,
)
from ..fp8.comm import all_gather_fp8
from ..fp8.linear import Float8Gemm, LinearFP8
from ..fp8.tensor import Float8
from .param_meta import ParamMeta, new_parameter
from .weight_grad import EmbeddingWeightGrad, Float8WeightGrad, LinearWeightGrad, weight_grad

# What a linear layer does with its input's TP communication (``linear``'s ``input_comm``).
LOCAL_INPUT = "local"  # none: a row-parallel layer's input is already split
REPLICATED_INPUT = "replicated"  # replicated over TP: the input gradient is all-reduced
SEQUENCE_SHARDED_INPUT = "sequence_sharded"  # [b, s/t, in]: all-gathered, input gradient reduce-scattered


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tp, input_comm, notify, fp8):
        ctx.weight, ctx.tp, ctx.input_comm, ctx.notify, ctx.fp8 = weight, tp, input_comm, notify, fp8
        ctx.has_bias = bias is not None
        sharded = input_comm == SEQUENCE_SHARDED_INPUT
        # Kept for the backward: x (under SP the shard, gathered again in the backward), or under FP8
        # with a tensor-wide scale its quantised bytes (the all-gathers then move FP8).
        kept = x if fp8 is None else fp8.keep_input(x, sharded, tp.group)
        if isinstance(kept, Float8):
            ctx.kept_fp8 = kept
        else:
            ctx.save_for_backward(kept)
        full = _gather_input(kept, tp)[0] if sharded else kept
        if fp8 is None:
            return F.linear(full, weight, bias)
        return fp8.forward(full, weight, bias, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.kept_fp8 if hasattr(ctx, "kept_fp8") else ctx.saved_tensors[0]
        weight, tp, comm, fp8 = ctx.weight, ctx.tp, ctx.input_comm, ctx.fp8
        gathering = None
        if comm == SEQUENCE_SHARDED_INPUT:
            x, gathering = _gather_input(x, tp, async_op=True)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight) if fp8 is None else fp8.input_grad(grad_y, weight)
        if gathering is not None:
            gathering.wait()
        reducing = None
        if grad_x is not None and comm == SEQUENCE_SHARDED_INPUT:
            grad_x, reducing = reduce_scatter(grad_x, SEQ_DIM, tp, async_op=True)
        elif grad_x is not None and comm == REPLICATED_INPUT:
            grad_x, reducing = all_reduce(grad_x, tp, async_op=True)
        grad_w = grad_b = None
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[1]:
            if fp8 is None:
                work = LinearWeightGrad(grad_2d, x.reshape(-1, x.shape[-1]))
            else:
                work = Float8WeightGrad(*fp8.weight_grad_operands(grad_2d, x))
            grad_w = weight_grad(weight, work, ctx.notify)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        if reducing is not None:
            reducing.wait()
        return grad_x, grad_w, grad_b, None, None, None, None


def _gather_input(x: torch.Tensor | Float8, tp: TPGroup, async_op: bool = False):
    """All-gather a sequence-sharded input along the sequence (FP8 bytes when quantised)."""
    if isinstance(x, Float8):
        return all_gather_fp8(x, SEQ_DIM, tp, async_op=async_op)
    return all_gather(x, SEQ_DIM, tp, async_op=async_op)


def linear(x: torch.Tensor, weight: nn.Parameter, bias: Optional[torch.Tensor], tp: TPGroup,
           input_comm: str = LOCAL_INPUT, notify: bool = True, fp8: Optional[Float8Gemm] = None) -> torch.Tensor:
    """y = x Wᵀ (+ b) with the weight gradient written by weight_grad.py (``notify``: see
    ``weight_grad``) and the input's TP communication ``input_comm`` (module docstring). x: [b, s, in]
    ([b, s/t, in] when sequence-sharded); y: [b, s, out_local]. ``fp8``: this call's FP8 GEMMs
    (fp8/linear.py), None for high precision."""
    if tp.size == 1:
        input_comm = LOCAL_INPUT
    return _Linear.apply(x, weight, bias, tp, input_comm, notify, fp8)


def _divide(n: int, tp: TPGroup, what: str) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {tp.size}")
    return n // tp.size


def _fp8_gemm(layer: nn.Module) -> Optional[Float8Gemm]:
    """This call's FP8 GEMMs when the layer runs in FP8 (``layer.fp8``, set by fp8/model.py)."""
    return None if layer.fp8 is None else layer.fp8.gemm(record=layer.training)


def _column_input(tp: TPGroup) -> str:
    return SEQUENCE_SHARDED_INPUT if tp.sequence_parallel else REPLICATED_INPUT


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ + b with A split by rows (output features) over the TP group.

    Input: [b, s, in], replicated over TP (or [b, s/t, in] with sequence parallelism, gathered here).
    Output: [b, s, out/t] on each TP rank.
    ``stride`` > 1 declares the full weight as that many stacked blocks, each split separately.
    ``skip_bias_add`` returns the bias instead of adding it, for a fused bias + activation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TPGroup,
        bias: bool = True,
        stride: int = 1,
        init_std: float = 0.02,
        skip_bias_add: bool = False,
    ):
        super().__init__()
        self.tp, self.skip_bias_add = tp, skip_bias_add
        self.fp8: Optional[LinearFP8] = None  # FP8 GEMMs when set (fp8/model.py:FP8Model.enable)
        out_local = _divide(out_features, tp, "output features")
        self.weight = new_parameter((out_local, in_features), ParamMeta(tp_shard_dim=0, tp_shard_stride=stride, init_std=init_std))
        self.bias = None
        if bias:
            self.bias = new_parameter((out_local,), ParamMeta(tp_shard_dim=0, tp_shard_stride=stride, init_value=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        bias = None if self.skip_bias_add else self.bias
        y = linear(x, self.weight, bias, self.tp, _column_input(self.tp), fp8=_fp8_gemm(self))
        return (y, self.bias) if self.skip_bias_add else y


class ParallelLMHead(nn.Module):
    """The output layer: a column-parallel linear over the vocabulary, without bias.

    forward(x, weight): x [b, s, h] ([b, s/t, h] under SP) -> this rank's logits [b, s, V/t], never
    gathered (the vocab-parallel cross-entropy reads them as they are). ``weight`` [V/t, h] is passed
    in because the chunk holds it under its checkpoint name: its own ``output``, the embedding's
    (``borrows_weight``: tied on the same stage; the embedding's own backward, which comes later,
    reports the gradient ready) or the tied copy ``output_weight`` of a later stage.
    """

    def __init__(self, tp: TPGroup, borrows_weight: bool = False):
        super().__init__()
        self.tp, self.borrows_weight = tp, borrows_weight

    def forward(self, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        return linear(x, weight, None, self.tp, _column_input(self.tp), notify=not self.borrows_weight)


class RowParallelLinear(nn.Module):
    """y = x Aᵀ + b with A split by columns (input features) over the TP group.

    Input: [b, s, in/t], already split (the output of a column-parallel layer).
    Output: [b, s, out] summed over TP (all-reduce), or [b, s/t, out] with sequence parallelism
    (reduce-scatter). The bias is replicated and added after the reduction; under sequence
    parallelism its gradient is partial on each TP rank (``grad_summed_over_tp``; optim/grads.py
    sums it).
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.tp = tp
        self.fp8: Optional[LinearFP8] = None  # FP8 GEMMs when set (fp8/model.py:FP8Model.enable)
        in_local = _divide(in_features, tp, "input features")
        self.weight = new_parameter((out_features, in_local), ParamMeta(tp_shard_dim=1, init_std=init_std))
        self.bias = None
        if bias:
            meta = ParamMeta(init_value=0.0, grad_summed_over_tp=tp.sequence_parallel)
            self.bias = new_parameter((out_features,), meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8 = _fp8_gemm(self)
        if self.tp.size == 1:  # nothing to reduce: the bias joins the GEMM (addmm)
            return linear(x, self.weight, self.bias, self.tp, fp8=fp8)
        y = linear(x, self.weight, None, self.tp, fp8=fp8)
        y = reduce_scatter_to_sp(y, self.tp) if self.tp.sequence_parallel else reduce_from_tp(y, self.tp)
        return y if self.bias is None else y + self.bias


class _EmbeddingLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.weight = weight
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        work = EmbeddingWeightGrad(ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, weight_grad(ctx.weight, work)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over TP: rank r holds rows [r·V/t, (r+1)·V/t).

    forward(ids [b, s], positions=None): each rank looks up the ids it owns, zeroes the others, and
    the partial embeddings are summed over TP: all-reduce → [b, s, h], or with sequence parallelism
    reduce-scatter → [b, s/t, h]. ``positions`` [s, h] (learned position embeddings, replicated) are
    added after the sum, split by sequence under SP. The weight gradient goes to weight_grad.py
    (rows added with ``index_add_``, never a dense [V/t, h] gradient per microbatch).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, meta: ParamMeta):
        super().__init__()
        self.tp = tp
        rows = _divide(vocab_size, tp, "padded vocabulary size")
        self.vocab_start, self.vocab_end = tp.rank * rows, (tp.rank + 1) * rows
        self.weight = new_parameter((rows, hidden_size), meta.replace(tp_shard_dim=0))

    def forward(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.tp.size == 1:
            x = _EmbeddingLookup.apply(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            partial = _EmbeddingLookup.apply(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            x = reduce_scatter_to_sp(partial, self.tp) if self.tp.sequence_parallel else reduce_from_tp(partial, self.tp)
        if positions is None:
            return x
        if self.tp.sequence_parallel:
            positions = scatter_to_sp(positions.unsqueeze(0), self.tp)
        return x + positions
