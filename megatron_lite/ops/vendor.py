"""Fused ops from NVIDIA's libraries (Transformer Engine, apex), used when they are importable on a
GPU. Each provider maps an op name to ``(accepts, fn)``: ``fn`` has the reference signature and runs
only when ``accepts(*args)`` holds (CUDA tensors in a dtype and shape the library's kernel takes);
otherwise the dispatcher moves on to the next backend. Ops a library lacks are simply absent.

These paths run only on GPU machines with the libraries installed (NVIDIA's PyTorch containers);
the GPU test suite compares them with the reference there.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch

Provider = dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]]
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _import(*modules: str) -> Optional[Any]:
    """The first of ``modules`` that imports, or None."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken install counts as absent
            continue
    return None


def _upper_triangular_softmax(function: Any, max_keys: int) -> tuple[Callable[..., bool], Callable[..., torch.Tensor]]:
    """Megatron's ScaledUpperTriangMaskedSoftmax (apex and TE ship the same kernel): square
    [b·n, s, s] fp16/bf16 scores, 16 < s ≤ max_keys, s a multiple of 8."""

    def accepts(scores: torch.Tensor, scale: float) -> bool:
        sq, sk = scores.shape[-2:]
        return scores.is_cuda and scores.dtype in HALF_DTYPES and sq == sk and 16 < sk <= max_keys and sk % 8 == 0

    def run(scores: torch.Tensor, scale: float) -> torch.Tensor:
        s = scores.shape[-1]
        return function.apply(scores.reshape(-1, s, s).contiguous(), float(scale)).view(scores.shape)

    return accepts, run


def _cuda_input(x: torch.Tensor, *args: Any) -> bool:
    return x.is_cuda


def te_ops() -> Provider:
    """Transformer Engine: causal softmax and rotary embedding (its norms are modules, not functions)."""
    ops: Provider = {}
    softmax = _import("transformer_engine.pytorch.attention.dot_product_attention.softmax",
                      "transformer_engine.pytorch.softmax")
    if softmax is not None and hasattr(softmax, "ScaledUpperTriangMaskedSoftmax"):
        ops["causal_softmax"] = _upper_triangular_softmax(softmax.ScaledUpperTriangMaskedSoftmax, 16383)
    rope = _import("transformer_engine.pytorch.attention.rope", "transformer_engine.pytorch.attention")
    if rope is not None and hasattr(rope, "apply_rotary_pos_emb"):

        def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            # TE takes angles [s, 1, 1, d] with the rotate-half layout: both halves share θ.
            theta = torch.atan2(sin.float(), cos.float())
            freqs = torch.cat((theta, theta), dim=-1)[:, None, None, :]
            return rope.apply_rotary_pos_emb(x, freqs, tensor_format="bshd", fused=True)

        ops["rotary"] = (lambda x, cos, sin: x.is_cuda and x.dim() == 4 and not cos.requires_grad, rotary)
    return ops


def apex_ops() -> Provider:
    """apex: fused RMSNorm / LayerNorm (with weight; LayerNorm with bias) and causal softmax."""
    ops: Provider = {}
    norms = _import("apex.normalization.fused_layer_norm")
    if norms is not None and hasattr(norms, "fused_rms_norm_affine"):
        ops["rms_norm"] = (_cuda_input, lambda x, w, eps: norms.fused_rms_norm_affine(x, w, (x.shape[-1],), eps))
    if norms is not None and hasattr(norms, "fused_layer_norm_affine"):
        ops["layer_norm"] = (
            lambda x, w, b, eps: x.is_cuda and b is not None,
            lambda x, w, b, eps: norms.fused_layer_norm_affine(x, w, b, (x.shape[-1],), eps),
        )
    softmax = _import("apex.transformer.functional.fused_softmax")
    if softmax is not None and hasattr(softmax, "ScaledUpperTriangMaskedSoftmax"):
        ops["causal_softmax"] = _upper_triangular_softmax(softmax.ScaledUpperTriangMaskedSoftmax, 2048)
    return ops
