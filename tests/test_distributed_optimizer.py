"""The distributed optimizer (ZeRO-1) and overlapped gradient reduction against the plain optimizer,
through the real trainer; and measured memory per parameter against Megatron's formula."""

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.optim import DistributedOptimizer
from test_training import BASE, _train, read_metrics, rel

TOLERANCE = 1e-6
LAYOUTS = {
    "tp2_pp2_dp2": (8, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                        "parallel.sequence_parallel=true"]),
    "tp1_pp1_dp4": (4, []),
}
# Every run uses the same small buckets (many of them, so overlap has something to overlap): bucket
# boundaries change the order of the DP sums, and that is not what these tests compare.
BUCKETS = ["optimizer.grad_bucket_elements=5000"]
VARIANTS = {
    "distributed": ["optimizer.use_distributed_optimizer=true"],
    "distributed_overlap": ["optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true"],
    "overlap": ["optimizer.overlap_grad_reduce=true"],
    "distributed_overlap_both": ["optimizer.use_distributed_optimizer=true", "optimizer.overlap_grad_reduce=true",
                                 "optimizer.overlap_param_gather=true"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_plain_optimizer(ranks, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    pool = ranks(world)
    plain = pool.run(_train, BASE + BUCKETS + overrides + [f"logging.dir={tmp_path / 'plain'}"])[0]
    plain_losses = [r["loss"] for r in read_metrics(tmp_path / "plain")[0]]
    for name, extra in VARIANTS.items():
        params = pool.run(_train, BASE + BUCKETS + overrides + extra + [f"logging.dir={tmp_path / name}"])[0]
        losses = [r["loss"] for r in read_metrics(tmp_path / name)[0]]
        loss_err = rel(losses, plain_losses)
        param_err = max(rel(params[k], plain[k]) for k in plain)
        print(f"{layout} {name}: loss {loss_err:.1e} params {param_err:.1e}")
        assert loss_err < TOLERANCE and param_err < TOLERANCE, (name, loss_err, param_err)


def _memory_per_parameter(overrides: list[str]) -> dict:
    """Bytes of parameters, fp32 gradients and optimizer state on this rank, per local parameter."""
    from megatron_lite.train import run

    trainer = run(load_config(overrides))
    opt = trainer.optimizer
    n = sum(p.numel() for p in trainer.params)
    params = sum(p.numel() * p.element_size() for p in trainer.params)
    grads = trainer.grads.data.numel() * trainer.grads.data.element_size()
    states = sum(t.numel() * t.element_size() for s in opt.inner.state.values() for t in s.values() if t.ndim > 0)
    if isinstance(opt, DistributedOptimizer):
        masters = sum(m.numel() * m.element_size() for m in opt.master_slices if m.dtype != trainer.params[0].dtype)
    else:
        masters = sum(m.numel() * m.element_size() for m in opt.master_params if m.dtype != trainer.params[0].dtype)
    trainer.state.destroy()
    return {"dp": trainer.state.dp_size, "bytes_per_param": (params + grads + states + masters) / n}


@pytest.mark.parametrize("precision,formula", [("fp32", lambda d: 8 + 8 / d), ("bf16", lambda d: 6 + 12 / d)])
def test_memory_matches_megatron_formula(ranks, tmp_path, precision, formula):
    small = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.seq_length=32",
             "training.micro_batch_size=1", "training.global_batch_size=4", "training.train_iters=1",
             "training.eval_iters=0", f"training.precision={precision}", "optimizer.use_distributed_optimizer=true"]
    for tp in (4, 2, 1):  # 4 ranks: DP = 1, 2, 4; each run in its own logging.dir (a new run never reuses one)
        report = ranks(4).run(_memory_per_parameter, small + [f"parallel.tensor_model_parallel_size={tp}",
                                                              f"logging.dir={tmp_path / f'tp{tp}'}"])[0]
        expected = formula(report["dp"])
        print(f"{precision} DP={report['dp']}: measured {report['bytes_per_param']:.3f} B/param, formula {expected:.3f}")
        assert abs(report["bytes_per_param"] / expected - 1) < 0.01


def _early_launches(overrides: list[str]) -> int:
    from megatron_lite.train import run

    trainer = run(load_config(overrides))
    launched, buckets = trainer.grads.early_launches, len(trainer.grads.buckets)
    trainer.state.destroy()
    return launched, buckets


def test_overlap_starts_reductions_during_the_backward(ranks, tmp_path):
    overrides = BASE + ["training.train_iters=1", "training.eval_iters=0", "optimizer.overlap_grad_reduce=true",
                        "optimizer.grad_bucket_elements=5000", f"logging.dir={tmp_path}"]
    for launched, buckets in ranks(2).run(_early_launches, overrides):
        # Every bucket starts before the backward ends, the tied embedding's too: without pipeline
        # parallelism it has no copy on another stage to wait for.
        assert buckets > 10 and launched == buckets


def test_overlap_grad_reduce_default_follows_the_backend(monkeypatch):
    """optimizer.overlap_grad_reduce=null: on where the DP group runs NCCL, off on gloo or without a
    process group; true/false are taken as given."""
    from megatron_lite.optim import grads as grads_module
    from megatron_lite.optim import overlaps_reduction

    assert overlaps_reduction(True, None) and not overlaps_reduction(False, None)
    assert not overlaps_reduction(None, None)
    monkeypatch.setattr(grads_module.dist, "is_initialized", lambda: True)
    for backend, expected in (("nccl", True), ("gloo", False)):
        monkeypatch.setattr(grads_module.dist, "get_backend", lambda group=None, name=backend: name)
        assert overlaps_reduction(None, None) is expected
        assert overlaps_reduction(False, None) is False and overlaps_reduction(True, None) is True
    assert load_config([]).optimizer.overlap_grad_reduce is None
