"""Activation recomputation: none, selective and full give the same losses and gradients, with
dropout on (the recomputation replays the TP-aware generators), under TP + SP and under PP."""

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.model import build_model_chunks
from megatron_lite.optim import GradBuffer, finalize_grads
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.parallel.state import ParallelState
from test_training import BASE, _train, read_metrics, rel

MODES = [("none", 1), ("selective", 1), ("full", 1), ("full", 2)]
MODEL = ["model=llama_tiny", "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.seq_length=32", "model.dropout=0.1"]


def _grads_per_mode() -> dict:
    state = ParallelState(tp=2)
    tp = TPGroup.from_state(state, sequence_parallel=True)
    cfg = load_config(MODEL).model
    ids = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode, k in MODES:
        chunk = build_model_chunks(cfg, 512, tp=tp, seed=3, recompute=mode, recompute_num_layers=k)[0]
        buffer = GradBuffer(chunk.parameters())
        buffer.start_step(1)
        losses = [chunk(ids[:, :-1], ids[:, 1:]).mean() for _ in range(2)]  # two steps of dropout masks
        sum(losses).backward()
        finalize_grads(buffer, state)
        out[(mode, k)] = {"loss": torch.stack(losses).detach(),
                          "grads": {n: p.main_grad.clone() for n, p in chunk.named_parameters()}}
    state.destroy()
    return out


def test_recompute_modes_match_under_tp_and_sp(ranks):
    for result in ranks(2).run(_grads_per_mode):
        ref = result[("none", 1)]
        for mode in MODES[1:]:
            got = result[mode]
            assert rel(got["loss"], ref["loss"]) < 1e-6, mode
            assert max(rel(got["grads"][n], g) for n, g in ref["grads"].items()) < 1e-6, mode


def test_recompute_under_pipeline(ranks, tmp_path):
    """TP2 × PP2 with dropout: the trainer's losses are the same whatever the recompute mode."""
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
              "parallel.sequence_parallel=true", "model.dropout=0.1", "training.train_iters=3"]
    losses = {}
    for mode in ("none", "selective", "full"):
        ranks(4).run(_train, BASE + layout + [f"training.recompute={mode}", f"logging.dir={tmp_path / mode}"])
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode)[0]]
    assert rel(losses["selective"], losses["none"]) < 1e-6
    assert rel(losses["full"], losses["none"]) < 1e-6
