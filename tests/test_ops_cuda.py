"""GPU tests (run by benchmarks/gpu_check.sh on a CUDA machine; skipped without CUDA): the csrc CUDA
kernels, and Transformer Engine / apex where importable, against the fp32 PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import megatron_lite.ops as ops
from megatron_lite.ops import csrc, reference
from ops_cases import (GPU_SHAPES, OPS, SHAPES, detached, empty_cases, function_name, make_args,
                       outputs_and_grads, swiglu_beyond_int32)

pytestmark = pytest.mark.cuda

# Tolerances against the fp32 reference evaluated on the same (rounded) input values: fp32 differs
# only by summation order; fp16/bf16 by one rounding of each output (2^-11, 2^-8 relative) plus the
# rounding of the upstream gradient inside the backward.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


@pytest.fixture(scope="module")
def cuda_kernels():
    ext = csrc.extension()
    assert ext is not None and ext.with_cuda, "the csrc extension did not build with CUDA kernels"
    return ext


def _check_against_fp32_reference(fn, op, args):
    atol, rtol = TOLERANCES[args[0].dtype]
    out, grads = outputs_and_grads(fn, args)
    out_r, grads_r = outputs_and_grads(getattr(reference, function_name(op)), detached(args, torch.float32))
    assert out.dtype == args[0].dtype and out.is_cuda
    torch.testing.assert_close(out.float(), out_r, atol=atol, rtol=rtol, msg=f"{op} forward")
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        # Weight and bias gradients sum over up to 96 rows of rounded terms.
        scale = 4 if g.dim() == 1 else 1
        torch.testing.assert_close(g.float(), gr, atol=scale * atol, rtol=rtol, msg=f"{op} grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_csrc_cuda_matches_reference(cuda_kernels, op, family, dtype):
    args = make_args(op, family, dtype=dtype, device="cuda")
    _check_against_fp32_reference(getattr(csrc, function_name(op)), op, args)


@pytest.mark.parametrize("family", GPU_SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_csrc_cuda_large_shapes(cuda_kernels, op, family):
    """The shapes the GPU path must survive: h = 8192 × 4096 rows, h = 16384 × 512 (rows longer than
    one register tile), 70 000 rows (beyond the grid's y limit); bf16, as in training."""
    args = make_args(op, family, dtype=torch.bfloat16, device="cuda")
    _check_against_fp32_reference(getattr(csrc, function_name(op)), op, args)


@pytest.mark.parametrize("case", range(len(empty_cases())))
def test_csrc_cuda_empty_inputs(cuda_kernels, case):
    op, args = empty_cases(device="cuda")[case]
    out, grads = outputs_and_grads(getattr(csrc, function_name(op)), args)
    out_r, grads_r = outputs_and_grads(getattr(reference, function_name(op)), detached(args))
    assert out.shape == out_r.shape and out.is_cuda
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr)


def test_csrc_cuda_swiglu_beyond_int32(cuda_kernels):
    """A SwiGLU input of more than 2^31 elements: the last rows (past element 2^31) forward and
    backward match the reference evaluated on those rows alone."""
    x = swiglu_beyond_int32().requires_grad_()
    assert x.numel() > 2**31
    y = csrc.swiglu(x)
    tail = slice(x.shape[0] - 4, None)
    g = torch.randn(4, y.shape[1], dtype=y.dtype, device="cuda")
    (dx,) = torch.autograd.grad(y[tail], x, g)
    x_tail = x.detach()[tail].float().requires_grad_()
    y_r = reference.swiglu(x_tail)
    (dx_r,) = torch.autograd.grad(y_r, x_tail, g.float())
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y[tail].float(), y_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx[tail].float(), dx_r, atol=atol, rtol=rtol)
    del x, y, dx


@pytest.mark.parametrize("backend", ["csrc", "te", "apex"])
@pytest.mark.parametrize("batches,seq", [(25, 128), (25, 2048), (6, 1024), (12, 64), (4, 4096)])
def test_causal_softmax_any_batch_count(backend, batches, seq):
    """b·n = 25 (gpt_1p5b, micro batch 1), 6 (gpt2_124m at TP 2) or 12 at s ≤ 128: the vendor
    kernels' batches-per-block rule rejects these, so the call falls back instead of asserting."""
    try:
        if ops.use_backend(backend) != backend:
            pytest.skip(f"{backend} is not importable")
        args = (torch.randn(batches, seq, seq, dtype=torch.bfloat16, device="cuda").requires_grad_(), 0.125)
        _check_against_fp32_reference(ops.causal_softmax, "causal_softmax", args)
    finally:
        ops.use_backend("torch")


def test_backward_checks_devices(cuda_kernels):
    """Saved statistics on another device than x are an error, not a read of host memory."""
    x, w = torch.randn(6, 64, device="cuda"), torch.ones(64, device="cuda")
    y, rstd = cuda_kernels.rms_norm_fwd(x, w, 1e-5)
    with pytest.raises(RuntimeError, match="rstd is on cpu but the input is on cuda"):
        cuda_kernels.rms_norm_bwd(torch.ones_like(y), x, w, rstd.cpu())
    with pytest.raises(RuntimeError, match="the gradient is on cpu"):
        cuda_kernels.rms_norm_bwd(torch.ones_like(y).cpu(), x, w, rstd)


@pytest.mark.parametrize("op", OPS)
def test_csrc_cuda_non_contiguous(cuda_kernels, op):
    args = make_args(op, "threaded", dtype=torch.bfloat16, device="cuda", contiguous=False)
    _check_against_fp32_reference(getattr(csrc, function_name(op)), op, args)


@pytest.mark.parametrize("backend", ["te", "apex"])
@pytest.mark.parametrize("op", OPS)
def test_vendor_backends(op, backend):
    """TE / apex ops (where the library is installed and takes the input) match the reference."""
    try:
        if ops.use_backend(backend) != backend:
            pytest.skip(f"{backend} is not importable")
        args = make_args(op, "threaded", dtype=torch.bfloat16, device="cuda")
        _check_against_fp32_reference(getattr(ops, function_name(op)), op, args)
    finally:
        ops.use_backend("torch")
