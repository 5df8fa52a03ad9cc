"""The FP8 GEMMs of the MoE experts' grouped linears (moe/experts.py): y_g = x_g · W[g]ᵀ for each
expert g's rows, its input gradient dx_g = dy_g · W[g] and its weight gradient dW[g] = dy_gᵀ · x_g,
from operands quantised by fp8/tensor.py (``quantize``, ``mm``, ``Float8``: the linears' pieces).

Scaling (the same for every ``training.fp8_recipe``; docs/fp8.md says why):

- activations and output gradients: one scale per token row (rowwise over the GEMM's K: the hidden
  features, or the expert's ffn features);
- weights: one scale per expert, over that expert's whole [out, in] matrix.

Why not a tensor-wide scale per expert and call: the rows of one grouped GEMM are the tokens routed
to the expert by every rank of the EP group, and EP spans DP, so one GEMM mixes tokens of microbatches
that the single rank runs in different GEMMs; no reduction over process groups can give each of them
the single rank's per-GEMM amax. A token's row, in contrast, is whole on one rank in every layout
(TP > 1 needs SP; CP splits sequences, not rows), so its scale is the single rank's with no
communication, except where ETP splits the row's K (fc2's input, fc1's output gradient: the amax is
reduced over ETP, whose ranks hold the same rows in the same order), and an expert's weight is whole
on one EP rank (its amax reduced over ETP when ETP splits it). A per-token scale also lets the
dispatcher quantise the rows before the all-to-all (moe/dispatch.py: FP8 dispatch), exactly.

The weight gradient contracts over tokens, along which these scales vary: dW[g] = Σ_n s_n · dyq_n ⊗ xq_n
with s_n = inv_scale(dy_n) · inv_scale(x_n), computed from the same FP8 values as the other two GEMMs
(the per-token factor folded into dy's fp32 values), through tensor_parallel/weight_grad.py
(``GroupedWeightGrad``: main_grad fusion, the zero-bubble schedules' deferred weight gradients).
On a GPU that product needs a kernel with scales along K (DeepGEMM-style); torch's ``_scaled_mm`` has
none, so there it runs as a high-precision GEMM of the FP8 values (the numerics are FP8's, the speed
is not).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .recipe import Recipe
from .tensor import Float8, mm, quantize


class GroupedFP8:
    """The FP8 state of one MoE layer's experts: the recipe (formats, margin) and the expert-TP
    process group (None: ETP = 1). Amaxes are never reduced over EP, TP, CP or DP (module docstring)."""

    def __init__(self, recipe: Recipe, etp_group: Optional[dist.ProcessGroup]):
        self.recipe, self.etp_group = recipe, etp_group

    def tokens(self, x: torch.Tensor, backward: bool = False, k_split: bool = False) -> Float8:
        """x [M, K] with one scale per row (token); ``k_split``: K is split over ETP (the amax is
        reduced over it). ``backward``: a gradient (e5m2 under ``hybrid``)."""
        r = self.recipe
        dtype = r.backward_dtype if backward else r.forward_dtype
        return quantize(x.detach(), dtype, "rowwise", margin=r.margin, amax_groups=[self.etp_group] if k_split else ())

    def weight(self, w: torch.Tensor) -> Float8:
        """w [G, out, in] with one scale per expert (inv_scale [G, 1]); ETP splits every expert
        weight, so its amax is reduced over ETP."""
        q = quantize(w.detach().reshape(w.shape[0], -1), self.recipe.forward_dtype, "rowwise",
                     margin=self.recipe.margin, amax_groups=[self.etp_group])
        return Float8(q.data.view(w.shape), q.inv_scale, "rowwise")


def _expert_operand(w: Float8, g: int, transpose: bool) -> Float8:
    """Expert g's weight as a GEMM operand [N, K]: W[g] [out, in] (forward) or W[g]ᵀ [in, out]
    (input gradient), its bytes as they are, its one scale on every row."""
    data = w.data[g].t() if transpose else w.data[g]
    values = None if w.values is None else (w.values[g].t() if transpose else w.values[g])
    return Float8(data, w.inv_scale[g].expand(data.shape[0], 1), "rowwise", values=values)


def grouped_mm(a: Float8, w: Float8, counts: list[int], out_dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
    """Per group g of ``counts`` rows of the rowwise operand a [M, K]: a_g · W[g]ᵀ, or a_g · W[g] with
    ``transpose`` (w [G, N, K], or [G, K, N]) -> [M, N] in ``out_dtype``."""
    n_out = w.data.shape[2] if transpose else w.data.shape[1]
    out = torch.empty((a.data.shape[0], n_out), dtype=out_dtype, device=a.data.device)
    values, start = a.fp32_data(), 0
    for g, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            a_g = Float8(a.data[rows], a.inv_scale[rows], "rowwise", values=values[rows])
            out[rows] = mm(a_g, _expert_operand(w, g, transpose), out_dtype)
        start += n
    return out


def weight_grad_operands(grad_q: Float8, x_q: Float8) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [M, out], x [M, in]) in fp32 whose per-group product dy_gᵀ x_g is Σ_n s_n · dyq_n ⊗ xq_n
    (module docstring): the FP8 values, with both rows' scales folded into dy's."""
    return grad_q.fp32_data() * (grad_q.inv_scale * x_q.inv_scale), x_q.fp32_data()
