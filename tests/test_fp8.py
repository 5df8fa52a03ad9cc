"""FP8 training (docs/fp8.md), in fp32 activations on the CPU.

- The GEMMs: a linear layer's forward, input gradient and weight gradient equal the products of the
  dequantised FP8 operands (1e-6 relative, against float64), for every recipe; the CPU's
  ``torch._scaled_mm`` computes what the FP8 GEMM does; gradient-accumulation fusion and the deferred
  weight gradients of the zero-bubble schedules give the same weight gradient.
- Quantisation: the error within each format's bound, saturation, zeros, non-finite inputs; the
  scale rule equals torchao's where torchao is installed.
- Layout invariance: every layout (TP with SP, PP under zb1p and zbv, CP, DP with the distributed
  optimizer) gives the single rank's FP8 losses within 1e-4 relative, under delayed scaling (whose
  first iteration scales from the current amax, as tensorwise does) and rowwise.
- Delayed scaling through a checkpoint: the resumed run's losses are bit-identical.
"""

from pathlib import Path

import pytest
import torch

from megatron_lite.config import ConfigError, load_config, validate
from megatron_lite.fp8.linear import LinearFP8
from megatron_lite.fp8.recipe import Recipe
from megatron_lite.fp8.tensor import FORMATS, amax_to_scale, fp8_max, mm, quantize
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_lite.tensor_parallel.weight_grad import WeightGradStore, attach_main_grad, defer_weight_grads

E4M3, E5M2 = FORMATS["e4m3"], FORMATS["e5m2"]
RECIPES = ["tensorwise", "delayed", "rowwise", "blockwise"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _layer(recipe: str, column: bool = True, fmt: str = "hybrid"):
    torch.manual_seed(0)
    cls = ColumnParallelLinear if column else RowParallelLinear
    layer = cls(128, 256, TPGroup(), bias=False)
    torch.nn.init.normal_(layer.weight, std=0.02)
    layer.fp8 = LinearFP8(Recipe(fmt, recipe), None, column)
    return layer


@pytest.mark.parametrize("recipe", RECIPES)
def test_gemms_equal_the_dequantised_products(recipe):
    layer = _layer(recipe)
    r = layer.fp8.recipe
    x = torch.randn(2, 128, 128, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y) * 1e-3
    y.backward(grad)

    def q(t, dtype, block_rows=1):  # the operand as the recipe quantises it, dequantised
        return quantize(t, dtype, r.granularity, block_rows=block_rows).dequantize().double()

    x2, g2, w = x.detach().reshape(-1, 128), grad.reshape(-1, 256), layer.weight.detach()
    fwd, bwd, wb = r.forward_dtype, r.backward_dtype, r.weight_block_rows
    w_q = q(w, fwd, wb)
    # dgrad's Wᵀ: rowwise requantises along out; a tensor-wide scale or 128 × 128 blocks transpose.
    w_t = q(w.t(), fwd) if r.granularity == "rowwise" else w_q.t()
    g_q = q(g2, bwd)
    if r.tensor_scaled:  # one quantisation of x and dy serves both GEMMs
        g_t, x_t = g_q.t(), q(x2, fwd).t()
    else:
        g_t, x_t = q(g2.t(), bwd), q(x2.t(), fwd)
    assert rel(y.reshape(-1, 256), q(x2, fwd) @ w_q.t()) < 1e-6
    assert rel(x.grad.reshape(-1, 128), g_q @ w_t.t()) < 1e-6
    assert rel(layer.weight.grad, g_t @ x_t.t()) < 1e-6


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_bf16_activations(recipe):
    """On top of bf16 (the GPU case): bf16 outputs and input gradients, an fp32 weight gradient in
    main_grad, near the fp32-activation FP8 layer's (in norm: bf16's rounding of x moves some values
    across an FP8 rounding boundary, one FP8 step each)."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(recipe).to(dtype)
        attach_main_grad(layer.weight, torch.zeros(layer.weight.shape), _toy_sink())
        x = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(5)).to(dtype).requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y))
        assert y.dtype == x.grad.dtype == dtype and layer.weight.main_grad.dtype == torch.float32
        results.append((y.float(), x.grad.float(), layer.weight.main_grad))
    for ours, reference in zip(results[1], results[0]):  # bf16's input rounding flips some FP8 roundings
        assert ((ours - reference).norm() / reference.norm()).item() < 2e-2


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_cpu_scaled_mm_is_the_same_gemm(granularity):
    """torch 2.13's CPU _scaled_mm (the FP8 GEMM kernel's contract) equals ``mm``'s product."""
    torch.manual_seed(1)
    a = quantize(torch.randn(32, 64), E4M3, granularity)
    b = quantize(torch.randn(48, 64) * 1e-3, E5M2, granularity)
    inv_b = b.inv_scale if granularity == "tensorwise" else b.inv_scale.t()
    kernel = torch._scaled_mm(a.data, b.data.t(), scale_a=a.inv_scale, scale_b=inv_b, out_dtype=torch.float32)
    assert rel(mm(a, b), kernel) < 1e-6


