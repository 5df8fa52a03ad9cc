"""Mixture of experts: every layout against the single rank (float32, gloo), the router's and the
dispatcher's parts against plain references, the configuration's error lines.

The layout runs train a small MoE (a dense first layer, then MoE layers of 8 experts, top-2, a
shared expert, the sequence aux loss and the z loss) for a few iterations in each layout and compare with the single
rank: per-iteration losses and gradient norms (≤ 1e-6 relative), every MoE layer's tokens per
expert (integer-equal every iteration), aux / z-loss values, and the final parameters (≤ 1e-5).
"""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from test_training import REPO

from megatron_lite.checkpoint.gather import gather_full_state_dict
from megatron_lite.config import ConfigError, load_config, validate

sys.path.insert(0, str(REPO))  # benchmarks/: the plain MoE and the communication counter

MOE_BASE = [
    "model=moe_tiny", "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.seq_length=32", "model.moe.ffn_hidden_size=32",
    "model.moe.shared_expert_ffn_hidden_size=32", "model.moe.z_loss_coeff=0.001", "model.moe.aux_loss_coeff=0.01",
    # The per-sequence aux loss: its counts cross the TP and CP splits of each sequence (the plain
    # switch aux loss is checked against a plain MoE below).
    "model.moe.load_balancing=seq_aux_loss",
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
    equal to the single rank in EP2, EP1 and EP8 (one expert per rank, micro batch 1 so that DP 8
    divides the batch): experts at full shape, keys independent of the layout."""
    bias = ["model.moe.score_function=sigmoid", "model.moe.expert_bias=true", "model.moe.bias_update_rate=0.01"]
    base = MOE_BASE + bias + [f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=2"]
    zero = ["optimizer.use_distributed_optimizer=true"]
    ref_dir, full_dir = tmp_path / "ref", tmp_path / "ep4"
    ref = ranks(1).run(_train, MOE_BASE + bias + [f"logging.dir={ref_dir}"])[0]
    full = ranks(4).run(_train, base + _par(ep=4) + zero + [f"logging.dir={full_dir}"])[0]
    _compare_tail("EP4 + ZeRO (expert bias)", full_dir, full, ref_dir, ref, LOSS_TOLERANCE, 1)
    # One process reads the EP4 checkpoint whole (what generate and the HF export use): the same
    # weights, and the expert biases the steps moved.
    from megatron_lite.checkpoint.hf import load_model

    _, model = load_model(tmp_path / "ckpt")
    assert {n: p for n, p in model.named_parameters()}.keys() == full.keys()
    assert all(torch.equal(p.detach(), full[n]) for n, p in model.named_parameters())
    biases = [b for n, b in model.named_buffers() if n.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    resume = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2", "checkpoint.save=null"]
    for name, n, layout in (("EP4→EP4", 4, _par(ep=4) + zero), ("EP4→EP2", 2, _par(ep=2) + zero), ("EP4→EP1", 1, []),
                            ("EP4→EP8", 8, _par(ep=8) + zero + ["training.micro_batch_size=1"])):
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


# Parts against plain references, on one process ---------------------------------------------------
@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.expert_model_parallel_size=3"], 4, "parallel.expert_model_parallel_size: 3 does not divide"),
    (["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2"], 4, "parallel.sequence_parallel"),
    (["parallel.expert_model_parallel_size=4", "parallel.expert_tensor_parallel_size=2"], 4, "ETP×EP = 2×4 does not divide"),
    (["model.moe.router_topk=9"], 1, "model.moe.router_topk"),
    (["model.moe.num_groups=3", "model.moe.group_topk=1"], 1, "model.moe.num_groups"),
    (["model.moe.expert_bias=true"], 1, "model.moe.expert_bias"),
    (["model.moe.pad_to_capacity=true"], 1, "model.moe.pad_to_capacity"),
    (["model.moe.num_experts=null", "parallel.expert_model_parallel_size=2"], 2, "needs an MoE model"),
])
def test_bad_moe_configs_are_one_line(overrides, world, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(load_config(["model=moe_tiny", *overrides]), world)


def _reference_route(logits, moe, bias=None):
    """Routing written token by token, the way the papers state it."""
    weights, experts = [], []
    E, k = logits.shape[1], moe.router_topk
    for row in logits:
        scores = torch.softmax(row, 0) if moe.score_function == "softmax" else torch.sigmoid(row)
        choice = (scores if moe.pre_softmax or moe.score_function == "sigmoid" else row).clone()
        if bias is not None:
            choice = choice + bias
        if moe.num_groups:
            size = E // moe.num_groups
            group_score = [sorted(choice[g * size:(g + 1) * size].tolist())[-(k // moe.group_topk):] for g in range(moe.num_groups)]
            best = sorted(range(moe.num_groups), key=lambda g: -sum(group_score[g]))[: moe.group_topk]
            choice = torch.tensor([c if i // size in best else -math.inf for i, c in enumerate(choice.tolist())])
        chosen = torch.topk(choice, k).indices
        if moe.score_function == "softmax" and not moe.pre_softmax:
            w = torch.softmax(row[chosen], 0)
        else:
            w = scores[chosen]
            if moe.score_function == "sigmoid" and k > 1:
                w = w / w.sum()
        weights.append(w * (moe.topk_scaling_factor or 1.0))
        experts.append(chosen)
    return torch.stack(weights), torch.stack(experts)


@pytest.mark.parametrize("overrides", [
    [], ["model.moe.pre_softmax=true"], ["model.moe.score_function=sigmoid", "model.moe.expert_bias=true"],
    ["model.moe.num_groups=4", "model.moe.group_topk=2", "model.moe.router_topk=4", "model.moe.pre_softmax=true",
     "model.moe.topk_scaling_factor=2.5"],
])
def test_router_matches_the_per_token_reference(overrides):
    from megatron_lite.moe import ExpertGroups, Router
    from megatron_lite.parallel.collectives import TPGroup

    cfg = load_config(["model=moe_tiny", *overrides]).model
    router = Router(cfg, TPGroup(), ExpertGroups())
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, cfg.moe.num_experts))
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, experts = router._route(torch.nn.functional.linear(x, router.weight))
    ref_weights, ref_experts = _reference_route(x @ router.weight.t(), cfg.moe, router.expert_bias)
    assert torch.equal(experts.sort(-1).values, ref_experts.sort(-1).values)
    order, ref_order = experts.argsort(-1), ref_experts.argsort(-1)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-6, atol=1e-7)


def test_grouped_gemm_matches_the_loop():
    from megatron_lite.moe.experts import grouped_matmul, loop_matmul

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 16, generator=g), torch.randn(4, 32, 16, generator=g)
    counts = [10, 0, 25, 5]  # an expert with no tokens
    reference = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate([(0, 10), (10, 10), (10, 35), (35, 40)])])
    torch.testing.assert_close(grouped_matmul(x, w, counts), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loop_matmul(x, w.transpose(1, 2), counts), reference, rtol=1e-6, atol=1e-6)


def test_capacity_drops_by_policy_and_pads():
    from megatron_lite.moe.dispatch import assign, combine_rows

    g = torch.Generator().manual_seed(0)
    n, E, k = 32, 4, 2
    weights = torch.rand(n, k, generator=g)
    experts = torch.stack([torch.zeros(n, dtype=torch.long), torch.randint(1, E, (n,), generator=g)], 1)  # expert 0 crowded
    capacity = math.ceil(n * k / E * 1.0)
    a = assign(weights, experts, E, capacity_factor=1.0, drop_policy="probs")
    counts = torch.bincount(a.expert, minlength=E)
    assert counts.max() <= capacity and a.dropped == n * k - counts.sum()
    kept0 = a.weight[a.expert == 0]
    assert kept0.min() >= weights[:, 0].sort(descending=True).values[capacity - 1]  # the heaviest kept
    by_position = assign(weights, experts, E, capacity_factor=1.0, drop_policy="position")
    assert by_position.token[by_position.expert == 0].tolist() == list(range(capacity))  # the earliest kept
    padded = assign(weights, experts, E, capacity_factor=1.0, pad_to_capacity=True)
    assert torch.bincount(padded.expert, minlength=E).tolist() == [capacity] * E
    rows = torch.randn(padded.token.numel(), 8, generator=g)
    out = combine_rows(rows, padded, n)  # padding rows (token n) fall off the end
    real = padded.token < n
    reference = torch.zeros(n, 8).index_add(0, padded.token[real], rows[real] * padded.weight[real, None])
    torch.testing.assert_close(out, reference)


def test_moe_layer_matches_a_plain_pytorch_moe():
    """Our MoE layer against the nanoGPT-style loop over experts (benchmarks/moe_step.py): output,
    and every gradient including the aux loss's share of the router's (attached through autograd)."""
    from benchmarks.moe_step import PlainMoE, build_layer

    ours = build_layer(["model.hidden_size=32", "model.moe.ffn_hidden_size=16",
                        "model.moe.shared_expert_ffn_hidden_size=16"]).train()
    plain = PlainMoE.copy_of(ours)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    out, (ref, aux) = ours(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    (ref.square().sum() + aux).backward()
    assert ours.router.aux_loss.item() == pytest.approx(aux.item(), rel=1e-6)
    torch.testing.assert_close(ours.router.weight.grad, plain.router.weight.grad, rtol=1e-5, atol=1e-7)
    f = 16
    for e, expert in enumerate(plain.experts):
        torch.testing.assert_close(ours.experts.fc1.weight.grad[e, :f], expert.gate.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.experts.fc2.weight.grad[e], expert.down.weight.grad, rtol=1e-5, atol=1e-6)


def test_planner_counts_expert_parameters():
    """The planner's parameters per rank against the model built at EP 1 and as EP rank 0 of 4."""
    from megatron_lite.model import build_model_chunks
    from megatron_lite.moe import ExpertGroups
    from megatron_lite.parallel.collectives import TPGroup
    from megatron_lite.plan import memory as M

    cfg = load_config(["model=moe_tiny"]).model
    for ep in (1, 4):
        chunk = build_model_chunks(cfg, 4096, experts=ExpertGroups(ep=TPGroup(None, ep, 0)))[0]
        params = list(chunk.parameters())
        assert M.stage_parameters(cfg, 4096, 1, 1, 1, 0, ep=ep) == sum(p.numel() for p in params)
        assert M.stage_expert_parameters(cfg, 1, 1, 0, ep=ep) == sum(p.numel() for p in params if p.meta.expert_parallel)


def _remote_expert_unused(_):
    """EP 2 where every token of both ranks goes to rank 0's experts: rank 1's experts get none."""
    from megatron_lite.moe.dispatch import AllToAllDispatcher, assign
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.moe import ExpertGroups

    state = ParallelState(ep=2, experts=True)
    groups = ExpertGroups.from_state(state)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(state.rank), requires_grad=True)
    experts = torch.tensor([[0, 1]] * 6)
    weights = torch.full((6, 2), 0.5)
    dispatcher = AllToAllDispatcher(4, groups.ep, groups.etp)
    rows, counts = dispatcher.dispatch(x, assign(weights, experts, 4))
    out = dispatcher.combine(rows * 2.0)
    out.sum().backward()
    state.destroy()
    return counts, torch.allclose(out, 2.0 * x), torch.allclose(x.grad, torch.full_like(x, 2.0))


