"""Mixture of experts: every layout against the single rank (float32, gloo), the router's and the
dispatcher's parts against plain references, the configuration's error lines.

The layout runs train a small MoE (a dense first layer, then MoE layers of 8 experts, top-2, a
shared expert, aux and z losses) for a few iterations in each layout and compare with the single
rank: per-iteration losses and gradient norms (≤ 1e-6 relative), every MoE layer's tokens per
expert (integer-equal every iteration), aux / z-loss values, and the final parameters (≤ 1e-5).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_lite.checkpoint.gather import gather_full_state_dict
from megatron_lite.config import ConfigError, load_config, validate

MOE_BASE = [
    "model=moe_tiny", "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=32", "model.moe.ffn_hidden_size=32",
    "model.moe.shared_expert_ffn_hidden_size=32", "model.moe.z_loss_coeff=0.001", "model.moe.aux_loss_coeff=0.01",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=4",
    "training.eval_interval=4", "training.eval_iters=1", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "optimizer.eps=1e-4", "optimizer.lr=3e-3", "logging.log_interval=100",
]
LOSS_TOLERANCE, PARAM_TOLERANCE = 1e-6, 1e-5


def _par(tp=1, pp=1, cp=1, ep=1, etp=1, *extra):
    out = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
           f"parallel.context_parallel_size={cp}", f"parallel.expert_model_parallel_size={ep}",
           f"parallel.expert_tensor_parallel_size={etp}"]
    return out + (["parallel.sequence_parallel=true"] if tp > 1 else []) + list(extra)


# name -> (ranks, overrides). EP4 (with the distributed optimizer) is the checkpoint test's run.
LAYOUTS = {
    "EP2 allgather dispatcher": (2, _par(ep=2) + ["model.moe.token_dispatcher=allgather"]),
    "TP2(SP)×EP2": (4, _par(tp=2, ep=2)),
    "ETP2×EP2": (4, _par(ep=2, etp=2)),
    "CP2×EP2": (4, _par(cp=2, ep=2)),
    "EP2 + distributed optimizer + full recompute": (4, _par(ep=2) + [
        "optimizer.use_distributed_optimizer=true", "training.recompute=full"]),
    "PP2×EP2 1f1b": (4, _par(pp=2, ep=2) + ["parallel.pipeline_schedule=1f1b"]),
    "PP2×EP2 interleaved": (4, _par(pp=2, ep=2) + ["parallel.virtual_pipeline_model_parallel_size=2"]),
    "PP2×EP2 zb1p": (4, _par(pp=2, ep=2) + ["parallel.pipeline_schedule=zb1p"]),
    "PP2×EP2 zbv": (4, _par(pp=2, ep=2) + ["parallel.pipeline_schedule=zbv"]),
}


def _train(overrides: list[str]) -> dict | None:
    from megatron_lite.train import run

    trainer = run(load_config(overrides))
    full = gather_full_state_dict(trainer.chunks, trainer.state)
    trainer.state.destroy()
    return full if trainer.state.rank == 0 else None


def _records(run_dir) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "valid"]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def moe_reference(ranks, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe_reference")
    params = ranks(1).run(_train, MOE_BASE + [f"logging.dir={run_dir}"])[0]
    return _records(run_dir), params


def _compare(name, run_dir, params, reference) -> dict:
    (ref_train, ref_valid), ref_params = reference
    train, valid = _records(run_dir)
    assert [r["iteration"] for r in train] == [r["iteration"] for r in ref_train]
    count_keys = [k for k in ref_train[0] if k.endswith("tokens_per_expert")]
    assert count_keys
    for r, ref in zip(train, ref_train):  # routing decisions: integer-equal every iteration
        assert {k: r[k] for k in count_keys} == {k: ref[k] for k in count_keys}, (name, r["iteration"])
    stat_keys = [k for k in ref_train[0] if k.endswith("aux_loss") or k.endswith("z_loss")]
    errors = {
        "loss": rel([r["loss"] for r in train], [r["loss"] for r in ref_train]),
        "grad norm": rel([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref_train]),
        "valid": rel([r["loss"] for r in valid], [r["loss"] for r in ref_valid]),
        "aux/z": max(rel([r[k] for r in train], [r[k] for r in ref_train]) for k in stat_keys),
    }
    assert params.keys() == ref_params.keys()
    errors["params"] = max(rel(params[k], ref_params[k]) for k in params)
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors["loss"], errors["grad norm"], errors["valid"], errors["aux/z"]) < LOSS_TOLERANCE, errors
    assert errors["params"] < PARAM_TOLERANCE, errors
    return errors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_single_rank(ranks, moe_reference, tmp_path, layout):
    n, overrides = LAYOUTS[layout]
    params = ranks(n).run(_train, MOE_BASE + overrides + [f"logging.dir={tmp_path}"])[0]
    _compare(layout, tmp_path, params, moe_reference)


def _compare_tail(name, run_dir, params, ref_run_dir, ref_params, tolerance, start) -> None:
    """Iterations from ``start`` on and the final parameters of a resumed run against a reference."""
    train = [r for r in _records(run_dir)[0] if r["iteration"] >= start]
    ref = [r for r in _records(ref_run_dir)[0] if r["iteration"] >= start]
    assert [r["iteration"] for r in train] == [r["iteration"] for r in ref] and train
    loss = rel([r["loss"] for r in train], [r["loss"] for r in ref])
    norm = rel([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref])
    counts = [k for k in ref[0] if k.endswith("tokens_per_expert")]
    assert [[r[k] for k in counts] for r in train] == [[r[k] for k in counts] for r in ref], name
    param = max(rel(params[k], ref_params[k]) for k in ref_params)
    print(f"{name}: loss {loss:.1e} grad norm {norm:.1e} params {param:.1e}")
    assert max(loss, norm) <= tolerance and param <= max(tolerance, 10 * tolerance), (name, loss, norm, param)


def test_moe_checkpoint_reshards_ep(ranks, moe_reference, tmp_path):
    """EP4 with the distributed optimizer (ZeRO state over EDP, expert bias on) saves at iteration 2
    and trains on to 4 (equal to the single rank); its checkpoint resumes bit-identically in EP4 and
    equal to the single rank in EP2 and EP1: experts at full shape, keys independent of the layout."""
    bias = ["model.moe.score_function=sigmoid", "model.moe.expert_bias=true", "model.moe.bias_update_rate=0.01"]
    base = MOE_BASE + bias + [f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=2"]
    zero = ["optimizer.use_distributed_optimizer=true"]
    ref_dir, full_dir = tmp_path / "ref", tmp_path / "ep4"
    ref = ranks(1).run(_train, MOE_BASE + bias + [f"logging.dir={ref_dir}"])[0]
    full = ranks(4).run(_train, base + _par(ep=4) + zero + [f"logging.dir={full_dir}"])[0]
    _compare_tail("EP4 + ZeRO (expert bias)", full_dir, full, ref_dir, ref, LOSS_TOLERANCE, 1)
    resume = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2", "checkpoint.save=null"]
    for name, n, layout in (("EP4→EP4", 4, _par(ep=4) + zero), ("EP4→EP2", 2, _par(ep=2) + zero), ("EP4→EP1", 1, [])):
        run_dir = tmp_path / name.replace("→", "_to_")
        params = ranks(n).run(_train, MOE_BASE + bias + layout + resume + [f"logging.dir={run_dir}"])[0]
        if name == "EP4→EP4":
            _compare_tail(name, run_dir, params, full_dir, full, 0.0, 3)  # bit-identical
        else:
            _compare_tail(name, run_dir, params, ref_dir, ref, LOSS_TOLERANCE, 3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_moe_low_precision_checkpoint_round_trip(ranks, tmp_path, precision):
    """EP2 in bf16 / fp16 (fp32 masters, the fp16 loss scale on the balancing losses too) saves at
    iteration 2; resuming there repeats iterations 3-4 bit for bit."""
    base = MOE_BASE + _par(ep=2) + [f"training.precision={precision}", "training.initial_loss_scale=4096"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = ranks(2).run(_train, base + [f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=2",
                                        f"logging.dir={full_dir}"])[0]
    resumed = ranks(2).run(_train, base + [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2",
                                           f"logging.dir={resumed_dir}"])[0]
    assert all(math.isfinite(r["loss"]) for r in _records(full_dir)[0])
    _compare_tail(f"EP2 {precision} round trip", resumed_dir, resumed, full_dir, full, 0.0, 3)
