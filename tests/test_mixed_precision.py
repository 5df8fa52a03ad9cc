"""fp16 with dynamic loss scaling, the non-finite-gradient guard, and bf16/fp16 tracking fp32."""

import math

import pytest
import torch

from megatron_lite.config import load_config, validate
from megatron_lite.optim.loss_scaler import LossScaler
from test_training import _train, read_metrics

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.seq_length=32",
         "training.micro_batch_size=2", "training.global_batch_size=8", "training.eval_iters=0",
         "optimizer.lr_warmup_iters=5", "logging.log_interval=1000"]


def test_dynamic_scaler_schedule():
    s = LossScaler(initial_scale=1024.0, window=3, hysteresis=2, min_scale=256.0)
    s.update(True)
    assert s.scale == 1024.0  # the first overflow is absorbed by the hysteresis
    s.update(True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024.0  # three clean steps double it
    for _ in range(6):
        s.update(True)
    assert s.scale == 256.0  # never below min_scale
    constant = LossScaler(initial_scale=128.0, dynamic=False)
    constant.update(True)
    assert constant.scale == 128.0


def _overflow_at(iteration: int, poisoned_rank: int, overrides: list[str]) -> list[dict]:
    """Train 4 iterations; at ``iteration`` one rank's loss becomes inf. Per iteration: whether this
    rank's parameters changed, the skip count and the loss scale."""
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer
    import torch.distributed as dist

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    forward = trainer._forward_step

    def poisoned(chunk_index, x, batch):
        out = forward(chunk_index, x, batch)
        if trainer.iteration == iteration and state.rank == poisoned_rank and trainer.chunks[chunk_index].spec.post_process:
            out = out * math.inf
        return out

    trainer._forward_step = poisoned
    report = []
    for _ in range(4):
        before = [p.detach().clone() for p in trainer.params]
        out = trainer.train_step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.params))
        report.append({"changed": changed, "skipped": out["skipped_iterations"], "scale": out["loss_scale"]})
    state.destroy()
    return report


def test_overflow_skips_the_step_on_every_rank(ranks, tmp_path):
    overrides = SMALL + ["parallel.tensor_model_parallel_size=2", "training.precision=fp16",
                         "training.initial_loss_scale=1024", "training.hysteresis=1", f"logging.dir={tmp_path}"]
    for rank, report in enumerate(ranks(4).run(_overflow_at, 2, 3, overrides)):
        assert [r["changed"] for r in report] == [True, True, False, True], rank
        assert [r["skipped"] for r in report] == [0, 0, 1, 1], rank
        assert [r["scale"] for r in report] == [1024.0, 1024.0, 1024.0, 512.0], rank  # halved after the skip


def test_nan_guard_in_fp32_stops_after_max_skipped_steps(ranks, tmp_path):
    overrides = SMALL + ["training.max_skipped_steps=1", f"logging.dir={tmp_path}"]
    with pytest.raises(Exception, match="1 consecutive iterations"):
        ranks(2).run(_overflow_at, 1, 1, overrides)


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.01), ("fp16", 0.005)])
def test_low_precision_tracks_fp32(ranks, tmp_path, precision, tolerance):
    common = SMALL + ["training.train_iters=50", "training.initial_loss_scale=65536"]
    ranks(1).run(_train, common + [f"logging.dir={tmp_path / 'fp32'}"])
    ranks(1).run(_train, common + [f"training.precision={precision}", f"logging.dir={tmp_path / precision}"])
    ref = [r["loss"] for r in read_metrics(tmp_path / "fp32")[0]]
    got = [r["loss"] for r in read_metrics(tmp_path / precision)[0]]
    worst = max(abs(a - b) for a, b in zip(got, ref))
    print(f"{precision}: max |loss - fp32 loss| over 50 iterations {worst:.4f} (fp32 {ref[0]:.3f} -> {ref[-1]:.3f})")
    assert len(got) == 50 and worst < tolerance