def test_a_rank_routing_nothing_to_a_remote_expert_completes(ranks):
    results = ranks(2).run(_remote_expert_unused, None)
    assert results[0][0] == [12, 12] and results[1][0] == [0, 0]  # rank 0 runs both ranks' tokens
    assert all(ok and grad_ok for _, ok, grad_ok in results)


def test_all_to_all_bytes_match_the_routing_map(ranks):
    """benchmarks/comm_volume.py at TP 2 (SP) × PP 2 (VPP 2) with EP 2 folded into TP: every rank's
    bytes per (collective, group), the all-to-alls counted from each router's routing map, equal the
    analytic count to the byte."""
    from benchmarks import comm_volume

    small = [o for o in MOE_BASE if o.split("=")[0].startswith("model")]
    results = ranks(4).run(comm_volume._measure, comm_volume.DEFAULT_OVERRIDES + small
                           + ["parallel.expert_model_parallel_size=2"])
    assert all(r["measured"].get("all_to_all/EP", 0) > 0 for r in results)
    assert comm_volume.differences(results) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_moe_activation_memory_matches_the_planner(precision):
    """The bytes autograd saves in one microbatch's forward of moe_tiny against the planner's MoE
    activation terms (plan/memory.py:moe_mlp_bytes_per_token), within the dense path's tolerance."""
    from test_plan import MEMORY_TOLERANCE, VOCAB, SavedBytes

    from megatron_lite.model import build_gpt
    from megatron_lite.plan.estimate import microbatch_activation_bytes, setup_from_config

    cfg = load_config(["model=moe_tiny", "training.micro_batch_size=2", "training.global_batch_size=2",
                       f"training.precision={precision}"])
    model = build_gpt(cfg.model, VOCAB).to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    ids = torch.randint(0, VOCAB, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    with SavedBytes(model.parameters()) as saved:
        model(ids, ids).mean()
    predicted = microbatch_activation_bytes(setup_from_config(cfg, 1, VOCAB), 0)
    print(f"moe_tiny {precision}: saved {saved.total:,} B, planner {predicted:,.0f} B ({predicted / saved.total - 1:+.1%})")
    assert predicted == pytest.approx(saved.total, rel=MEMORY_TOLERANCE)
