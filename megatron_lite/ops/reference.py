"""Pure-PyTorch reference implementations of the fused ops: the math every backend must match,
and the fallback when no faster backend is available."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., h], weight: [h]. Statistics in fp32, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., h], weight/bias: [h]."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (GPT-NeoX / LLaMA in HF transformers).

    x: [b, s, n, d]; cos, sin: [s, d/2]. The first and second halves of the head dimension form the
    rotated pairs: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin). Computed in fp32 (or x's dtype if
    wider) with the tables as given, one rounding to x's dtype at the end, as the fused kernels do.
    """
    half = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    x1, x2 = xc[..., :half], xc[..., half:]
    c = cos[None, :, None, :].to(compute)
    s = sin[None, :, None, :].to(compute)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2f] = [gate | up] -> silu(gate) · up: [..., f]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(x + bias), tanh approximation (GPT-2's ``gelu_new`` and Megatron's fused bias-GeLU)."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled, causally masked softmax. scores: [batch·heads, sq, sk]; query i sees keys ≤ i + sk − sq.

    Softmax in fp32, result in the input dtype.
    """
    sq, sk = scores.shape[-2:]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
    s = (scores.float() * scale).masked_fill(mask, -math.inf)
    return torch.softmax(s, dim=-1).to(scores.dtype)
