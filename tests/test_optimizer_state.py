"""Optimizer state through checkpoints in every precision: fp32 master weights rebuilt from the loaded
parameters when a checkpoint has none (saved in fp32, imported from HF), whatever the optimizer."""

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import BASE, _train, losses
from test_training import _train as _train_and_gather
from test_training import rel

# Trained far enough that the loss (about 7.3) is clearly below a fresh model's ln(4096) = 8.3.
TRAINED = ["optimizer.lr=3e-3", "training.train_iters=12"]


@pytest.fixture(scope="module")
def fp32_checkpoint(ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    ranks(1).run(_train, BASE + TRAINED + [f"logging.dir={root / 'run'}", f"checkpoint.save={root / 'ckpt'}",
                                          "checkpoint.save_interval=10"])
    return root


@pytest.mark.parametrize("precision,world,extra", [
    ("bf16", 2, ["optimizer.use_distributed_optimizer=true"]),
    ("fp16", 1, ["training.initial_loss_scale=4096"]),
])
def test_low_precision_resume_of_fp32_checkpoint(ranks, fp32_checkpoint, tmp_path, precision, world, extra):
    """The checkpoint has no fp32 masters: the optimizer takes them from the loaded parameters, so the
    losses after the first low-precision steps follow the fp32 run's (not a fresh model's ln(vocab))."""
    ranks(world).run(_train, BASE + TRAINED + extra + [
        f"training.precision={precision}", f"logging.dir={tmp_path}",
        f"checkpoint.load={fp32_checkpoint / 'ckpt'}", "checkpoint.load_iteration=10",
    ])
    ref, got = losses(fp32_checkpoint / "run"), losses(tmp_path)
    assert sorted(got) == [11, 12]
    err = rel([got[i] for i in got], [ref[i] for i in got])
    print(f"{precision} resumed from fp32: losses {[round(got[i], 4) for i in got]}, fp32 "
          f"{[round(ref[i], 4) for i in got]}, error {err:.1e}")
    assert ref[12] < 7.9 and err < 0.01


def _hf_llama(directory: Path) -> None:
    """A random LlamaForCausalLM built and saved by transformers itself (GQA, untied head). Its weights
    have five times our init's std, so a run that fell back to its own initialisation would show it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=16, initializer_range=0.1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def test_hf_import_trains_in_bf16_on_tp2(ranks, tmp_path):
    """An imported checkpoint (weights only) trained in bf16 at TP 2 follows the fp32 run from the same
    import: the first steps update the imported weights, not a fresh initialisation. The model's
    shape comes from the checkpoint (no model overrides but the training length)."""
    from megatron_lite.checkpoint.hf import main

    _hf_llama(tmp_path / "hf")
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    shape = json.loads((tmp_path / "imported" / "iter_0000000" / "meta.json").read_text())["model"]
    assert shape["num_layers"] == 2 and not shape["tie_embeddings"]
    run = ["checkpoint.use_checkpoint_model_config=true", "model.seq_length=16",
           "training.micro_batch_size=2", "training.global_batch_size=8",
           "training.train_iters=3", "training.eval_iters=0", "parallel.tensor_model_parallel_size=2",
           f"checkpoint.load={tmp_path / 'imported'}"]
    ref = ranks(2).run(_train_and_gather, run + [f"logging.dir={tmp_path / 'fp32'}"])[0]
    got = ranks(2).run(_train_and_gather, run + ["training.precision=bf16", f"logging.dir={tmp_path / 'bf16'}"])[0]
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    loss_err = rel(list(b.values()), list(a.values()))
    param_err = max(rel(got[k], ref[k]) for k in ref)
    print(f"HF import, bf16 TP2: losses {[round(x, 4) for x in b.values()]} fp32 {[round(x, 4) for x in a.values()]}; "
          f"loss error {loss_err:.1e}, parameter error after 3 steps {param_err:.1e}")
    assert loss_err < 0.01 and param_err < 0.02


# One AdamW state format --------------------------------------------------------------------------
def test_adamw_options_select_torch_fused_kernel():
    """On GPU and CPU torch's fused AdamW (step kept per parameter), never apex's FusedAdam (step in
    param_groups: saving per parameter lost it, and the distributed optimizer dropped the moments);
    foreach where torch has no fused kernel."""
    from megatron_lite.config import OptimizerConfig
    from megatron_lite.optim.optimizer import adamw_options

    assert adamw_options(OptimizerConfig(), "cuda")["fused"] is True
    assert adamw_options(OptimizerConfig(), "cpu")["fused"] is True
    assert adamw_options(OptimizerConfig(), "mps")["foreach"] is True


def _small_model(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    from megatron_lite.tensor_parallel.param_meta import ParamMeta

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).to(dtype)
    for p in model.parameters():
        p.meta = ParamMeta(init_std=0.02)  # what the GradBuffer reads; every model layer sets one
    return model


def _optimizer(kind: str, model: torch.nn.Module):
    from megatron_lite.config import OptimizerConfig
    from megatron_lite.optim import DistributedOptimizer, GradBuffer, Optimizer

    params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    cfg = OptimizerConfig(lr=1e-2)
    if kind == "plain":
        GradBuffer(params)  # gives every parameter its fp32 main_grad
        return Optimizer(params, cfg, norm_group=None, names=names)
    grads = GradBuffer(params, reduce_scatter=True, bucket_elements=64)
    return DistributedOptimizer(params=params, grads=grads, cfg=cfg, names=names)


def _step(optimizer, model: torch.nn.Module, k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    for p in model.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=generator))
    optimizer.step(1e-2)


@pytest.mark.parametrize("kind", ["plain", "distributed"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_adamw_state_saved_whole(tmp_path, kind, precision):
    """The optimizer class and options the trainer selects on CPU and GPU (torch's fused AdamW),
    three steps, a checkpoint, a fresh model and optimizer loading it: every field is saved (step,
    moments, fp32 masters) and the next two steps are bit-identical to the uninterrupted ones."""
    from megatron_lite.checkpoint.sharded import ShardedState
    from megatron_lite.checkpoint.storage import find_checkpoint, read_tensors, write_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = _small_model(dtype, seed=0)
    opt_a = _optimizer(kind, a)
    assert type(opt_a.inner) is torch.optim.AdamW and opt_a.inner.defaults["fused"]
    for k in range(3):
        _step(opt_a, a, k)
    saved = ShardedState(list(a.named_parameters()))
    tensors = {**saved.model_tensors(), **saved.optimizer_tensors(opt_a.named_param_states())}
    write_checkpoint(tensors, {}, "", tmp_path, 3)

    info = find_checkpoint(tmp_path)
    names = [n for n, _ in a.named_parameters()]
    assert {k for k in info.keys() if k.startswith("optimizer/")} == {
        f"optimizer/{n}/{f}" for n in names for f in ("step", "exp_avg", "exp_avg_sq", "master")}
    b = _small_model(dtype, seed=1)
    opt_b = _optimizer(kind, b)
    loading = ShardedState(list(b.named_parameters()))
    targets, states = loading.optimizer_targets(info, opt_b.state_ranges())
    read_tensors({**loading.model_targets(info), **targets}, info)
    assert all(s.fields["step"].item() == 3 for s in states.values())
    opt_b.load_named_param_states(states)
    for k in (3, 4):
        _step(opt_a, a, k)
        _step(opt_b, b, k)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    ref, got = opt_a.named_param_states(), opt_b.named_param_states()
    assert all(torch.equal(ref[n].fields[f], got[n].fields[f]) for n in ref for f in ref[n].fields)


# Sharded distributed-optimizer checkpoints -------------------------------------------------------
def _save_allocations(overrides: list[str], root: str) -> dict:
    """One ZeRO training step, then a synchronous save under torch.profiler: the high-water mark of
    CPU tensor bytes allocated during the save, beside this rank's optimizer shard and largest bucket."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megatron_lite.config import load_config, validate
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides + [f"checkpoint.save={root}"])
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    trainer.train_step()
    optimizer = trainer.optimizer
    shard = sum(t.numel() * t.element_size() for s in optimizer.inner.state.values() for t in s.values() if t.ndim)
    shard += sum(m.numel() * m.element_size() for m in optimizer.master_slices if m.dtype != trainer.params[0].dtype)
    bucket = max(end - start for start, end in trainer.grads.buckets) * trainer.grads.data.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.checkpointer.save()
    trace = Path(root) / f"trace{state.rank}.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    trainer.checkpointer.finish(trainer.iteration)
    state.destroy()
    return {"peak": peak, "shard": shard, "bucket": bucket,
            "parameters": sum(p.numel() for p in trainer.params)}


def test_distributed_optimizer_save_allocates_only_its_own_shard(ranks, tmp_path):
    """bf16 with ZeRO at DP 4: each rank writes the state it owns; nothing is gathered. Gathering the
    full fp32 state (exp_avg, exp_avg_sq, master: 12 bytes per parameter) would be ~4x the bound."""
    overrides = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.seq_length=32",
                 "training.micro_batch_size=1", "training.global_batch_size=4", "training.train_iters=1",
                 "training.eval_iters=0", "training.precision=bf16", "optimizer.use_distributed_optimizer=true",
                 "optimizer.grad_bucket_elements=100000", f"logging.dir={tmp_path / 'run'}"]
    for rank, r in enumerate(ranks(4).run(_save_allocations, overrides, str(tmp_path / "ckpt"))):
        gathered = 12 * r["parameters"]
        print(f"rank {rank}: save allocated at most {r['peak'] / 2**20:.2f} MiB; own shard {r['shard'] / 2**20:.2f} "
              f"MiB + largest bucket {r['bucket'] / 2**20:.2f} MiB; full gathered state {gathered / 2**20:.2f} MiB")
        assert r["peak"] <= r["shard"] + r["bucket"]
