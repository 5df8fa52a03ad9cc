"""FP8 with mixture of experts (docs/fp8.md "FP8 with MoE"): the experts' grouped GEMMs against the
dequantised reference, the FP8 dispatch's operand against the experts' own quantisation, and
moe_tiny-shaped FP8 training in EP layouts against the single rank's FP8 losses (float32, gloo).
"""

from __future__ import annotations

import pytest
import torch

from megatron_lite.fp8.grouped import GroupedFP8
from megatron_lite.fp8.recipe import Recipe
from megatron_lite.moe.experts import grouped_linear
from megatron_lite.tensor_parallel.weight_grad import WeightGradStore, attach_main_grad, defer_weight_grads
from test_fp8 import _logged, _losses, _toy_sink, rel
from test_moe import MOE_BASE, _par

COUNTS = [5, 0, 9, 2]  # rows per expert, one expert with none


def _dequantised_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scale: amax over the row -> 448 (e4m3) / 57344 (e5m2); the row's FP8 value, in fp64."""
    from megatron_lite.fp8.tensor import quantize

    return quantize(t, dtype, "rowwise").dequantize().double()


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_grouped_gemms_equal_the_dequantised_products(fmt):
    torch.manual_seed(0)
    recipe = Recipe(fmt, "tensorwise")
    fwd, bwd = recipe.forward_dtype, recipe.backward_dtype
    x = torch.randn(sum(COUNTS), 24, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(len(COUNTS), 40, 24) * 0.02)
    y = grouped_linear(x, weight, COUNTS, GroupedFP8(recipe, None))
    grad = torch.randn_like(y) * 1e-3
    y.backward(grad)

    x_q, g_q = _dequantised_rows(x.detach(), fwd), _dequantised_rows(grad, bwd)
    w_q = _dequantised_rows(weight.detach().reshape(len(COUNTS), -1), fwd).view(weight.shape)  # per expert
    ref_y, ref_dx, ref_dw, start = [], [], [], 0
    for g, n in enumerate(COUNTS):
        rows = slice(start, start + n)
        ref_y.append(x_q[rows] @ w_q[g].t())
        ref_dx.append(g_q[rows] @ w_q[g])
        ref_dw.append(g_q[rows].t() @ x_q[rows])
        start += n
    assert rel(y, torch.cat(ref_y)) < 1e-6
    assert rel(x.grad, torch.cat(ref_dx)) < 1e-6
    assert rel(weight.grad, torch.stack(ref_dw)) < 1e-6
    assert weight.grad[1].abs().max() == 0  # the expert with no rows


def test_grouped_weight_grad_through_main_grad_and_deferred():
    """The experts' FP8 weight gradient into main_grad through a grad sink, immediately and deferred
    (zb1p / zbv's split backward), equals autograd's param.grad bit for bit."""
    fp8 = GroupedFP8(Recipe("hybrid", "tensorwise"), None)
    grads = []
    for mode in ("autograd", "sink", "deferred"):
        weight = torch.nn.Parameter(torch.randn(len(COUNTS), 16, 8, generator=torch.Generator().manual_seed(1)))
        x = torch.randn(sum(COUNTS), 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        if mode != "autograd":
            attach_main_grad(weight, torch.zeros_like(weight), _toy_sink())
        y = grouped_linear(x, weight, COUNTS, fp8)
        if mode == "deferred":
            store = WeightGradStore()
            with defer_weight_grads(store):
                y.sum().backward()
            assert len(store) == 1 and not weight.main_grad.any()
            store.run()
        else:
            y.sum().backward()
        grads.append(weight.grad if mode == "autograd" else weight.main_grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_enable_converts_experts_and_shared_expert_not_router():
    """FP8Model.enable: every MoE layer's experts (per-token / per-expert scaling) and shared expert
    (a dense MLP's linears) run FP8; the router, the embedding and the output layer do not. One MoE
    layer's output in FP8 is within FP8's error of its high-precision output, and not equal to it."""
    from megatron_lite.config import load_config
    from megatron_lite.fp8.model import FP8Model
    from megatron_lite.model import build_model_chunks
    from megatron_lite.moe.layer import MoE

    cfg = load_config(["model=moe_tiny", "model.moe.shared_expert_ffn_hidden_size=32"]).model
    chunk = build_model_chunks(cfg, 4096)[0]
    moe = next(m for m in chunk.modules() if isinstance(m, MoE))
    x = torch.randn(2, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    high = moe(x)
    fp8 = FP8Model.enable([chunk], Recipe("hybrid", "delayed"))
    layers = [m for m in chunk.modules() if isinstance(m, MoE)]
    assert len(fp8.experts) == len(layers) and all(m.experts.fp8 is not None for m in layers)
    assert all(m.shared_expert.fc1.fp8 is not None and m.shared_expert.fc2.fp8 is not None for m in layers)
    assert not any("router" in name or "embedding" in name or "output" in name for name, _ in fp8.layers)
    assert all(not hasattr(m.router, "fp8") for m in layers)
    low = moe(x)
    assert 0 < rel(low, high) < 0.1


# Layouts -----------------------------------------------------------------------------------------
FP8_MOE = MOE_BASE + ["training.fp8_format=hybrid", "training.train_iters=3", "training.eval_interval=3"]
FP8_LAYOUTS = {  # name -> (ranks, overrides); EP spans DP in both (one expert GEMM mixes microbatches)
    "EP2": (2, _par(ep=2)),
    "TP2(SP)×EP2": (4, _par(tp=2, ep=2)),
}


@pytest.fixture(scope="module")
def fp8_moe_single_rank(ranks, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp8_moe_ref")
    return _logged(ranks(1).run(_losses, FP8_MOE + [f"logging.dir={run_dir}"]))


@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
def test_fp8_moe_layout_matches_single_rank(ranks, fp8_moe_single_rank, tmp_path, layout):
    n, overrides = FP8_LAYOUTS[layout]
    losses = _logged(ranks(n).run(_losses, FP8_MOE + overrides + [f"logging.dir={tmp_path}"]))
    err = rel(torch.tensor(losses), torch.tensor(fp8_moe_single_rank))
    print(f"FP8 MoE {layout}: losses {losses} single rank {fp8_moe_single_rank} relative {err:.1e}")
    assert len(losses) == 3 and err < 1e-4
