"""Inputs for the fused-op tests, shared by the CPU and CUDA test files: for each op, the arguments
of a call in a few shape families, with the differentiable tensors marked ``requires_grad``."""

from __future__ import annotations

import math

import torch

OPS = ("rms_norm", "layer_norm", "layer_norm_nobias", "rotary", "swiglu", "bias_gelu", "bias_gelu_nobias",
       "causal_softmax")
# rows × hidden of each shape family: hidden not a multiple of 8, one row, a long row, enough work
# (rows · hidden ≥ 2^15) for the CPU kernels to split rows across OpenMP threads, and CPU-sized twins
# of the GPU shapes below: 300 rows of gpt_1p5b's hidden size (several rows per block in the CUDA
# backward), a row of 16384, and 70 000 rows.
SHAPES = {"odd": (5, 37), "one_row": (1, 19), "long_row": (3, 12_289), "threaded": (96, 520),
          "rows300": (300, 1600), "wide": (8, 16_384), "many_rows": (70_000, 8)}
# The shapes the CUDA kernels must survive (cuda-marked tests only): h = 8192 and 16384 (rows longer
# than one register tile in the backward), and 70 000 rows (beyond a grid's y limit of 65535).
GPU_SHAPES = {"h8192": (4096, 8192), "h16384": (512, 16_384), "rows70k": (70_000, 256)}
ALL_SHAPES = {**SHAPES, **GPU_SHAPES}
# Softmax cases hold at most this many scores (batch is cut down to fit): the fp32 reference is slow
# on the CPU.
SOFTMAX_ELEMENTS = {"cpu": 2**21, "cuda": 2**24}


def _t(shape, dtype, device, grad=True, contiguous=True, scale=1.0):
    """A random tensor; non-contiguous ones are the transpose of a contiguous buffer."""
    if contiguous:
        t = torch.randn(shape, dtype=dtype, device=device) * scale
    else:
        t = (torch.randn(tuple(reversed(shape)), dtype=dtype, device=device) * scale).permute(
            *reversed(range(len(shape))))
    return t.requires_grad_(grad)


def make_args(op: str, family: str, dtype=torch.float32, device="cpu", contiguous=True) -> tuple:
    """Arguments of ``op`` (reference signature) for a shape family."""
    rows, h = ALL_SHAPES[family]
    if op in ("rms_norm", "layer_norm", "layer_norm_nobias"):
        x = _t((rows, h), dtype, device, contiguous=contiguous)
        w = (1 + 0.1 * torch.randn(h, dtype=dtype, device=device)).requires_grad_()
        if op == "rms_norm":
            return x, w, 1e-5
        b = None if op.endswith("nobias") else _t((h,), dtype, device)
        return x, w, b, 1e-5
    if op == "rotary":
        # [b, s, n, d] with d even; the long row becomes a long sequence.
        b, s, n, d = (2, max(rows, 1), 3, 2 * max(h // 16, 1))
        x = _t((b, s, n, d), dtype, device, contiguous=contiguous)
        angles = torch.arange(s, dtype=torch.float64, device=device)[:, None] * torch.rand(
            d // 2, dtype=torch.float64, device=device)
        return x, angles.cos().to(dtype), angles.sin().to(dtype)
    if op == "swiglu":
        return (_t((rows, 2 * h), dtype, device, contiguous=contiguous, scale=2.0),)
    if op in ("bias_gelu", "bias_gelu_nobias"):
        bias = None if op.endswith("nobias") else _t((h,), dtype, device)
        return _t((rows, h), dtype, device, contiguous=contiguous, scale=2.0), bias
    if op == "causal_softmax":
        # [b·n, sq, sk] with sq ≤ sk (a query block at the end of the keys when sq < sk).
        sk = min(h, 2048)
        sq = sk if family != "odd" else sk - 4
        batch = max(min(rows // 4, SOFTMAX_ELEMENTS[torch.device(device).type] // max(sq * sk, 1)), 1)
        return _t((batch, sq, sk), dtype, device, contiguous=contiguous, scale=3.0), 1 / math.sqrt(64)
    raise KeyError(op)


def function_name(op: str) -> str:
    """The ops-module function an op case calls (the no-bias cases use the same function)."""
    return op.replace("_nobias", "")


def detached(args: tuple, dtype: torch.dtype | None = None) -> tuple:
    """Fresh leaf copies of the tensor args (optionally cast), keeping requires_grad."""
    return tuple(a.detach().to(dtype or a.dtype).clone().requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) else a for a in args)


def outputs_and_grads(fn, args: tuple, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    """fn(*args) and the gradients of <fn(*args), g>, for a fixed random g, with respect to every
    argument that requires grad."""
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out, torch.autograd.grad(out, wrt, g.to(out.dtype).to(out.device))


def empty_cases(dtype=torch.float32, device="cpu") -> list[tuple[str, tuple]]:
    """(op, args) calls with no rows or an empty last dim: outputs are empty, gradients over zero
    rows are zeros."""

    def t(*shape):
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_()

    return [
        ("rms_norm", (t(0, 16), t(16), 1e-5)), ("rms_norm", (t(4, 0), t(0), 1e-5)),
        ("layer_norm", (t(0, 16), t(16), t(16), 1e-5)), ("layer_norm", (t(4, 0), t(0), t(0), 1e-5)),
        ("swiglu", (t(0, 32),)), ("swiglu", (t(4, 0),)),
        ("bias_gelu", (t(0, 8), t(8))), ("bias_gelu", (t(3, 0), t(0))),
        ("rotary", (t(2, 0, 3, 8), torch.ones(0, 4, dtype=dtype, device=device),
                    torch.zeros(0, 4, dtype=dtype, device=device))),
        ("causal_softmax", (t(0, 4, 4), 0.5)), ("causal_softmax", (t(2, 3, 0), 0.5)),
    ]


def swiglu_beyond_int32(device="cuda", dtype=torch.bfloat16, f: int = 8192) -> torch.Tensor:
    """A SwiGLU input [rows, 2f] of more than 2^31 elements (64-bit offsets in every kernel)."""
    rows = 2**31 // (2 * f) + 1
    return torch.randn(rows, 2 * f, dtype=dtype, device=device)
