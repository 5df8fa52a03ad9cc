"""The vendor kernels' availability rules (megatron_lite/ops/vendor.py), unit-tested on the CPU: every
shape a model of this project sends to apex's or Transformer Engine's causal softmax, and the
presence rule for apex (its compiled extension modules, not its Python package)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from megatron_lite.ops import vendor

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (case, dtype, b·n, sq, sk, apex takes it, TE takes it)
GUARD_TABLE = [
    ("gpt_1p5b mb 1 (25 heads), s 1024", BF16, 25, 1024, 1024, False, False),
    ("gpt_1p5b mb 1, s 2048", BF16, 25, 2048, 2048, False, False),
    ("gpt_1p5b mb 4, s 1024", BF16, 100, 1024, 1024, True, True),
    ("gpt2_124m TP 2 mb 1 (6 heads per rank)", BF16, 6, 1024, 1024, False, False),
    ("gpt2_124m TP 1 mb 1 (12 heads)", BF16, 12, 1024, 1024, True, True),
    ("s 128: 8 batches per block, b·n 12", BF16, 12, 128, 128, False, False),
    ("s 128: b·n 16", FP16, 16, 128, 128, True, True),
    ("s 32: 8 batches per block, b·n 4", BF16, 4, 32, 32, False, False),
    ("s 16: too short", BF16, 16, 16, 16, False, False),
    ("s 1028: multiple of 4, not of 8", BF16, 8, 1028, 1028, True, False),
    ("s 4096: beyond apex's 2048", BF16, 8, 4096, 4096, False, True),
    ("s 16384: beyond TE's limit", BF16, 8, 16384, 16384, False, False),
    ("fp32 scores", FP32, 16, 1024, 1024, False, False),
    ("sq < sk (a query block)", BF16, 16, 512, 1024, False, False),
    ("llama_1b TP 1 mb 1 (32 heads), s 2048", BF16, 32, 2048, 2048, True, True),
]


@pytest.mark.parametrize("case,dtype,batches,sq,sk,apex,te", GUARD_TABLE, ids=[row[0] for row in GUARD_TABLE])
def test_causal_softmax_guards(case, dtype, batches, sq, sk, apex, te):
    assert vendor.apex_causal_softmax_takes(dtype, batches, sq, sk) is apex
    assert vendor.te_causal_softmax_takes(dtype, batches, sq, sk) is te


def test_batches_per_block_matches_the_kernels_launch_geometry():
    """8 rows per block up to 128 keys (4 warps × 2 rows), 4 beyond (4 warps × 1 row); below 32 keys a
    warp is narrower and a block has more of them."""
    assert [vendor.warp_softmax_batches_per_block(s) for s in (17, 32, 64, 128, 129, 2048, 16383)] == \
        [8, 8, 8, 8, 4, 4, 4]
    assert vendor.warp_softmax_batches_per_block(16) == 16 and vendor.warp_softmax_batches_per_block(8) == 32


def test_accepts_folds_leading_dims_and_requires_cuda():
    """The provider's accepts() counts b·n over every leading dim and never takes a CPU tensor."""
    accepts, _ = vendor._upper_triangular_softmax(None, vendor.apex_causal_softmax_takes)
    scores = torch.zeros(2, 6, 64, 64, dtype=BF16)  # b·n = 12, s 64: 8 per block -> no
    assert not accepts(scores, 0.1)
    assert vendor.apex_causal_softmax_takes(BF16, 2 * 8, 64, 64)
    assert not accepts(torch.zeros(2, 8, 64, 64, dtype=BF16), 0.1)  # right shape, but on the CPU


def _fake_apex(root, with_extensions: bool) -> None:
    """An apex source tree as `pip install apex` without --cuda_ext leaves it: the Python package,
    and (with_extensions) the compiled modules, here stand-ins with the same names."""
    (root / "apex" / "normalization").mkdir(parents=True)
    (root / "apex" / "transformer" / "functional").mkdir(parents=True)
    for package in ("apex", "apex/normalization", "apex/transformer", "apex/transformer/functional"):
        (root / package / "__init__.py").write_text("")
    (root / "apex" / "normalization" / "fused_layer_norm.py").write_text(textwrap.dedent("""\
        def fused_rms_norm_affine(x, w, shape, eps): raise RuntimeError("no kernels")
        def fused_layer_norm_affine(x, w, b, shape, eps): raise RuntimeError("no kernels")
        """))
    (root / "apex" / "transformer" / "functional" / "fused_softmax.py").write_text(
        "class ScaledUpperTriangMaskedSoftmax:\n    pass\n")
    if with_extensions:
        for name in ("fused_layer_norm_cuda", "scaled_upper_triang_masked_softmax_cuda"):
            (root / f"{name}.py").write_text("")


@pytest.mark.parametrize("with_extensions", [False, True])
def test_apex_counts_only_with_its_cuda_extensions(tmp_path, monkeypatch, with_extensions):
    _fake_apex(tmp_path, with_extensions)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("apex", "fused_layer_norm_cuda",
                                                                "scaled_upper_triang_masked_softmax_cuda")]:
        monkeypatch.delitem(sys.modules, name)
    provided = vendor.apex_ops()
    if with_extensions:
        assert set(provided) == {"rms_norm", "layer_norm", "causal_softmax"}
        assert vendor.apex_extensions()["fused_layer_norm_cuda"]
    else:
        assert provided == {}
        assert not any(vendor.apex_extensions().values())


def test_apex_norm_guard_needs_matching_dtypes():
    """apex returns the weight's dtype: a bf16 input with an fp32 weight (mixed precision) is left to
    the next backend; fp64 is not an apex dtype."""
    assert vendor.apex_norm_takes(BF16, BF16) and vendor.apex_norm_takes(FP32, FP32, FP32)
    assert not vendor.apex_norm_takes(BF16, FP32) and not vendor.apex_norm_takes(BF16, BF16, FP32)
    assert not vendor.apex_norm_takes(torch.float64, torch.float64)
