"""The planner: its formulas against the paper's closed forms and the pipeline simulator, its
throughput predictions against published Megatron-LM figures (deterministic: asserted within the
stated bound), and its memory predictions against what the trainer really allocates on gloo ranks."""

import dataclasses

import pytest
import torch

from megatron_lite.config import load_config, validate
from megatron_lite.model import build_gpt
from megatron_lite.pipeline.simulate import simulate_schedule
from megatron_lite.plan import DEVICES, search, setup_from_config
from megatron_lite.plan import memory as M
from megatron_lite.plan.__main__ import main as plan_main
from megatron_lite.plan.estimate import bubble_fraction, microbatch_activation_bytes, rank_memory
from megatron_lite.plan.published import ERROR_BOUND, validation_table

MEMORY_TOLERANCE = 0.10
VOCAB = 4096
TINY = ["model=gpt_tiny", "training.micro_batch_size=2", "training.global_batch_size=8"]
# Larger and LLaMA-style: RoPE, SwiGLU, GQA, RMSNorm, untied output layer.
LARGER = ["model=llama_tiny", "model.num_layers=8", "model.hidden_size=256", "model.ffn_hidden_size=704",
          "model.seq_length=64", "training.micro_batch_size=4", "training.global_batch_size=16"]


@pytest.mark.parametrize("tp,sp", [(1, False), (4, False), (4, True), (8, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_terms_reproduce_korthikanti(tp, sp, recompute):
    """Megatron's choices (bf16, byte masks, explicit softmax) give the paper's closed form exactly."""
    m = load_config(["model=gpt2_124m", "model.dropout=0.1"]).model
    shard = M.Shard(tp, sp, micro_batch=2)
    got = M.layer_activation_bytes(m, shard, M.MEGATRON, recompute, dropout=True)
    assert got == pytest.approx(M.korthikanti_layer_bytes(m, shard, recompute), rel=1e-12)


@pytest.mark.parametrize("schedule,p,v,m", [("1f1b", 4, 1, 8), ("1f1b", 4, 1, 3), ("gpipe", 2, 1, 4),
                                            ("interleaved", 4, 2, 8), ("interleaved", 2, 4, 4)])
def test_pipeline_terms_match_the_simulator(schedule, p, v, m):
    sim = simulate_schedule(schedule, p, v, m)
    assert bubble_fraction(schedule, p, v, m) == pytest.approx(sim.bubble_fraction)
    closed = (p - 1) / (v * m) if schedule == "interleaved" else (p - 1) / m
    if schedule != "gpipe" and m >= p:
        assert sim.bubble_fraction == pytest.approx(closed)
    for rank in range(p):
        assert M.in_flight_microbatches(schedule, p, v, m, rank) * v == sim.peak_activations[rank]


@pytest.mark.parametrize("overrides", [
    TINY, LARGER, ["model=llama_tiny", "model.num_query_groups=1", "model.tie_embeddings=true"],
    ["model=llama_tiny", "model.add_qkv_bias=true", "model.qk_layernorm=true"],
    ["model=llama_tiny", "model.qk_layernorm=true", "model.qk_layernorm_mode=projection"],
    TINY + ["model.qk_layernorm=true"],  # layernorm: q/k norms with biases
])
def test_parameter_count_matches_the_model(overrides):
    m = load_config(overrides).model
    model = build_gpt(m, VOCAB)
    assert M.stage_parameters(m, VOCAB, 1, 1, 1, 0) == sum(p.numel() for p in model.parameters())


def test_published_throughput_within_bound():
    rows = validation_table()
    assert len(rows) == 18 and sum(r["ep"] > 1 for r in rows) == 4
    worst = max((r for r in rows if not r["known_miss"]), key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= ERROR_BOUND, worst
    misses = [r for r in rows if r["known_miss"]]  # listed in docs/performance.md; still outside the bound
    assert len(misses) == 2 and all(abs(r["error"]) > ERROR_BOUND for r in misses), misses


def test_search_ranks_valid_fitting_layouts():
    cfg = load_config(["model=gpt2_124m", "training.precision=bf16", "training.global_batch_size=64"])
    found = search(cfg, 16, 50257, DEVICES["A100-80G"])
    assert len(found) > 20 and all(p.fits for p in found)
    times = [p.time.total for p in found]
    assert times == sorted(times)
    layouts = set()
    for p in found:
        d = p.setup.dims
        layouts.add((d.tp, d.cp, d.pp, d.vpp, p.setup.micro_batch_size))
        assert d.tp * d.cp * d.pp * d.dp == 16 and 12 % (d.pp * d.vpp) == 0
    assert len(layouts) == len(found)
    assert {d.cp for d in (p.setup.dims for p in found)} == {1, 2, 4, 8, 16}  # --search covers CP sizes
    too_small = dataclasses.replace(DEVICES["A100-80G"], memory_bytes=1e9)
    assert all(p.memory.total <= 1e9 for p in search(cfg, 16, 50257, too_small))


def test_cli(capsys):
    assert plan_main(["--world-size", "8", "model=gpt_tiny", "parallel=tp2_pp2_dp2"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and out.startswith(  # every prediction opens with what it assumes
        "assumptions: global batch 16 × 128 tokens (training.global_batch_size, model.seq_length), micro batch 2 "
        "(training.micro_batch_size), fp32 (training.precision), recompute none (training.recompute, --recompute), "
        "distributed optimizer off (optimizer.use_distributed_optimizer), communication exposed (--overlap), "
        "computation at 60% of H100-80G's peak (--efficiency)\n")
    assert plan_main(["--world-size", "2", "--search", "--device", "B200", "training.precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("assumptions: global batch 16 × 128 tokens (training.global_batch_size, model.seq_length), "
                          "micro batch each layout's of 1, 2, 4, 8, 16, bf16") and "of B200's peak" in out
    assert plan_main(["--world-size", "6", "parallel=tp2_pp2_dp2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plan error: parallel.tensor_model_parallel_size: world size 6") and "\n" not in err


# Reality checks ----------------------------------------------------------------------------------
def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.saved[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.saved.values())


@pytest.mark.parametrize("overrides", [["model=gpt_tiny", "model.dropout=0.1"],
                                       ["model=llama_tiny", "model.dropout=0.1"],
                                       ["model=gpt_tiny", "model.attention_backend=explicit"],
                                       ["model=gpt_tiny", "training.precision=bf16"],
                                       ["model=llama_tiny", "model.dropout=0.1", "training.precision=bf16"]])
def test_activation_prediction_on_one_rank(overrides):
    """The explicit-softmax attention and dropout paths, and bf16 (the multi-rank test runs fp32 SDPA)."""
    cfg = load_config(overrides + ["training.micro_batch_size=2", "training.global_batch_size=2"])
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    model = build_gpt(cfg.model, VOCAB).to(dtype).train()
    ids = torch.randint(0, VOCAB, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    with SavedBytes(model.parameters()) as saved:
        model(ids, ids).mean()
    predicted = microbatch_activation_bytes(setup_from_config(cfg, 1, VOCAB), 0)
    assert predicted == pytest.approx(saved.total, rel=MEMORY_TOLERANCE)


def _measure_memory(overrides: list[str]) -> dict:
    """On each rank: the trainer's parameter/gradient/optimizer storage after one step, and the bytes
    autograd saves for the backward during one microbatch's forward of this rank's chunks."""
    import torch.distributed as dist

    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    trainer.train_step()
    state_tensors = [t for s in trainer.optimizer.inner.state.values() for t in s.values() if torch.is_tensor(t)]
    batch = trainer._microbatches(trainer.train_data, 0)[0]
    with SavedBytes(trainer.params) as saved:
        for index, chunk in enumerate(trainer.chunks):
            x = None if chunk.spec.has_embedding else torch.randn(trainer.activation_shape, requires_grad=True)
            trainer._forward_step(index, x, batch)
    result = {
        "pp_rank": state.pp_rank, "cp_rank": state.cp_rank, "parameters": _storage_bytes(trainer.params),
        "gradients": trainer.grads.data.untyped_storage().nbytes(), "optimizer": _storage_bytes(state_tensors),
        "activations": saved.total, "vocab": trainer.vocab_size,
    }
    state.destroy()
    return result


@pytest.mark.parametrize("overrides", [TINY, LARGER], ids=["gpt_tiny", "llama_larger"])
def test_memory_prediction_matches_the_trainer(ranks, tmp_path, overrides):
    """TP2 × PP2 with sequence parallelism on 4 ranks: predicted vs measured, every rank, within 10 %."""
    # The planner counts what the PyTorch reference ops save; the fused csrc kernels save less (RMSNorm
    # and SwiGLU keep no fp32 intermediates: 9.5 MB measured vs 12.0 MB predicted for llama_larger), so
    # the prediction is an upper bound for them and the check runs the reference ops.
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
              "parallel.sequence_parallel=true", "training.train_iters=1", "training.eval_iters=0",
              "model.kernel_backend=torch", f"logging.dir={tmp_path}"]
    results = ranks(4).run(_measure_memory, overrides + layout)
    cfg = load_config(overrides + layout)
    setup = setup_from_config(cfg, 4, results[0]["vocab"])
    for r in results:
        predicted = rank_memory(setup, r["pp_rank"])
        expected = {"parameters": predicted.parameters, "gradients": predicted.gradients,
                    "optimizer": predicted.optimizer,
                    "activations": microbatch_activation_bytes(setup, r["pp_rank"])}
        for key, want in expected.items():
            print(f"stage {r['pp_rank']} {key}: predicted {want:,.0f} measured {r[key]:,}")
            assert r[key] == pytest.approx(want, rel=MEMORY_TOLERANCE), key


LONG = ["model=llama_tiny", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
        "model.seq_length=512", "training.micro_batch_size=1", "training.global_batch_size=4",
        "training.train_iters=1", "training.eval_iters=0", "model.kernel_backend=torch"]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_memory_prediction_with_context_parallelism(ranks, tmp_path, cp):
    """A 512-token sequence on 4 ranks as CP1 × DP4, CP2 × DP2, CP4: activations per rank ÷ c, the
    distributed optimizer's state ÷ (DP × CP); predicted vs measured on every rank within 10 %."""
    overrides = LONG + [f"parallel.context_parallel_size={cp}", "optimizer.use_distributed_optimizer=true",
                        f"logging.dir={tmp_path}"]
    results = ranks(4).run(_measure_memory, overrides)
    setup = setup_from_config(load_config(overrides), 4, results[0]["vocab"])
    predicted, optimizer = microbatch_activation_bytes(setup, 0), rank_memory(setup, 0).optimizer
    for r in results:
        print(f"CP{cp} rank cp{r['cp_rank']}: activations predicted {predicted:,.0f} measured {r['activations']:,}; "
              f"optimizer predicted {optimizer:,.0f} measured {r['optimizer']:,}")
        assert r["activations"] == pytest.approx(predicted, rel=MEMORY_TOLERANCE)
        assert r["optimizer"] == pytest.approx(optimizer, rel=MEMORY_TOLERANCE)


class LiveBytes:
    """Bytes of the distinct storages held for the backward at each moment of a schedule run: what
    autograd saved (parameters excluded) and the stage outputs the executor holds. ``sample`` is
    the executor's ``on_action`` hook: the peak is taken before every computation and message batch."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, tuple] = {}
        self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.track, lambda t: t)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params and storage.nbytes():
            ref = StorageWeakRef(storage)
            self.live[ref.cdata] = (ref, storage.nbytes())
        return t

    def sample(self, label: str) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))


def _pipeline_activation_peak(overrides: list[str]) -> dict:
    """Peak live activation bytes of one 1F1B iteration on each rank, stage outputs freed once sent
    (the executor's default) and kept (``deallocate_outputs=False``)."""
    import torch.distributed as dist

    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.pipeline.executor import run_schedule
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    for chunk in trainer.chunks:
        chunk.train()
    peaks = {}
    for deallocate in (True, False):
        live = LiveBytes(trainer.params)

        def forward_step(c, x, batch):
            return live.track(trainer._forward_step(c, x, batch))

        trainer.grads.start_step(dims.num_microbatches)
        with live.hooks:
            run_schedule(trainer.actions, trainer.chunks, state, trainer._microbatches(trainer.train_data, 0),
                         forward_step, trainer.activation_shape, trainer.dtype, on_action=live.sample,
                         deallocate_outputs=deallocate)
        peaks[deallocate] = live.peak
    result = {"pp_rank": state.pp_rank, "freed": peaks[True], "kept": peaks[False], "vocab": trainer.vocab_size,
              "output_bytes": trainer.activation_shape[0] * trainer.activation_shape[1] * trainer.activation_shape[2] * 4}
    state.destroy()
    return result


def test_pipeline_activation_peak_matches_the_planner(ranks, tmp_path):
    """1F1B at p = 4: freeing each stage output once sent lowers stage r's peak by one activation per
    in-flight microbatch whose output is already sent (p − r − 1 of its p − r; the newest is alive
    until its send completes), and the planner's count (in-flight microbatches' saved tensors plus
    that one output) is the measured peak."""
    layout = ["parallel.pipeline_model_parallel_size=4", "training.micro_batch_size=2", "training.global_batch_size=16",
              "training.train_iters=1", "training.eval_iters=0", "model.kernel_backend=torch", f"logging.dir={tmp_path}"]
    results = ranks(4).run(_pipeline_activation_peak, ["model=gpt_tiny"] + layout)
    setup = setup_from_config(load_config(["model=gpt_tiny"] + layout), 4, results[0]["vocab"])
    for r in results:
        stage = r["pp_rank"]
        saved = (4 - stage - 1) * r["output_bytes"]
        print(f"stage {stage}: peak {r['kept']:,} B with outputs kept, {r['freed']:,} B freed ({saved:,} B saved); "
              f"planner {rank_memory(setup, stage).activations:,.0f} B")
        assert r["kept"] - r["freed"] == saved
        assert r["freed"] == pytest.approx(rank_memory(setup, stage).activations, rel=MEMORY_TOLERANCE)
