"""The zero-bubble schedules (zb1p, zbv) and uneven pipeline layouts on the GPT model, against the
single-rank model (float32, gloo, NCCL's group semantics as the executor always keeps them).

One iteration's forward and backward through the trainer's own model, data and gradient buffer,
stopped before the optimizer: the loss (mean over the global batch, 1e-6) and every parameter's
gradient after the data-parallel, tied-embedding and sequence-parallel reductions (1e-5 relative),
gathered to full tensors. Also counted: forwards recomputed per rank under full recomputation
(m·v: once per microbatch and chunk, never again for the weight half), and the executor's peak of
live activation sets against the simulator's.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.gather import gather_full_state_dict
from megatron_lite.config import load_config, validate
from megatron_lite.optim import finalize_grads
from megatron_lite.optim.grads import gather_params
from megatron_lite.parallel.state import ParallelState
from megatron_lite.pipeline.executor import ScheduleStats, run_schedule
from megatron_lite.pipeline.simulate import simulate_schedule

LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-6, 1e-5
BASE = [
    "model.num_layers=8", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.seq_length=16", "training.micro_batch_size=2", "training.global_batch_size=16",
    "training.train_iters=1", "training.eval_iters=0",
]
PP2, PP4 = "parallel.pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=4"
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
ZB1P, ZBV = "parallel.pipeline_schedule=zb1p", "parallel.pipeline_schedule=zbv"
RECOMPUTE, DISTOPT = "training.recompute=full", "optimizer.use_distributed_optimizer=true"
LAYOUTS = {  # 4 ranks each
    "zb1p_pp4": [PP4, ZB1P],
    "zb1p_pp2_tp2_sp": [PP2, ZB1P, *TP2_SP],
    "zb1p_pp2_dp2_distopt_recompute": [PP2, ZB1P, DISTOPT, RECOMPUTE],
    "zbv_pp4_recompute": [PP4, ZBV, RECOMPUTE],
    "zbv_pp2_tp2_sp": [PP2, ZBV, *TP2_SP],
    "zbv_pp2_dp2_distopt": [PP2, ZBV, DISTOPT],
    "zbv_pp2_dp2_overlap": [PP2, ZBV, "optimizer.overlap_grad_reduce=true", "optimizer.grad_bucket_elements=20000"],
    # Uneven stages: embedding-only and head-only stages, and uneven chunks under each placement.
    "zb1p_pp4_first0_last0": [PP4, ZB1P, "parallel.decoder_first_pipeline_num_layers=0",
                              "parallel.decoder_last_pipeline_num_layers=0"],
    "1f1b_pp2_layout": [PP2, "parallel.pipeline_layout=[3,5]"],
    "interleaved_pp2_vpp2_first1_last1": [PP2, "parallel.virtual_pipeline_model_parallel_size=2",
                                          "parallel.decoder_first_pipeline_num_layers=1",
                                          "parallel.decoder_last_pipeline_num_layers=1"],
    "zbv_pp2_layout": [PP2, ZBV, "parallel.pipeline_layout=[1,3,3,1]"],
}


def _one_iteration(overrides: list[str]) -> dict:
    """One iteration's loss and full gradients (on rank 0), recomputed forwards and peak per rank."""
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    forwards = [0]

    def count(module, args):
        forwards[0] += 1

    # The first layer of every chunk runs once per forward and once more per recomputation.
    hooks = [next(iter(chunk.layers.values())).register_forward_pre_hook(count)
             for chunk in trainer.chunks if len(chunk.layers)]
    for chunk in trainer.chunks:
        chunk.train()
    trainer.grads.start_step(dims.num_microbatches)
    stats = ScheduleStats()
    loss = run_schedule(trainer.actions, trainer.chunks, state, trainer._microbatches(trainer.train_data, 0),
                        trainer._forward_step, trainer.activation_shape, trainer.dtype, broadcast_loss=True,
                        stats=stats, placement=trainer.placement)
    finalize_grads(trainer.grads, state)
    for hook in hooks:
        hook.remove()
    if trainer.grads.reduce_scatter:  # each DP rank holds its reduced slices: gather them all
        gather_params(trainer.grads, trainer.grads.data)
    if state.dp_size > 1:
        dist.all_reduce(loss, group=state.dp_group)
        loss /= state.dp_size
    # The gradients in the parameters' place, gathered over TP and PP like the parameters.
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.main_grad.view_as(p)
    grads = gather_full_state_dict(trainer.chunks, state)
    for p, data in zip(params, saved):
        p.data = data
    result = dict(loss=loss.item(), grads=grads if state.rank == 0 else None, pp_rank=state.pp_rank,
                  forwards=forwards[0], with_layers=len(hooks), peak=stats.peak_live_activations,
                  early_reductions=trainer.grads.early_launches,
                  schedule=dims.pipeline_schedule, pp=dims.pp, vpp=dims.vpp, m=dims.num_microbatches)
    state.destroy()
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def reference(ranks, tmp_path_factory):
    return ranks(1).run(_one_iteration, BASE + [f"logging.dir={tmp_path_factory.mktemp('ref')}"])[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_single_rank(ranks, reference, tmp_path, layout):
    overrides = BASE + LAYOUTS[layout] + [f"logging.dir={tmp_path}"]
    results = ranks(4).run(_one_iteration, overrides)
    first = results[0]
    assert abs(first["loss"] - reference["loss"]) <= LOSS_TOLERANCE * abs(reference["loss"]), layout
    assert first["grads"].keys() == reference["grads"].keys()
    worst = max(first["grads"], key=lambda k: _rel(first["grads"][k], reference["grads"][k]))
    err = _rel(first["grads"][worst], reference["grads"][worst])
    print(f"{layout}: loss {abs(first['loss'] - reference['loss']):.1e}, worst gradient {worst} {err:.1e}")
    assert err < GRAD_TOLERANCE, (layout, worst, err)
    name, p, v, m = first["schedule"], first["pp"], first["vpp"], first["m"]
    peaks = simulate_schedule(name, p, v, m).peak_activations
    for r in results:
        assert r["peak"] == peaks[r["pp_rank"]], (layout, r["pp_rank"], r["peak"], peaks)
        recomputed = r["forwards"] - m * r["with_layers"]
        assert recomputed == (m * r["with_layers"] if RECOMPUTE in LAYOUTS[layout] else 0), (layout, r)
    if RECOMPUTE in LAYOUTS[layout]:
        assert all(r["with_layers"] == v for r in results)  # so recomputed == m·v on every rank
    if "optimizer.overlap_grad_reduce=true" in LAYOUTS[layout]:  # buckets reduced during the backward
        assert all(r["early_reductions"] > 0 for r in results), results


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_split_backward_in_16_bits(ranks, tmp_path, precision):
    """bf16 / fp16 (fp32 main gradients; fp16 with a constant loss scale, whose gradients stay
    scaled here): zbv and zb1p give 1F1B's loss and gradients on the same layout, up to the order in
    which microbatches accumulate in fp32."""
    runs = {}
    for name in ("1f1b", "zb1p", "zbv"):
        overrides = BASE + [PP2, f"parallel.pipeline_schedule={name}", f"training.precision={precision}",
                            "training.loss_scale=1024", f"logging.dir={tmp_path / name}"]
        runs[name] = ranks(4).run(_one_iteration, overrides)[0]
    for name in ("zb1p", "zbv"):
        assert abs(runs[name]["loss"] - runs["1f1b"]["loss"]) <= 1e-3 * abs(runs["1f1b"]["loss"])
        errors = {k: _rel(runs[name]["grads"][k], g) for k, g in runs["1f1b"]["grads"].items()}
        worst = max(errors, key=errors.get)
        print(f"{precision} {name}: worst gradient {worst} {errors[worst]:.1e}")
        assert errors[worst] < 1e-4, (name, worst, errors[worst])


def _train(overrides: list[str]) -> None:
    from megatron_lite.train import run

    run(load_config(overrides)).state.destroy()


def test_checkpoint_from_1f1b_resumes_under_zbv(ranks, tmp_path):
    """A checkpoint saved by PP 2 under 1F1B resumes in the V placement (rank 0 then holds the first
    and the last layer and the tied head borrows its embedding): the next loss is the uninterrupted
    run's, and saving under zbv and resuming under 1F1B comes back to it too."""
    from test_training import read_metrics

    def read_losses(run_dir):
        return {r["iteration"]: r["loss"] for r in read_metrics(run_dir)[0]}

    common = BASE + [PP2, "training.train_iters=3", "checkpoint.save_interval=1", "optimizer.eps=1e-4"]
    ranks(4).run(_train, common + [f"logging.dir={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'ckpt'}"])
    ranks(4).run(_train, common + [ZBV, f"logging.dir={tmp_path / 'b'}", f"checkpoint.load={tmp_path / 'ckpt'}",
                                   "checkpoint.load_iteration=1", f"checkpoint.save={tmp_path / 'ckpt_v'}"])
    ranks(4).run(_train, common + [f"logging.dir={tmp_path / 'c'}", f"checkpoint.load={tmp_path / 'ckpt_v'}",
                                   "checkpoint.load_iteration=2"])
    a, b, c = (read_losses(tmp_path / x) for x in "abc")
    assert sorted(b) == [2, 3] and sorted(c) == [3], (b, c)
    for i in b:
        assert abs(b[i] - a[i]) <= 1e-5 * abs(a[i]), (i, a, b)
    assert abs(c[3] - a[3]) <= 1e-5 * abs(a[3]), (a, c)


@pytest.mark.parametrize("schedule", ["zbv", "1f1b"])
def test_tied_embedding_is_summed_only_across_ranks(schedule):
    """Tied embeddings: the V placement puts the embedding and the head on pipeline rank 0, whose
    embedding group is that rank alone, so no parameter is marked for the embedding-group sum (it
    would be a concatenation, a no-op all-reduce and a copy per step, and would hold its bucket back
    from the early reduction). The looped placement marks the embedding and its tied copy."""
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.layout import RankGrid
    from megatron_lite.pipeline.schedules import placement_of

    cfg = load_config(BASE + [PP2, f"parallel.pipeline_schedule={schedule}", "model.tie_embeddings=true"]).model
    vpp = 2 if schedule == "zbv" else 1
    marked = {}
    for pp_rank in range(2):
        chunks = build_model_chunks(cfg, 4096, pp_rank=pp_rank, pp_size=2, vpp_size=vpp,
                                    placement=placement_of(schedule))
        marked[pp_rank] = sorted(name for c in chunks for name, p in c.named_parameters()
                                 if p.meta.grad_summed_over_embedding_group)
    groups = RankGrid(world_size=2, pp=2, head_on_first_stage=schedule == "zbv").embedding_groups()
    if schedule == "zbv":
        assert groups == [[0]] and marked == {0: [], 1: []}
    else:
        assert groups == [[0, 1]] and marked == {0: ["embedding.weight"], 1: ["output_weight"]}
