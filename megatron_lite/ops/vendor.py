"""Fused ops from NVIDIA's libraries (Transformer Engine, apex), used when they are installed with
their CUDA extensions on a GPU. Each provider maps an op name to ``(accepts, fn)``: ``fn`` has the
reference signature and runs only when ``accepts(*args)`` holds; otherwise the dispatcher moves on to
the next backend. Ops a library lacks are simply absent.

``accepts`` mirrors the library kernel's full availability rule, so a shape the kernel would reject
(or assert on) falls back instead of crashing the run. The shape rules are plain functions of dtype
and sizes (``*_softmax_takes``), unit-tested on the CPU:

- causal softmax, apex (``scaled_upper_triang_masked_softmax_cuda``; rule of Megatron-LM's
  ``FusedScaleMaskSoftmax.is_kernel_available`` with apex's own limit): fp16/bf16, square
  [b·n, s, s], 16 < s ≤ 2048, s % 4 == 0, b·n % 4 == 0, and b·n a multiple of the kernel's batches
  per 128-thread block (``warp_softmax_batches_per_block``: 8 for s ≤ 128, else 4); the launcher
  asserts on the last one.
- causal softmax, Transformer Engine ≥ 1.0 (``ScaledUpperTriangMaskedSoftmax``): fp16/bf16, square,
  16 < s < 16384, s % 8 == 0, and the same batches-per-block divisibility (TE's launcher checks it
  with ``NVTE_CHECK``). Older TE is not used for it.
- RMSNorm / LayerNorm, apex (``fused_layer_norm_cuda``): CUDA fp32/fp16/bf16 input with weight
  (and bias) of the input's dtype; apex would otherwise return the weight's dtype.
- rotary, Transformer Engine (fused RoPE): CUDA [b, s, n, d] fp32/fp16/bf16 with constant tables.

apex counts as installed only when its compiled extension modules import: its Python package alone
(a source install without ``--cuda_ext``) has no kernels. These paths run only on GPU machines with
the libraries installed (NVIDIA's PyTorch containers); the GPU tests compare them with the reference.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Optional

import torch

Provider = dict[str, tuple[Callable[..., bool], Callable[..., torch.Tensor]]]
HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
APEX_SOFTMAX_MAX_KEYS = 2048  # apex's scaled_upper_triang_masked_softmax fwd_cuda asserts seq_len ≤ 2048
TE_SOFTMAX_MAX_KEYS = 16384  # exclusive, as TE's FusedScaleMaskSoftmax.is_kernel_available


def _import(*modules: str) -> Optional[Any]:
    """The first of ``modules`` that imports, or None."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken install counts as absent
            continue
    return None


