"""FP8 operands and the FP8 GEMM: quantisation with a scale per tensor, per row or per block, and
``mm`` = the product of two quantised operands, with an fp32 (or bf16) result.

An operand of a GEMM is a matrix [rows, K] whose last axis K is the one the GEMM contracts (the
layout ``torch._scaled_mm`` wants: "TN"). Quantising x with scale s stores ``fp8(clamp(x·s))`` and
the dequantisation factor ``inv_scale`` = 1/s; the operand's value is ``data · inv_scale``. The scale
maps the amax (the largest |x| the scale covers) to the format's largest finite value, lowered by
2^margin: s = fp8_max / (amax · 2^margin) (Transformer Engine's and torchao's rule). An amax of zero
or a non-finite amax gives s = 1: zeros stay zeros, and a non-finite input stays non-finite (NaN in
e4m3, which has no infinity) so that the trainer's non-finite check skips the step.

Granularities (what one scale covers):

- ``tensorwise``: the whole tensor; the scale is a 0-d tensor. The transpose of such an operand is
  the transpose of its bytes (no requantisation): one quantised activation serves the forward and the
  weight-gradient GEMM.
- ``rowwise``: one row (the amax over K); scale [rows, 1].
- ``blockwise`` (DeepSeek-V3): a block of (block_rows × 128) elements, 1 × 128 for activations and
  gradients, 128 × 128 for weights; scale [rows / block_rows, K / 128]. Rows and K must be multiples
  of the block (config.validate checks the model's shapes).

The GEMM: ``torch._scaled_mm`` on a GPU for the tensorwise and rowwise scalings it implements; on the
CPU the fp32 GEMM of the FP8 values with the scales applied to the product (tensorwise, rowwise: they
factor out of the sum over K), or of the dequantised operands (blocks). Both compute the same
quantity as ``_scaled_mm``: each FP8 value and each product of two is exact in fp32, so the results
differ from the dequantised product only in the rounding of the fp32 sums (tests/test_fp8.py). The CPU path is not an
emulation of lesser fidelity: torch 2.13's CPU ``_scaled_mm`` computes the identical product, just
~2,000× slower than an fp32 GEMM (17.7 s for 1024³ against 8 ms, 2026-12-08).

Where the amax is reduced over process groups (the scale of a sharded tensor equals the single
rank's): ``amax_groups``, handed in by the layer (fp8/linear.py says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BLOCK = 128  # DeepSeek-V3's quantisation block along K (and along rows for weights)
GRANULARITIES = ("tensorwise", "rowwise", "blockwise")


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 format: 448 (e4m3), 57344 (e5m2)."""
    return float(torch.finfo(dtype).max)


@dataclass
class Float8:
    """A quantised operand: ``data`` [..., K] in FP8, ``inv_scale`` (fp32) broadcast per
    ``granularity``; ``block_rows`` (blockwise only): 1 or 128. Its value is ``dequantize()``
    (its unscaled values in fp32 are computed once and kept: the CPU's GEMM reads them, often twice)."""

    data: torch.Tensor
    inv_scale: torch.Tensor
    granularity: str = "tensorwise"
    block_rows: int = 1
    values: Optional[torch.Tensor] = field(default=None, repr=False)  # fp32_data()'s cache

    def fp32_data(self) -> torch.Tensor:
        """The FP8 values (unscaled) in fp32, exactly; computed once."""
        if self.values is None:
            self.values = to_float32(self.data)
        return self.values

    def dequantize(self) -> torch.Tensor:
        """data · inv_scale in fp32."""
        inv = self.inv_scale
        if self.granularity == "blockwise":
            inv = inv.repeat_interleave(self.block_rows, 0).repeat_interleave(BLOCK, 1)
        return self.fp32_data() * inv

    def t(self) -> "Float8":
        """The transposed operand [K, rows]: the bytes transposed, exactly (a tensor-wide scale, or
        square 128 × 128 blocks, whose scales transpose with them). Views, like ``Tensor.t``."""
        values = None if self.values is None else self.values.t()
        if self.granularity == "tensorwise":
            return Float8(self.data.t(), self.inv_scale, values=values)
        assert self.granularity == "blockwise" and self.block_rows == BLOCK, "rows and 1×128 blocks requantise"
        return Float8(self.data.t(), self.inv_scale.t(), "blockwise", BLOCK, values)

    def reshape(self, *shape: int) -> "Float8":
        assert self.granularity == "tensorwise", "only a tensorwise operand reshapes freely"
        values = None if self.values is None else self.values.reshape(*shape)
        return Float8(self.data.reshape(*shape), self.inv_scale, values=values)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.inv_scale.numel() * self.inv_scale.element_size()


_FLOAT32_OF_BYTE: dict[torch.dtype, torch.Tensor] = {}


def to_float32(data: torch.Tensor) -> torch.Tensor:
    """FP8 -> fp32, exactly. On the CPU through a 256-entry table (index_select: ~4× faster than
    torch 2.13's CPU conversion of e4m3)."""
    if data.is_cuda:
        return data.to(torch.float32)
    table = _FLOAT32_OF_BYTE.get(data.dtype)
    if table is None:
        table = _FLOAT32_OF_BYTE[data.dtype] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(data.dtype).float()
    return torch.index_select(table, 0, data.reshape(-1).view(torch.uint8).int()).view(data.shape)


