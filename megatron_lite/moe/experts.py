"""The experts of one MoE layer: this rank's E/EP experts as grouped weights, run as one grouped GEMM.

Weights (full shapes; ``ParamMeta.expert_parallel``: dim 0 is split over EP, ``tp_shard_dim`` over
ETP):

    fc1.weight  [E, 2·f, h] (SwiGLU: [gate; up] stacked, stride 2) or [E, f, h]   (ETP: dim 1)
    fc2.weight  [E, h, f]                                                          (ETP: dim 2)

so expert e is ``fc2[e] · act(fc1[e] · x)``, nn.Linear's [out, in] per expert (HF Mixtral: fc1[e] =
[w1; w3], fc2[e] = w2). Rows arrive sorted by expert with ``counts`` per local expert
(dispatch.py). The GEMM is torch's grouped matmul (``torch.nn.functional.grouped_mm``) where the
build has it and the shapes suit it, else a loop over experts (the reference). Either way the
weight gradients go through tensor_parallel/weight_grad.py as the linear layers' do: into the fp32
``main_grad`` (gradient-accumulation fusion) or deferred by the zero-bubble schedules' split backward.

With FP8 (``training.fp8_format``; fp8/model.py:FP8Model.enable sets ``GroupedExperts.fp8``) the
three GEMMs of each grouped linear run on FP8 operands: per-token activations and gradients,
per-expert weights (fp8/grouped.py says why that scaling, and not a tensor-wide one, is the single
rank's in every layout).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..fp8.grouped import GroupedFP8, grouped_mm, weight_grad_operands
from ..fp8.tensor import Float8
from ..parallel.collectives import TPGroup
from ..tensor_parallel import ParamMeta, new_parameter
from ..tensor_parallel.weight_grad import weight_grad

_grouped_mm = getattr(F, "grouped_mm", None)


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped GEMM needs 16-byte aligned strides (and no autograd: we run our own)."""
    if _grouped_mm is None:
        return False
    align = 16 // x.element_size()
    return all(n % align == 0 for n in (x.shape[-1], *weight.shape[1:])) and x.dtype == weight.dtype


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transpose: bool = True) -> torch.Tensor:
    """Per group g of ``counts`` rows: x_g · weight[g]ᵀ (``transpose``) or x_g · weight[g].
    x [M, in], weight [G, out, in] -> [M, out] (or [G, in, out] -> [M, out] without transpose)."""
    w = weight.transpose(1, 2) if transpose else weight
    if _use_grouped_mm(x, w) and x.shape[0] > 0:
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return _grouped_mm(x, w, offs=offsets)
    return loop_matmul(x, w, counts)


