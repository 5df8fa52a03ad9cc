"""The trainer in every layout against the single-rank run of the same global batch (float32,
dropout 0): per-iteration losses, gradient norms (so clipping sees the same global norm), the
validation loss and the final parameters, read from metrics.jsonl and gathered full state."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.gather import gather_full_state_dict
from megatron_lite.config import load_config

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
BASE = [
    "model.num_layers=8", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=256",
    "model.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=16",
    "training.train_iters=5", "training.eval_interval=5", "training.eval_iters=1", "optimizer.lr_warmup_iters=2",
    "optimizer.clip_grad=0.5", "logging.log_interval=100",
    # Adam divides by sqrt(v) + eps: with the default eps a gradient element near zero turns its
    # 1e-7 summation-order rounding into an lr-sized sign flip, which tests Adam, not the layout.
    # eps = 1e-4 keeps such elements in Adam's linear regime; the losses agree either way.
    "optimizer.eps=1e-4",
]
LAYOUTS = {
    "tp2_pp2_dp2": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                    "parallel.sequence_parallel=true"],
    "tp1_pp4_vpp2_dp2": ["parallel.pipeline_model_parallel_size=4",
                         "parallel.virtual_pipeline_model_parallel_size=2"],
    "tp2_pp1_dp4": ["parallel.tensor_model_parallel_size=2"],
    "tp4_pp2_dp1": ["parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2",
                    "parallel.pipeline_schedule=gpipe"],
}


def _train(overrides: list[str]) -> dict | None:
    from megatron_lite.train import run

    trainer = run(load_config(overrides), overrides)
    assert not any(t.name == "megatron_lite-watchdog" for t in threading.enumerate())  # ended with the run
    full = gather_full_state_dict(trainer.chunks, trainer.state)
    trainer.state.destroy()
    return full if trainer.state.rank == 0 else None


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "valid"]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def reference(ranks, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    params = ranks(1).run(_train, BASE + [f"logging.dir={run_dir}"])[0]
    return read_metrics(run_dir), params


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(ranks, reference, tmp_path, layout):
    (ref_train, ref_valid), ref_params = reference
    params = ranks(8).run(_train, BASE + LAYOUTS[layout] + [f"logging.dir={tmp_path}"])[0]
    train, valid = read_metrics(tmp_path)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5]
    loss_err = rel([r["loss"] for r in train], [r["loss"] for r in ref_train])
    norm_err = rel([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref_train])
    valid_err = rel([r["loss"] for r in valid], [r["loss"] for r in ref_valid])
    assert params.keys() == ref_params.keys()
    param_err = max(rel(params[k], ref_params[k]) for k in params)
    print(f"{layout}: loss {loss_err:.1e} grad norm {norm_err:.1e} valid {valid_err:.1e} params {param_err:.1e}")
    assert max(loss_err, norm_err, valid_err, param_err) < TOLERANCE


def test_entry_point_under_torchrun(reference, tmp_path):
    """The real command line: torchrun, Hydra overrides, 4 ranks as TP2 × PP2, interleaved."""
    (ref_train, _), _ = reference
    overrides = BASE + [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
        f"logging.dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "megatron_lite.train", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation at iteration 5" in proc.stdout
    train, _ = read_metrics(tmp_path)
    assert rel([r["loss"] for r in train], [r["loss"] for r in ref_train]) < TOLERANCE


def test_invalid_config_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lite.train", "model.hidden_size=130", f"logging.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config error: model.hidden_size: 130 is not divisible by model.num_attention_heads=4; use a multiple of 4"
    )


def test_missing_data_path_names_it(tmp_path):
    missing = tmp_path / "nope_text_document"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lite.train", f"data.paths=[{missing}]", f"logging.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_dataloader_workers_give_the_same_run(ranks, reference, tmp_path):
    (ref_train, _), _ = reference
    ranks(1).run(_train, BASE + ["data.num_workers=2", f"logging.dir={tmp_path}"])
    train, _ = read_metrics(tmp_path)
    assert [r["loss"] for r in train] == [r["loss"] for r in ref_train]