def test_scaled_mm_guard_shape_rules():
    """When the GPU's FP8 GEMM (torch._scaled_mm) runs; elsewhere the fp32 product does."""
    from megatron_lite.fp8.tensor import scaled_mm_takes

    bf16, fp32 = torch.bfloat16, torch.float32
    assert scaled_mm_takes(True, "tensorwise", "tensorwise", E4M3, E5M2, 4096, 1600, 4800, bf16)
    assert scaled_mm_takes(True, "tensorwise", "tensorwise", E4M3, E4M3, 16, 16, 16, fp32)
    assert not scaled_mm_takes(False, "tensorwise", "tensorwise", E4M3, E4M3, 16, 16, 16, fp32)  # CPU
    for m, k, n in ((8, 16, 16), (16, 24, 16), (16, 16, 40)):  # every dimension a multiple of 16
        assert not scaled_mm_takes(True, "tensorwise", "tensorwise", E4M3, E4M3, m, k, n, bf16)
    assert not scaled_mm_takes(True, "tensorwise", "tensorwise", E5M2, E5M2, 16, 16, 16, bf16)
    assert scaled_mm_takes(True, "rowwise", "rowwise", E4M3, E4M3, 16, 16, 16, bf16)
    assert not scaled_mm_takes(True, "rowwise", "rowwise", E4M3, E4M3, 16, 16, 16, fp32)  # rowwise: bf16 out
    assert not scaled_mm_takes(True, "blockwise", "blockwise", E4M3, E4M3, 128, 128, 128, bf16)
    assert not scaled_mm_takes(True, "tensorwise", "rowwise", E4M3, E4M3, 16, 16, 16, bf16)


def _toy_sink():
    class Sink:
        def accumulate(self, param, work, notify):
            work.add_to(param.main_grad)
    return Sink()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_main_grad_fusion_and_deferred_weight_grads(recipe):
    """The FP8 weight gradient through a grad sink into main_grad, immediately and deferred
    (zb1p/zbv's split backward), equals autograd's param.grad bit for bit."""
    grads = []
    for mode in ("autograd", "sink", "deferred"):
        layer = _layer(recipe, column=False)
        x = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(3), requires_grad=True)
        if mode != "autograd":
            attach_main_grad(layer.weight, torch.zeros_like(layer.weight), _toy_sink())
        y = layer(x)
        if mode == "deferred":
            store = WeightGradStore()
            with defer_weight_grads(store):
                y.sum().backward()
            assert len(store) == 1 and not layer.weight.main_grad.any()
            store.run()
        else:
            y.sum().backward()
        grads.append(layer.weight.grad if mode == "autograd" else layer.weight.main_grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


# Quantisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_quantisation_error_within_the_format_bound(dtype, mantissa_bits):
    """Round to nearest: relative error ≤ 2^-(m+1) for every value scaled into the normal range."""
    torch.manual_seed(2)
    x = torch.randn(4096) * torch.logspace(-2, 2, 4096)
    q = quantize(x, dtype)
    scaled = x.abs() * q.inv_scale.reciprocal()
    normal = scaled >= torch.finfo(dtype).smallest_normal
    err = ((q.dequantize() - x).abs() / x.abs())[normal]
    assert normal.float().mean() > 0.9 and err.max() <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-6)
    assert (q.data.float().abs().max() == fp8_max(dtype))  # the amax maps to the largest value