def warp_softmax_batches_per_block(keys: int) -> int:
    """Rows of [b·n] one 128-thread block of the warp-per-row softmax kernels handles (Megatron's,
    apex's and TE's ``get_batch_per_block``): warps of min(32, next_pow2(keys)) threads, two rows per
    warp up to 128 keys."""
    pow2 = 1 << max(keys - 1, 0).bit_length()
    warp = min(pow2, 32)
    return (128 // warp) * (2 if pow2 <= 128 else 1)


def apex_causal_softmax_takes(dtype: torch.dtype, batches: int, sq: int, sk: int) -> bool:
    """Whether apex's upper-triangular softmax accepts scores [batches, sq, sk] of ``dtype``."""
    return (dtype in HALF_DTYPES and sq == sk and 16 < sk <= APEX_SOFTMAX_MAX_KEYS and sk % 4 == 0
            and batches % 4 == 0 and batches % warp_softmax_batches_per_block(sk) == 0)


def te_causal_softmax_takes(dtype: torch.dtype, batches: int, sq: int, sk: int) -> bool:
    """Whether Transformer Engine's upper-triangular softmax accepts scores [batches, sq, sk]."""
    return (dtype in HALF_DTYPES and sq == sk and 16 < sk < TE_SOFTMAX_MAX_KEYS and sk % 8 == 0
            and batches % warp_softmax_batches_per_block(sk) == 0)


def apex_norm_takes(x_dtype: torch.dtype, *param_dtypes: torch.dtype) -> bool:
    """Whether apex's fused norms return what the reference does: fp32/fp16/bf16 input, weight and
    bias of the same dtype (apex's output takes the weight's dtype)."""
    return x_dtype in KERNEL_DTYPES and all(d == x_dtype for d in param_dtypes)


def _upper_triangular_softmax(function: Any, takes: Callable[..., bool]) -> tuple[Callable[..., bool], Callable[..., torch.Tensor]]:
    """Megatron's ScaledUpperTriangMaskedSoftmax (apex and TE ship the same kernel) on scores
    [..., s, s] folded to [b·n, s, s], where ``takes`` accepts the shape."""

    def accepts(scores: torch.Tensor, scale: float) -> bool:
        sq, sk = scores.shape[-2:]
        return scores.is_cuda and takes(scores.dtype, math.prod(scores.shape[:-2]), sq, sk)

    def run(scores: torch.Tensor, scale: float) -> torch.Tensor:
        s = scores.shape[-1]
        return function.apply(scores.reshape(-1, s, s).contiguous(), float(scale)).view(scores.shape)

    return accepts, run


def _version(module: Any) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", str(getattr(module, "__version__", "0")))[:2]
    return tuple(int(n) for n in numbers) or (0,)


def te_ops() -> Provider:
    """Transformer Engine: causal softmax and rotary embedding (its norms are modules, not functions)."""
    ops: Provider = {}
    te = _import("transformer_engine")
    if te is None:
        return ops
    softmax = _import("transformer_engine.pytorch.attention.dot_product_attention.softmax",
                      "transformer_engine.pytorch.softmax")
    if softmax is not None and hasattr(softmax, "ScaledUpperTriangMaskedSoftmax") and _version(te) >= (1, 0):
        ops["causal_softmax"] = _upper_triangular_softmax(softmax.ScaledUpperTriangMaskedSoftmax,
                                                          te_causal_softmax_takes)
    rope = _import("transformer_engine.pytorch.attention.rope", "transformer_engine.pytorch.attention")
    if rope is not None and hasattr(rope, "apply_rotary_pos_emb"):

        def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            # TE takes angles [s, 1, 1, d] with the rotate-half layout: both halves share θ.
            theta = torch.atan2(sin.float(), cos.float())
            freqs = torch.cat((theta, theta), dim=-1)[:, None, None, :]
            return rope.apply_rotary_pos_emb(x, freqs, tensor_format="bshd", fused=True)

        def takes_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
            return (x.is_cuda and x.dim() == 4 and x.dtype in KERNEL_DTYPES and x.shape[-1] % 2 == 0
                    and tuple(cos.shape) == (x.shape[1], x.shape[-1] // 2) and not cos.requires_grad
                    and not sin.requires_grad)

        ops["rotary"] = (takes_rotary, rotary)
    return ops


def apex_ops() -> Provider:
    """apex: fused RMSNorm / LayerNorm (with weight; LayerNorm with bias) and causal softmax, each
    only if the compiled extension behind it imports."""
    ops: Provider = {}
    norms = _import("apex.normalization.fused_layer_norm") if _import("fused_layer_norm_cuda") else None
    if norms is not None and hasattr(norms, "fused_rms_norm_affine"):

        def takes_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> bool:
            return x.is_cuda and apex_norm_takes(x.dtype, w.dtype)

        ops["rms_norm"] = (takes_rms, lambda x, w, eps: norms.fused_rms_norm_affine(x, w, (x.shape[-1],), eps))
    if norms is not None and hasattr(norms, "fused_layer_norm_affine"):

        def takes_layer_norm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], eps: float) -> bool:
            return x.is_cuda and b is not None and apex_norm_takes(x.dtype, w.dtype, b.dtype)

        ops["layer_norm"] = (takes_layer_norm,
                             lambda x, w, b, eps: norms.fused_layer_norm_affine(x, w, b, (x.shape[-1],), eps))
    softmax = None
    if _import("scaled_upper_triang_masked_softmax_cuda"):
        softmax = _import("apex.transformer.functional.fused_softmax")
    if softmax is not None and hasattr(softmax, "ScaledUpperTriangMaskedSoftmax"):
        ops["causal_softmax"] = _upper_triangular_softmax(softmax.ScaledUpperTriangMaskedSoftmax,
                                                          apex_causal_softmax_takes)
    return ops


def apex_extensions() -> dict[str, bool]:
    """Which of apex's compiled extension modules import (for environment reports)."""
    names = ("fused_layer_norm_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
             "amp_C", "fused_adam_cuda")
    return {name: _import(name) is not None for name in names}
