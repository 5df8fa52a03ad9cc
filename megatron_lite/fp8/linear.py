"""The FP8 GEMMs of one linear layer, y = x Wᵀ: the forward, the input gradient dx = dy W and the
weight gradient dW = dyᵀ x, each an FP8 GEMM (fp8/tensor.py) of operands quantised along the axis
that GEMM contracts.

``LinearFP8`` is a layer's FP8 state (its recipe, its process groups, delayed scaling's amax
histories); ``Float8Gemm`` is one call's GEMMs, kept by the layer's autograd function
(tensor_parallel/layers.py: ``_Linear``) from the forward to the backward, which hands the weight
gradient's operands to weight_grad.py (``Float8WeightGrad``), so gradient-accumulation fusion into
``main_grad`` and the deferred weight gradients of the zero-bubble schedules work as in high
precision.

Operands (K: the contracted axis; tokens N = b·s):

  forward   x [N, in] (e4m3)          · W [out, in] (e4m3)
  dgrad     dy [N, out] (e4m3 | e5m2) · Wᵀ [in, out]
  wgrad     dyᵀ [out, N]              · xᵀ [in, N]

Tensorwise and delayed scaling quantise x, W and dy once each and transpose their bytes; rowwise
and blockwise requantise each operand along its GEMM's K from the high-precision tensor (x is kept
in high precision for the backward), except W's 128 × 128 blocks, which transpose as they are.

Layout invariance: every scale equals the one the single rank computes. An amax is reduced (MAX)
over each process group that splits an axis it covers: tokens over CP (and over TP for a sequence-
parallel input quantised before its all-gather), a column-parallel layer's output features and a
row-parallel layer's input features over TP. Blocks never straddle ranks (config.validate), so
blockwise scales need no reduction. Delayed scaling takes the scales from the histories, identical
on every rank (fp8/recipe.py), and reduces nothing per GEMM.

The MoE experts' grouped GEMMs can use the same pieces: a ``LinearFP8`` per expert weight (``column``
for fc1, row-parallel for fc2, the expert-TP group as ``tp`` and the tokens' groups as ``token_groups``),
``Float8Gemm`` per expert and call, or ``quantize`` + ``mm`` on the stacked operands directly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .recipe import GRAD, INPUT, WEIGHT, Recipe
from .tensor import Float8, amax_of, amax_to_scale, mm, quantize


class LinearFP8:
    """The FP8 state of one linear layer.

    ``tp_group``: its TP process group (None: TP = 1); ``column``: column-parallel (output features
    split over TP) or row-parallel (input features split); ``token_groups``: the groups that split the
    tokens (the CP group). Delayed scaling: ``history`` [3, amax_history_len] (roles INPUT, WEIGHT,
    GRAD; newest first), ``scale`` [3] (from the history), ``pending`` [3] (this iteration's amaxes so
    far, this rank's own; fp8/recipe.py:``update_scales`` reduces and rolls them in).
    """

    def __init__(self, recipe: Recipe, tp_group: Optional[dist.ProcessGroup], column: bool,
                 token_groups: Sequence[Optional[dist.ProcessGroup]] = ()):
        self.recipe, self.column = recipe, column
        self.tp_group = tp_group
        self.token_groups = list(token_groups)
        length = recipe.amax_history_len if recipe.delayed else 1
        self.history = torch.zeros(3, length)
        self.scale = torch.ones(3)
        self.pending = torch.zeros(3)
        self.filled = [False] * 3  # whether each role's history holds an amax yet

    def refresh_scales(self) -> None:
        """The delayed scales from the history: its max or its newest amax per role."""
        r = self.recipe
        amax = self.history.amax(dim=1) if r.amax_compute_algo == "max" else self.history[:, 0]
        self.filled = (self.history.amax(dim=1) > 0).tolist()
        self.scale = torch.stack([amax_to_scale(amax[role], r.role_dtype(role), r.margin) for role in (INPUT, WEIGHT, GRAD)])

    def _on(self, device: torch.device) -> None:
        """Keep the delayed state on the activations' device (no host sync per GEMM)."""
        if self.pending.device != device:
            self.history, self.scale, self.pending = (t.to(device) for t in (self.history, self.scale, self.pending))

    # Which groups split which axis -------------------------------------------------------------
    def in_groups(self) -> list:
        """The groups splitting the input features (TP for a row-parallel layer)."""
        return [] if self.column else [self.tp_group]

    def out_groups(self) -> list:
        """The groups splitting the output features (TP for a column-parallel layer)."""
        return [self.tp_group] if self.column else []

    def quantize_role(self, role: int, x: torch.Tensor, dtype: torch.dtype, row_groups: list, k_groups: list,
                  block_rows: int, record: bool) -> Float8:
        """Quantise the [rows, K] (tensorwise: any shape) ``x`` for ``role``: delayed scaling from the
        history (once it has one; its first iteration scales from the current amax), recording this
        rank's amax; otherwise from the amax reduced over the groups splitting the axes it covers."""
        r = self.recipe
        if r.delayed:
            self._on(x.device)
            if record:
                self.pending[role] = torch.maximum(self.pending[role], amax_of(x, "tensorwise"))
            if self.filled[role]:
                return quantize(x, dtype, scale=self.scale[role])
        groups = k_groups if r.granularity == "rowwise" else row_groups + k_groups
        return quantize(x, dtype, r.granularity, block_rows=block_rows, margin=r.margin,
                        amax_groups=groups if r.granularity != "blockwise" else ())

    def input(self, x: torch.Tensor, shard_groups: list, record: bool) -> Float8:
        """x [..., in] for the forward ([N, in] unless tensorwise); ``shard_groups``: more groups
        splitting its tokens (TP for a sequence-parallel shard quantised before its all-gather)."""
        if not self.recipe.tensor_scaled:
            x = x.reshape(-1, x.shape[-1])
        return self.quantize_role(INPUT, x, self.recipe.forward_dtype, self.token_groups + shard_groups,
                                 self.in_groups(), 1, record)

    def gemm(self, record: bool) -> "Float8Gemm":
        """This call's GEMMs; ``record``: count its amaxes in the delayed histories (training)."""
        return Float8Gemm(self, record)


class Float8Gemm:
    """One call's three FP8 GEMMs (module docstring), created by the layer's forward and kept for
    its backward. Results are in the activations' dtype."""

    def __init__(self, state: LinearFP8, record: bool):
        self.state, self.record = state, record
        self.weight_q: Optional[Float8] = None
        self.grad_q: Optional[Float8] = None

    def keep_input(self, x: torch.Tensor, sequence_sharded: bool, tp_group) -> torch.Tensor | Float8:
        """What the forward keeps of x for the backward, before any all-gather: with a tensor-wide
        scale the quantised x (under SP the quantised shard, so the all-gathers move FP8 bytes),
        else x itself."""
        s = self.state
        if not s.recipe.tensor_scaled:
            return x
        return s.input(x, [tp_group] if sequence_sharded else [], self.record)

    def forward(self, full: torch.Tensor | Float8, weight: torch.Tensor, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype) -> torch.Tensor:
        """y = x Wᵀ + b: ``full`` the whole input (gathered; Float8 or high precision) [..., in]."""
        s, r = self.state, self.state.recipe
        lead = full.data.shape[:-1] if isinstance(full, Float8) else full.shape[:-1]
        x_q = full if isinstance(full, Float8) else s.input(full, [], self.record)
        x_q = x_q.reshape(-1, x_q.data.shape[-1]) if x_q.granularity == "tensorwise" else x_q
        self.weight_q = s.quantize_role(WEIGHT, weight, r.forward_dtype, s.out_groups(), s.in_groups(),
                                        r.weight_block_rows, self.record)
        y = mm(x_q, self.weight_q, out_dtype).view(*lead, weight.shape[0])
        return y if bias is None else y + bias

    def _grad(self, grad_2d: torch.Tensor) -> Float8:
        """dy [N, out] quantised for the input gradient (and, tensor-wide, for the weight gradient)."""
        if self.grad_q is None:
            s, r = self.state, self.state.recipe
            self.grad_q = s.quantize_role(GRAD, grad_2d, r.backward_dtype, s.token_groups, s.out_groups(), 1, self.record)
        return self.grad_q

    def input_grad(self, grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """dx = dy W: grad_y [..., out] -> [..., in]."""
        s, r = self.state, self.state.recipe
        g = self._grad(grad_y.reshape(-1, grad_y.shape[-1]))
        if r.granularity == "rowwise":  # Wᵀ [in, out]: one scale per input feature, over out
            w_t = quantize(weight.t(), r.forward_dtype, "rowwise", margin=r.margin, amax_groups=s.out_groups())
        else:
            w_t = self.weight_q.t()
        return mm(g, w_t, grad_y.dtype).view(*grad_y.shape[:-1], weight.shape[1])

    def weight_grad_operands(self, grad_2d: torch.Tensor, full_input: torch.Tensor | Float8) -> tuple[Float8, Float8]:
        """(dyᵀ [out, N], xᵀ [in, N]) for dW = dyᵀ x; ``full_input``: the forward's whole input."""
        s, r = self.state, self.state.recipe
        if r.tensor_scaled:
            x_q = full_input if isinstance(full_input, Float8) else s.input(full_input, [], False)
            return self._grad(grad_2d).t(), x_q.reshape(-1, x_q.data.shape[-1]).t()
        x_2d = full_input.reshape(-1, full_input.shape[-1])
        groups = s.token_groups if r.granularity == "rowwise" else ()  # K = tokens
        g_t = quantize(grad_2d.t(), r.backward_dtype, r.granularity, margin=r.margin, amax_groups=groups)
        x_t = quantize(x_2d.t(), r.forward_dtype, r.granularity, margin=r.margin, amax_groups=groups)
        return g_t, x_t