def reduce_amax(amax: torch.Tensor, groups: Sequence[Optional[dist.ProcessGroup]]) -> torch.Tensor:
    """The maximum of ``amax`` over every group in ``groups`` (in place; None entries skipped)."""
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def amax_of(x: torch.Tensor, granularity: str, block_rows: int = 1) -> torch.Tensor:
    """The local amax of a [rows, K] matrix (any shape for tensorwise) at ``granularity``, fp32."""
    x = x.detach()
    if granularity == "tensorwise":
        low, high = torch.aminmax(x)  # one pass, no |x| temporary
        return torch.maximum(-low, high).float()
    a = x.abs().float()
    if granularity == "rowwise":
        return a.amax(dim=-1, keepdim=True)
    rows, k = a.shape
    return a.view(rows // block_rows, block_rows, k // BLOCK, BLOCK).amax(dim=(1, 3))


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """s = fp8_max / (amax · 2^margin); 1 where amax is zero or not finite (fp32)."""
    ok = torch.isfinite(amax) & (amax > 0)
    scale = fp8_max(dtype) / (torch.where(ok, amax, torch.ones_like(amax)) * 2.0**margin)
    return torch.where(ok, scale, torch.ones_like(scale))


def cast_saturated(x: torch.Tensor, dtype: torch.dtype, finite: Optional[bool] = None) -> torch.Tensor:
    """Cast to FP8, clamping finite values to ±fp8_max (no overflow to NaN/inf); non-finite values
    stay non-finite. ``finite``: known to hold no inf/NaN (skips that check)."""
    limit = fp8_max(dtype)
    clamped = x.clamp(-limit, limit)  # NaN stays NaN; ±inf would become ±limit
    if finite is None:
        finite = not x.is_cuda and bool(torch.isfinite(x).all())  # a GPU keeps the elementwise select
    if finite:
        return clamped.to(dtype)
    # e4m3 has no infinity (torch's cast would saturate it to 448): it becomes NaN there.
    non_finite = x if dtype == torch.float8_e5m2 else torch.full_like(x, float("nan"))
    return torch.where(torch.isfinite(x), clamped, non_finite).to(dtype)


def quantize(x: torch.Tensor, dtype: torch.dtype, granularity: str = "tensorwise", *, block_rows: int = 1,
             margin: int = 0, scale: Optional[torch.Tensor] = None,
             amax_groups: Sequence[Optional[dist.ProcessGroup]] = ()) -> Float8:
    """Quantise ``x`` ([..., K]; rowwise and blockwise: [rows, K]) to ``dtype``. ``scale``: given
    (delayed scaling), else computed from the amax reduced over ``amax_groups``."""
    finite = None
    current = scale is None
    if current:
        amax = reduce_amax(amax_of(x, granularity, block_rows), amax_groups)
        scale = amax_to_scale(amax, dtype, margin)
        if not x.is_cuda and granularity == "tensorwise":
            finite = bool(torch.isfinite(amax))
    expanded = scale
    if granularity == "blockwise":
        expanded = scale.repeat_interleave(block_rows, 0).repeat_interleave(BLOCK, 1)
    scaled = x.float() * expanded  # in fp32: a bf16 product would round twice
    if current and finite:  # |x| · scale ≤ fp8_max already: the cast needs no clamp
        data = scaled.to(dtype)
    else:
        data = cast_saturated(scaled, dtype, finite)
    return Float8(data, scale.reciprocal(), granularity, block_rows)


def scaled_mm_takes(cuda: bool, granularity_a: str, granularity_b: str, dtype_a: torch.dtype, dtype_b: torch.dtype,
                    m: int, k: int, n: int, out_dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` computes [m, k] @ [k, n] (the guard, as ops/vendor.py's, mirrors
    the kernel's rules: it asserts otherwise): a CUDA device, both operands tensorwise or both rowwise
    (rowwise only with a bf16 result), not e5m2 × e5m2, and every dimension a multiple of 16."""
    if not cuda or granularity_a != granularity_b or granularity_a not in ("tensorwise", "rowwise"):
        return False
    if granularity_a == "rowwise" and out_dtype != torch.bfloat16:
        return False
    if dtype_a == dtype_b == torch.float8_e5m2:
        return False
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


def mm(a: Float8, b: Float8, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ bᵀ for operands a [M, K], b [N, K] -> [M, N] in ``out_dtype`` (module docstring)."""
    (m, k), n = a.data.shape, b.data.shape[0]
    if scaled_mm_takes(a.data.is_cuda, a.granularity, b.granularity, a.data.dtype, b.data.dtype, m, k, n, out_dtype):
        # a row-major, b column-major
        inv_b = b.inv_scale if b.granularity == "tensorwise" else b.inv_scale.t()
        return torch._scaled_mm(a.data.contiguous(), b.data.contiguous().t(), scale_a=a.inv_scale,
                                scale_b=inv_b, out_dtype=out_dtype)
    if a.granularity == b.granularity != "blockwise":  # the scales factor out of the sum over K
        out = torch.mm(a.fp32_data(), b.fp32_data().t())
        return out.mul_(a.inv_scale * (b.inv_scale if b.granularity == "tensorwise" else b.inv_scale.t())).to(out_dtype)
    return torch.mm(a.dequantize(), b.dequantize().t()).to(out_dtype)