def test_saturation_zeros_and_non_finite_inputs():
    # A value beyond the (delayed) scale's range saturates to ±max instead of overflowing.
    q = quantize(torch.tensor([1.0, 1000.0, -1000.0]), E4M3, scale=torch.tensor(1.0))
    assert q.data.float().tolist() == [1.0, 448.0, -448.0]
    # Zeros: scale 1, exact zeros; a margin lowers the scale by 2^margin.
    zeros = quantize(torch.zeros(8), E4M3)
    assert zeros.inv_scale.item() == 1.0 and not zeros.dequantize().any()
    assert amax_to_scale(torch.tensor(448.0), E4M3, margin=2).item() == 0.25
    # Non-finite inputs stay non-finite where they were (so the step is skipped), not clamped.
    x = torch.tensor([1.0, float("inf"), float("nan"), -2.0])
    for dtype in (E4M3, E5M2):
        values = quantize(x, dtype).dequantize()
        assert torch.isfinite(values).tolist() == [True, False, False, True]
        assert values[0] == 1.0 and values[3] == -2.0
    y = mm(quantize(x.view(1, 4), E4M3), quantize(torch.ones(2, 4), E4M3))
    assert not torch.isfinite(y).any()


def test_scale_rule_matches_torchao():
    """What we would take from torchao's float8 building blocks, we compute identically."""
    utils = pytest.importorskip("torchao.float8.float8_utils")
    torch.manual_seed(4)
    for dtype in (E4M3, E5M2):
        x = torch.randn(64, 32) * 3
        ours = quantize(x, dtype)
        scale = utils.tensor_to_scale(x, dtype)
        assert torch.equal(ours.inv_scale.reciprocal(), scale)
        assert torch.equal(ours.data, utils.to_fp8_saturated(x * scale, dtype))


# Configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key,text", [
    (["training.precision=fp8"], "training.precision", "training.fp8_format=hybrid"),
    (["training.fp8_format=e5m2"], "training.fp8_format", "is not one of null, e4m3, hybrid"),
    (["training.fp8_format=hybrid", "training.precision=fp16"], "training.fp8_format", "precision=bf16"),
    (["training.fp8_format=hybrid", "training.fp8_recipe=blockwise", "model.hidden_size=64"], "training.fp8_recipe",
     "multiples of 128"),
    (["training.fp8_format=hybrid", "training.first_last_layers_bf16=true", "training.num_layers_at_start_in_bf16=2",
      "training.num_layers_at_end_in_bf16=2"], "training.num_layers_at_start_in_bf16", "leave none"),
])
def test_config_refuses(overrides, key, text):
    with pytest.raises(ConfigError) as err:
        validate(load_config(overrides), 1)
    assert err.value.key == key and text in str(err.value), str(err.value)


def test_blockwise_accepts_128_aligned_shapes():
    validate(load_config(["training.fp8_format=hybrid", "training.fp8_recipe=blockwise"]), 1)  # gpt_tiny


# Layouts -----------------------------------------------------------------------------------------
LAYOUT_BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.seq_length=16", "training.micro_batch_size=2", "training.global_batch_size=8",
    "training.train_iters=3", "training.eval_interval=3", "training.eval_iters=0", "logging.log_interval=100",
    "optimizer.eps=1e-4", "training.fp8_format=hybrid",
]
DELAYED = ["training.fp8_recipe=delayed", "training.fp8_amax_history_len=4"]
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
PP2 = "parallel.pipeline_model_parallel_size=2"
LAYOUTS = {  # 4 ranks each
    "delayed_pp2_zb1p_dp2_distopt": DELAYED + [PP2, "parallel.pipeline_schedule=zb1p",
                                               "optimizer.use_distributed_optimizer=true"],
    "delayed_pp2_zbv_tp2_sp": DELAYED + [PP2, "parallel.pipeline_schedule=zbv", *TP2_SP],
    "delayed_cp2_tp2_sp": DELAYED + ["parallel.context_parallel_size=2", *TP2_SP],
    "rowwise_cp2_tp2_sp": ["training.fp8_recipe=rowwise", "parallel.context_parallel_size=2", *TP2_SP],
}


def _losses(overrides: list[str]) -> list[float] | None:
    """The run's per-iteration losses on its logging rank (None elsewhere)."""
    from megatron_lite.train import run
    from test_training import read_metrics

    trainer = run(load_config(overrides))
    trainer.state.destroy()
    if not trainer.is_logging_rank:
        return None
    run_dir = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("logging.dir="))
    return [r["loss"] for r in read_metrics(Path(run_dir))[0]]


def _logged(results: list) -> list[float]:
    return next(r for r in results if r is not None)


