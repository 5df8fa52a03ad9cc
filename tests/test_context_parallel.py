"""Context parallelism against the single-rank computation it replaces (float32, gloo).

- ring attention vs full causal attention: outputs and gradients, c = 2 and 4, MHA/GQA/MQA, both
  block kernels (explicit fp32 math; torch's flash kernel through its CPU twin), and the attention
  module with RoPE at global positions;
- the causal work per CP rank, counted by the ring itself: equal on every rank with the zigzag split,
  2c − 1 times more on the last rank than on the first with a contiguous split;
- the trainer in CP2, CP4, TP2×CP2 (SP), CP2×PP2 and CP2×DP2 (distributed optimizer) against one
  rank: losses and gradient norms within 1e-6, final parameters within 1e-5;
- the bytes sent equal benchmarks/comm_volume.py's analytic count exactly;
- a checkpoint saved at CP2 resumes bit-identically at CP2 and within 1e-5 at CP1 and CP4;
- bad CP configurations give one line each.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_training import _train, read_metrics, rel

from megatron_lite.config import ConfigError, load_config, validate
from megatron_lite.data import collate
from megatron_lite.parallel.context import block_kernel, block_plan, local_positions

LOSS_TOLERANCE = 1e-6
PARAM_TOLERANCE = 1e-5
ATTENTION_TOLERANCE = 1e-5
COMMON = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
          "training.micro_batch_size=2", "training.global_batch_size=8",
          "training.train_iters=3", "training.eval_interval=3", "training.eval_iters=1",
          "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5", "optimizer.eps=1e-4", "logging.log_interval=100"]
MODELS = {
    "llama": ["model=llama_tiny", "model.num_query_groups=2", "model.ffn_hidden_size=64"] + COMMON,
    "gpt": ["model=gpt_tiny", "model.ffn_hidden_size=64"] + COMMON,
}
LAYOUTS = {  # name: (model, world size, overrides)
    "cp2": ("llama", 2, ["parallel.context_parallel_size=2"]),
    "cp4": ("gpt", 4, ["parallel.context_parallel_size=4"]),
    "tp2_cp2_sp": ("llama", 4, ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                                "parallel.sequence_parallel=true"]),
    "cp2_pp2": ("llama", 4, ["parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
    "cp2_dp2_zero": ("llama", 4, ["parallel.context_parallel_size=2", "optimizer.use_distributed_optimizer=true"]),
}


# No ranks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel.context_parallel_size=4"], 6,
     "parallel.context_parallel_size: world size 6 is not divisible by TP×CP×PP = 1×4×1 = 4; launch a "
     "multiple of 4 ranks or change the TP/CP/PP sizes"),
    (["parallel.context_parallel_size=0"], 2, "parallel.context_parallel_size: must be positive, got 0"),
    (["parallel.context_parallel_size=2", "model.seq_length=30"], 2,
     "model.seq_length: 30 is not divisible by 2 × context_parallel_size = 4 (each CP rank holds 2 of 4 "
     "chunks); use a multiple of 4"),
    (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
      "model.seq_length=20"], 8,
     "model.seq_length: 20 / CP=2 = 10 tokens per CP rank do not split over TP=4 for sequence parallelism; "
     "use a multiple of 8"),
    (["parallel.context_parallel_size=2", "model.dropout=0.1"], 2,
     "model.dropout: 0.1 with context_parallel_size=2: ring attention has no attention dropout; set "
     "model.dropout=0 or context_parallel_size=1"),
])
def test_bad_cp_configs_give_one_line(overrides, world, expected):
    with pytest.raises(ConfigError) as err:
        validate(load_config(overrides), world)
    assert str(err.value) == expected


def test_valid_cp_config_derives_dp():
    dims = validate(load_config(["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                                 "parallel.sequence_parallel=true", "training.global_batch_size=16"]), 16)
    assert (dims.tp, dims.cp, dims.dp, dims.pp) == (2, 2, 4, 1)


@pytest.mark.parametrize("c", [1, 2, 4])
def test_zigzag_split_and_loader(c):
    """Rank i holds chunks i and 2c−1−i; the ranks together hold every position once; the loader gives
    each CP rank exactly those tokens of the same samples."""
    s = 16
    parts = [local_positions(s, c, r) for r in range(c)]
    assert sorted(torch.cat(parts).tolist()) == list(range(s))
    chunk = s // (2 * c)
    assert parts[0][:chunk].tolist() == list(range(chunk)) and parts[0][chunk:].tolist() == list(range(s - chunk, s))
    assert local_positions(15, 1, 0).tolist() == list(range(15))  # any length without CP
    data = [{"tokens": torch.arange(s) + 100 * i, "labels": torch.arange(s) + 1 + 100 * i} for i in range(3)]
    full = collate(data, [2, 0], ("tokens", "labels"))
    for positions in parts:
        local = collate(data, [2, 0], ("tokens", "labels"), positions)
        assert all(torch.equal(local[f], full[f][:, positions]) for f in full)


def test_block_plan_and_kernel_choice():
    """Zigzag: half a block per step whatever the peer; contiguous: later peers fully masked (skipped)."""
    for source in range(4):
        block = block_plan("zigzag", 1, source, 8)
        rows, cols = block.q_rows.stop - block.q_rows.start, block.kv_cols.stop - block.kv_cols.start
        assert rows * cols * (0.5 if block.causal else 1.0) == 32
    assert block_plan("contiguous", 1, 2, 8) is None
    cuda = torch.device("cuda", 0)
    assert block_kernel(cuda, torch.bfloat16, 128) == "flash"
    assert block_kernel(cuda, torch.float16, 64) == "flash"
    assert block_kernel(cuda, torch.float32, 128) == "explicit"  # flash kernels take 16-bit inputs only
    assert block_kernel(cuda, torch.bfloat16, 260) == "explicit"  # head_dim beyond the kernel's 256
    assert block_kernel(cuda, torch.bfloat16, 100) == "explicit"  # not a multiple of 8
    assert block_kernel(torch.device("cpu"), torch.bfloat16, 128) == "explicit"


# Ring attention on 4 ranks -----------------------------------------------------------------------
def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _ring_vs_full(cp, cases: list[tuple]) -> dict:
    """Per (kv groups, kernel, layout): max relative errors of the output and dQ, dK, dV on this
    rank's tokens against F.scaled_dot_product_attention on the whole sequence, and the FLOPs the ring
    counted here."""
    from megatron_lite.parallel.context import RingStats, ring_attention

    results = {}
    for groups, kernel, layout in cases:
        g = torch.Generator().manual_seed(len(results))
        b, heads, s, d = 2, 4, 32, 8
        q, k, v = (torch.randn(b, n, s, d, generator=g, requires_grad=True) for n in (heads, groups, groups))
        dout = torch.randn(b, heads, s, d, generator=g)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups < heads)
        ref.backward(dout)
        pos = local_positions(s, cp.size, cp.rank, layout)
        local = [t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v)]
        stats = RingStats()
        out = ring_attention(*local, cp, kernel=kernel, layout=layout, stats=stats)
        out.backward(dout[:, :, pos])
        errors = {"out": _max_rel(out, ref.detach()[:, :, pos])}
        errors.update({name: _max_rel(t.grad, full.grad[:, :, pos])
                       for name, t, full in zip(("dq", "dk", "dv"), local, (q, k, v))})
        results[(cp.size, groups, kernel, layout)] = {"errors": errors, "flops": stats.flops}
    return results


def _attention_module_with_rope(cp) -> dict:
    """The Attention module (RoPE, GQA) on this CP rank's tokens against the module on the whole
    sequence: outputs, input gradients, and weight gradients summed over the CP group."""
    from megatron_lite.model.transformer import Attention, rotary_tables
    from megatron_lite.parallel.collectives import TPGroup
    from megatron_lite.parallel.context import CPGroup
    from megatron_lite.tensor_parallel import ModelRNG

    cfg = load_config(MODELS["llama"]).model
    full, ring = (Attention(cfg, TPGroup(), ModelRNG(0), cp=group) for group in (CPGroup(), cp))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0.0, 0.2, generator=g)
    ring.load_state_dict(full.state_dict())
    cos, sin = rotary_tables(cfg.seq_length, cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta)
    x = torch.randn(2, cfg.seq_length, cfg.hidden_size, generator=g, requires_grad=True)
    dout = torch.randn(2, cfg.seq_length, cfg.hidden_size, generator=g)
    ref = full(x, (cos, sin))
    ref.backward(dout)
    pos = local_positions(cfg.seq_length, cp.size, cp.rank)
    x_local = x.detach()[:, pos].clone().requires_grad_()
    out = ring(x_local, (cos[pos], sin[pos]))
    out.backward(dout[:, pos])
    errors = {"out": _max_rel(out, ref.detach()[:, pos]), "dx": _max_rel(x_local.grad, x.grad[:, pos])}
    for (name, p), (_, p_ref) in zip(ring.named_parameters(), full.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp.group)
        errors[f"d{name}"] = _max_rel(grad, p_ref.grad)
    return errors


def _ring_checks(c: int, cases: list[tuple]) -> tuple[dict, dict]:
    """Both checks in CP groups of ``c`` ranks (4 // c groups side by side)."""
    from megatron_lite.parallel.context import CPGroup
    from megatron_lite.parallel.state import ParallelState

    state = ParallelState(cp=c)
    cp = CPGroup.from_state(state)
    try:
        return _ring_vs_full(cp, cases), _attention_module_with_rope(cp)
    finally:
        state.destroy()


RING_CASES = {2: [(2, "explicit", "zigzag"), (4, "flash", "zigzag")],
              4: [(4, "explicit", "zigzag"), (1, "explicit", "zigzag"), (2, "flash", "zigzag"),
                  (2, "explicit", "contiguous")]}


def test_ring_attention_matches_full_causal_attention(ranks):
    flops = {}
    for c, cases in RING_CASES.items():
        per_rank = ranks(4).run(_ring_checks, c, cases)
        for groups, kernel, layout in cases:
            case = (c, groups, kernel, layout)
            worst = {k: max(r[0][case]["errors"][k] for r in per_rank) for k in ("out", "dq", "dk", "dv")}
            print(f"c={c} kv_groups={groups} {kernel} {layout}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
            assert max(worst.values()) < ATTENTION_TOLERANCE, (case, worst)
            flops[case] = [r[0][case]["flops"] for r in per_rank]
        module = {k: max(r[1][k] for r in per_rank) for k in per_rank[0][1]}
        print(f"attention module, RoPE, GQA, c={c}: worst {max(module.values()):.1e} ({max(module, key=module.get)})")
        assert max(module.values()) < ATTENTION_TOLERANCE, module

    # The causal work per rank, as the ring counted it (4 ranks of one group).
    zigzag, contiguous = flops[(4, 4, "explicit", "zigzag")], flops[(4, 2, "explicit", "contiguous")]
    print(f"causal-attention FLOPs max/min over 4 CP ranks: zigzag {max(zigzag) / min(zigzag):.2f}, "
          f"contiguous {max(contiguous) / min(contiguous):.2f}")
    assert max(zigzag) / min(zigzag) == 1.0
    assert max(contiguous) / min(contiguous) == 2 * 4 - 1
    # Together the ranks compute the causal half of the s×s attention, once: 4·b·H·d·s²/2.
    assert sum(zigzag) == sum(contiguous) == 4 * 2 * 4 * 8 * 32 * 32 / 2


# The trainer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def references(ranks, tmp_path_factory):
    out = {}
    for model, overrides in MODELS.items():
        run_dir = tmp_path_factory.mktemp(f"reference_{model}")
        params = ranks(1).run(_train, overrides + [f"logging.dir={run_dir}"])[0]
        out[model] = (read_metrics(run_dir), params)
    return out


def test_trainer_matches_single_rank(ranks, references, tmp_path):
    rows = []
    for name, (model, world, overrides) in LAYOUTS.items():
        run_dir = tmp_path / name
        params = ranks(world).run(_train, MODELS[model] + overrides + [f"logging.dir={run_dir}"])[0]
        (ref_train, ref_valid), ref_params = references[model]
        train, valid = read_metrics(run_dir)
        assert [r["iteration"] for r in train] == [1, 2, 3]
        assert params.keys() == ref_params.keys()
        errors = {
            "loss": rel([r["loss"] for r in train], [r["loss"] for r in ref_train]),
            "grad_norm": rel([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref_train]),
            "valid": rel([r["loss"] for r in valid], [r["loss"] for r in ref_valid]),
            "params": max(rel(params[k], ref_params[k]) for k in params),
        }
        rows.append((name, errors))
        print(f"{name} ({model}): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for name, errors in rows:
        assert max(errors["loss"], errors["grad_norm"], errors["valid"]) <= LOSS_TOLERANCE, (name, errors)
        assert errors["params"] <= PARAM_TOLERANCE, (name, errors)


def _comm_bytes(overrides: list[str]) -> dict:
    from benchmarks.comm_volume import _measure

    return _measure(overrides)


@pytest.mark.parametrize("name,overrides", [
    ("tp2_cp2_sp_selective", MODELS["llama"] + LAYOUTS["tp2_cp2_sp"][2] + ["training.recompute=selective"]),
    ("cp4", MODELS["gpt"] + LAYOUTS["cp4"][2]),
])
def test_comm_bytes_match_the_analytic_count(ranks, tmp_path, name, overrides):
    results = ranks(4).run(_comm_bytes, overrides + ["training.train_iters=1", "training.eval_iters=0",
                                                       f"logging.dir={tmp_path}"])
    for r in results:
        assert r["measured"] == r["analytic"], (r["rank"], r["measured"], r["analytic"])
    print(f"{name}: ring sends per rank {results[0]['measured']['send/CP']:,} bytes per step")


def _losses(run_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir)[0]}


def test_checkpoint_saved_at_cp2_resumes_at_cp1_cp2_cp4(ranks, tmp_path):
    base = MODELS["llama"] + ["training.train_iters=4", "training.eval_iters=0",
                              "optimizer.use_distributed_optimizer=true"]
    cp2 = ["parallel.context_parallel_size=2"]
    ranks(2).run(_train, base + cp2 + [f"logging.dir={tmp_path / 'saved'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                       "checkpoint.save_interval=2"])
    load = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2"]
    for name, world, layout in (("cp2", 2, cp2), ("cp1", 1, []), ("cp4", 4, ["parallel.context_parallel_size=4"])):
        ranks(world).run(_train, base + layout + load + [f"logging.dir={tmp_path / name}"])
    saved = _losses(tmp_path / "saved")
    resumed = {name: _losses(tmp_path / name) for name in ("cp2", "cp1", "cp4")}
    assert all(sorted(got) == [3, 4] for got in resumed.values()), resumed
    assert all(resumed["cp2"][i] == saved[i] for i in (3, 4)), (resumed["cp2"], saved)  # exact resume
    for name in ("cp1", "cp4"):
        err = rel([resumed[name][i] for i in (3, 4)], [saved[i] for i in (3, 4)])
        print(f"CP2 checkpoint resumed at {name}: loss error {err:.1e}")
        assert err < PARAM_TOLERANCE


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.01), ("fp16", 0.005)])
def test_low_precision_cp2_tracks_one_rank_and_resumes_exactly(ranks, tmp_path, precision, tolerance):
    """bf16 / fp16 (dynamic loss scale) at CP2 against one rank in the same precision, and a CP2
    checkpoint round trip that continues bit for bit (fp32 masters and the loss scale restored)."""
    base = MODELS["llama"] + ["training.train_iters=4", "training.eval_iters=0", f"training.precision={precision}",
                              "training.initial_loss_scale=65536"]
    cp2 = ["parallel.context_parallel_size=2"]
    ranks(1).run(_train, base + [f"logging.dir={tmp_path / 'one'}"])
    ranks(2).run(_train, base + cp2 + [f"logging.dir={tmp_path / 'cp2'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                       "checkpoint.save_interval=2"])
    ranks(2).run(_train, base + cp2 + [f"logging.dir={tmp_path / 'resumed'}", f"checkpoint.load={tmp_path / 'ckpt'}",
                                       "checkpoint.load_iteration=2"])
    one, cp, resumed = (_losses(tmp_path / name) for name in ("one", "cp2", "resumed"))
    worst = max(abs(cp[i] - one[i]) for i in one)
    print(f"{precision}: CP2 vs one rank, max |loss difference| {worst:.1e}")
    assert sorted(cp) == [1, 2, 3, 4] and worst < tolerance
    assert sorted(resumed) == [3, 4] and all(resumed[i] == cp[i] for i in resumed), (resumed, cp)
