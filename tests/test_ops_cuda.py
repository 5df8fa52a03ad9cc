"""GPU tests (run by benchmarks/gpu_check.sh on a CUDA machine; skipped without CUDA): the csrc CUDA
kernels, and Transformer Engine / apex where importable, against the fp32 PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import megatron_lite.ops as ops
from megatron_lite.ops import csrc, reference
from ops_cases import OPS, SHAPES, detached, function_name, make_args, outputs_and_grads

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