@pytest.fixture(scope="module")
def single_rank(ranks, tmp_path_factory):
    out = {}
    for recipe in (DELAYED, ["training.fp8_recipe=rowwise"]):
        run_dir = tmp_path_factory.mktemp("fp8_ref")
        out[recipe[0]] = _logged(ranks(1).run(_losses, LAYOUT_BASE + recipe + [f"logging.dir={run_dir}"]))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank_fp8(ranks, single_rank, tmp_path, layout):
    overrides = LAYOUT_BASE + LAYOUTS[layout] + [f"logging.dir={tmp_path}"]
    losses = _logged(ranks(4).run(_losses, overrides))
    reference = single_rank[LAYOUTS[layout][0]]
    err = rel(torch.tensor(losses), torch.tensor(reference))
    print(f"{layout}: losses {losses} single rank {reference} relative {err:.1e}")
    assert len(losses) == 3 and err < 1e-4


def _loaded_histories(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The delayed-scaling histories this rank holds after loading ``checkpoint.load``."""
    import torch.distributed as dist

    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    assert trainer.resume()
    histories = trainer.fp8.state_tensors()
    trainer.checkpointer.finish(trainer.iteration)
    state.destroy()
    return histories


def _merged(results: list[dict]) -> dict:
    return {k: v for r in results for k, v in r.items()}


def test_delayed_scaling_resumes_bit_identically(ranks, tmp_path):
    """3 iterations straight, against 2 + a resume from the checkpoint of iteration 2 (TP 2, DP 2:
    the histories are reduced, saved once as replicated tensors, read by every rank); and resumed in
    another layout."""
    from megatron_lite.checkpoint.storage import find_checkpoint

    common = LAYOUT_BASE + DELAYED + TP2_SP + ["checkpoint.save_interval=2"]
    straight = _logged(ranks(4).run(_losses, common + [f"logging.dir={tmp_path / 'a'}",
                                                      f"checkpoint.save={tmp_path / 'ckpt'}"]))
    resumed = _logged(ranks(4).run(_losses, common + [f"logging.dir={tmp_path / 'b'}",
                                                     f"checkpoint.load={tmp_path / 'ckpt'}",
                                                     "checkpoint.load_iteration=2"]))
    assert resumed == straight[2:], (straight, resumed)
    # Resharded: the histories saved by TP 2 × DP 2 load, bit for bit, into PP 2 × DP 2 (each stage
    # its own layers') as into the saving layout.
    load = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2"]
    same = _merged(ranks(4).run(_loaded_histories, common + load))
    resharded = _merged(ranks(4).run(_loaded_histories, LAYOUT_BASE + DELAYED + [PP2] + load))
    assert len(same) == 16 and same.keys() == resharded.keys()
    assert all(torch.equal(same[k], resharded[k]) and same[k][:, :2].all() for k in same)
    keys = find_checkpoint(str(tmp_path / "ckpt"), 2).keys()
    assert "fp8/layers.0.attention.qkv.weight/amax_history" in keys
    assert sum(k.startswith("fp8/") for k in keys) == 4 * 4  # 4 layers × QKV, out, fc1, fc2


def test_planner_fp8_term():
    """FP8 runs the FP8 layers' GEMMs at twice the bf16 peak on Hopper, minus the quantisation
    passes; no gain on a GPU without FP8 tensor cores; layers kept in bf16 gain nothing."""
    from megatron_lite.plan.devices import DEVICES
    from megatron_lite.plan.estimate import fp8_saving, predict, setup_from_config

    base = ["model=gpt_1p5b", "training.precision=bf16", "training.global_batch_size=64", "training.micro_batch_size=4"]

    def setup(*extra):
        return setup_from_config(load_config(base + list(extra)), 8, 50257)

    bf16, fp8 = setup(), setup("training.fp8_format=hybrid")
    kept = setup("training.fp8_format=hybrid", "training.first_last_layers_bf16=true")
    h100, a100 = DEVICES["H100-80G"], DEVICES["A100-80G"]
    assert fp8.fp8_layers == 48 and kept.fp8_layers == 46 and bf16.fp8_layers == 0
    assert predict(fp8, h100).tokens_per_s > 1.2 * predict(bf16, h100).tokens_per_s
    assert fp8_saving(fp8, a100) == 0.0 and fp8_saving(bf16, h100) == 0.0
    assert 0 < fp8_saving(kept, h100) < fp8_saving(fp8, h100)