def loop_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The reference: x_g · w[g] for each group, concatenated. w [G, in, out]."""
    out = x.new_empty((x.shape[0], w.shape[2]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(x[start : start + n], w[g], out=out[start : start + n])
        start += n
    return out


class GroupedWeightGrad:
    """dW[g] = dy_gᵀ x_g for every group of rows: ``grad_output`` [M, out], ``inputs`` [M, in]
    (weight_grad.py's WeightGradWork for a [G, out, in] weight)."""

    def __init__(self, grad_output: torch.Tensor, inputs: torch.Tensor, counts: list[int]):
        self.grad_output, self.inputs, self.counts = grad_output, inputs, counts

    def _groups(self):
        start = 0
        for g, n in enumerate(self.counts):
            yield g, self.grad_output[start : start + n], self.inputs[start : start + n]
            start += n

    def write_to(self, main_grad: torch.Tensor) -> None:
        for g, dy, x in self._groups():
            if x.shape[0] == 0:
                main_grad[g].zero_()
            elif x.dtype == main_grad.dtype:
                torch.mm(dy.t(), x, out=main_grad[g])
            else:
                main_grad[g].copy_(torch.mm(dy.t(), x))

    def add_to(self, main_grad: torch.Tensor) -> None:
        for g, dy, x in self._groups():
            if x.shape[0] == 0:
                continue
            if x.dtype == main_grad.dtype:
                main_grad[g].addmm_(dy.t(), x)
            else:
                main_grad[g].add_(torch.mm(dy.t(), x))

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.write_to(grad)
        return grad


class _GroupedLinear(torch.autograd.Function):
    """y = per group x_g · W[g]ᵀ; the weight gradient through weight_grad.py."""

    @staticmethod
    def forward(ctx, x, weight, counts):
        ctx.weight, ctx.counts = weight, counts
        ctx.save_for_backward(x)
        return grouped_matmul(x, weight, counts)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grouped_matmul(grad_y, ctx.weight, ctx.counts, transpose=False) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(ctx.weight, GroupedWeightGrad(grad_y, x, ctx.counts))
        return grad_x, grad_w, None


class _GroupedLinearFP8(torch.autograd.Function):
    """``_GroupedLinear`` on FP8 operands (fp8/grouped.py): ``x_q``, x already quantised (the FP8
    dispatch's rows) or None; ``k_split``: (x's K, dy's K) split over ETP."""

    @staticmethod
    def forward(ctx, x, weight, counts, fp8: GroupedFP8, x_q, k_split):
        x_q = fp8.tokens(x, k_split=k_split[0]) if x_q is None else x_q
        ctx.weight_q = fp8.weight(weight)
        ctx.weight, ctx.counts, ctx.fp8, ctx.x_q, ctx.k_split = weight, counts, fp8, x_q, k_split
        return grouped_mm(x_q, ctx.weight_q, counts, x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        grad_q = ctx.fp8.tokens(grad_y, backward=True, k_split=ctx.k_split[1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_q, ctx.weight_q, ctx.counts, grad_y.dtype, transpose=True)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(ctx.weight, GroupedWeightGrad(*weight_grad_operands(grad_q, ctx.x_q), ctx.counts))
        return grad_x, grad_w, None, None, None, None


def grouped_linear(x: torch.Tensor, weight: nn.Parameter, counts: list[int], fp8: Optional[GroupedFP8] = None,
                   x_q: Optional[Float8] = None, k_split: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """x [M, in] (rows sorted by group, ``counts`` per group), weight [G, out, in] -> [M, out];
    with ``fp8`` its GEMMs in FP8 (``_GroupedLinearFP8``)."""
    if fp8 is not None:
        return _GroupedLinearFP8.apply(x, weight, counts, fp8, x_q, k_split)
    return _GroupedLinear.apply(x, weight, counts)


class GroupedExperts(nn.Module):
    """This rank's experts: forward(rows [M, h], counts per local expert) -> [M, h] (partial sums over
    ETP when ETP > 1). ``ep``/``etp``: the expert-parallel and expert-tensor-parallel groups."""

    def __init__(self, cfg: ModelConfig, ep: TPGroup, etp: TPGroup):
        super().__init__()
        moe = cfg.moe
        ffn = (moe.ffn_hidden_size or cfg.ffn_hidden_size or 4 * cfg.hidden_size) // etp.size
        local = moe.num_experts // ep.size
        self.swiglu = cfg.activation == "swiglu"
        self.etp = etp
        self.fp8: Optional[GroupedFP8] = None  # FP8 GEMMs when set (fp8/model.py:FP8Model.enable)
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        stride = 2 if self.swiglu else 1
        meta = ParamMeta(expert_parallel=True, tp_shard_dim=1, tp_shard_stride=stride, init_std=cfg.init_std)
        self.fc1 = nn.Module()
        self.fc1.weight = new_parameter((local, stride * ffn, cfg.hidden_size), meta)
        self.fc2 = nn.Module()
        self.fc2.weight = new_parameter((local, cfg.hidden_size, ffn),
                                        ParamMeta(expert_parallel=True, tp_shard_dim=2, init_std=std_out))

    def forward(self, rows: torch.Tensor, counts: list[int], rows_fp8: Optional[Float8] = None) -> torch.Tensor:
        """``rows_fp8``: the rows already quantised (FP8 dispatch), used by fc1 with FP8 on. Under
        ETP fc1's output features and fc2's input features are split (``k_split``)."""
        y = grouped_linear(rows, self.fc1.weight, counts, self.fp8, rows_fp8, (False, True))
        y = ops.swiglu(y) if self.swiglu else ops.bias_gelu(y, None)
        return grouped_linear(y, self.fc2.weight, counts, self.fp8, None, (True, False))
