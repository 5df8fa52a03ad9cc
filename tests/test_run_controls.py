"""The run controls Megatron users expect (issue 29): console figures against the schedule, mock
data, the profiler's trace, batch-size ramp-up (DP × PP against one rank, exact resume mid-ramp), the
checkpoint's learning-rate schedule on resume, and the one-line errors (misspelt keys, an explicit
vendor kernel backend that is not installed, malformed ramps and profiling ranges)."""

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

from megatron_lite.config import ConfigError, load_config, validate
from megatron_lite.config import main as config_main
from megatron_lite.optim.lr_schedule import learning_rate
from megatron_lite.training.rampup import BatchRampup

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "training.micro_batch_size=1", "training.eval_iters=0", "optimizer.eps=1e-4", "data.mock=true",
]
# The ramp 2, 4, 6 over 8 samples with micro batch 1 × DP 2: iterations read 2, 2, 4, 6, 6, ... samples.
RAMP = ["training.global_batch_size=6", "training.rampup_batch_size=[2,2,8]", "training.train_iters=5",
        "optimizer.lr_warmup_iters=2", "logging.log_interval=100"]
DP2_PP2 = ["parallel.pipeline_model_parallel_size=2"]


def _train(overrides: list[str]) -> str:
    """Train; returns what the rank printed (its console)."""
    from megatron_lite.train import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(load_config(overrides)).state.destroy()
    return out.getvalue()


def _train_or_error(overrides: list[str]) -> str:
    """Train; returns the console, or the user error's line (the pool survives it)."""
    try:
        return _train(overrides)
    except ConfigError as err:
        return f"config error: {err}"


def _records(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in lines if "split" not in r}


def test_console_mock_data_and_profiler(ranks, tmp_path):
    """One run on synthetic tokens (no corpus): every console line shows the lr the schedule gives its
    iteration and that iteration's grad norm, the loss and ms/iter averaged over the interval; the
    start-up summary names the mock data; the profiler traces iterations 2-3 into logging.dir."""
    overrides = TINY + ["training.global_batch_size=2", "training.train_iters=7", "logging.log_interval=3",
                        "optimizer.lr_warmup_iters=3", "optimizer.lr=1e-3", "profiling.enabled=true",
                        f"logging.dir={tmp_path}"]
    console = ranks(1).run(_train, overrides)[0]
    records = _records(tmp_path)
    assert sorted(records) == list(range(1, 8)) and all(r["loss"] > 7 for r in records.values())  # ~ln 4096
    assert "data: train: 14 synthetic samples (uniform ids below 4,096; data.mock)" in console
    cfg = load_config(overrides).optimizer
    lines = [line for line in console.splitlines() if "] iteration" in line]
    assert len(lines) == 3  # iterations 3, 6 and the last, 7
    for line, (first, last) in zip(lines, [(1, 3), (4, 6), (7, 7)]):
        interval = [records[i] for i in range(first, last + 1)]
        assert f"iteration {last:>6}/7" in line
        assert f"| lr {learning_rate(last - 1, cfg, 7):.3e} | grad norm {records[last]['grad_norm']:.3f} |" in line
        mean_loss = sum(r["loss"] for r in interval) / len(interval)
        mean_ms = sum(r["ms_per_iter"] for r in interval) / len(interval)
        n = len(interval)
        assert f"mean of {n} iteration{'s' * (n > 1)}: loss {mean_loss:.4f}, ms/iter {mean_ms:.1f}," in line
    assert learning_rate(2, cfg, 7) != sum(learning_rate(i, cfg, 7) for i in range(3)) / 3  # not the mean
    trace = tmp_path / "profile" / "trace_rank0_iters2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert sorted(e["name"] for e in events if e["name"].startswith("iteration ")) == ["iteration 2", "iteration 3"]
    assert any(e.get("cat") == "cpu_op" for e in events)  # the ops themselves (Perfetto shows them nested)


def test_rampup_follows_megatron():
    """The batch size is Megatron's function of consumed samples (its float formula, checked here
    against the exact integer form), and consumed_after sums the sizes."""
    ramp = BatchRampup.from_config([32, 32, 1000], 256)
    per_increment = 1000 / ((256 - 32) / 32)
    for consumed in range(0, 1200, 7):
        expected = 256 if consumed > 1000 else 32 + int(consumed / per_increment) * 32
        assert ramp.batch_size(consumed) == expected, consumed
    consumed = 0
    for _ in range(40):
        consumed += ramp.batch_size(consumed)
    assert ramp.consumed_after(40) == consumed and ramp.consumed_after(0) == 0


def test_rampup_dp_pp_matches_single_rank_and_resumes_exactly(ranks, tmp_path):
    """A ramp on DP 2 × PP 2 trains the losses of one rank reading the same batches, and a resume
    from the checkpoint at iteration 2 (mid-ramp) continues bit-identically: same consumed samples,
    batch sizes, learning rates and losses."""
    base = TINY + RAMP
    ranks(1).run(_train, base + [f"logging.dir={tmp_path / 'one'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                 "checkpoint.save_interval=2"])
    ranks(4).run(_train, base + DP2_PP2 + [f"logging.dir={tmp_path / 'grid'}"])
    ranks(1).run(_train, base + [f"logging.dir={tmp_path / 'resumed'}", f"checkpoint.load={tmp_path / 'ckpt'}",
                                 "checkpoint.load_iteration=2"])
    one, grid, resumed = (_records(tmp_path / d) for d in ("one", "grid", "resumed"))
    assert [one[i]["global_batch_size"] for i in range(1, 6)] == [2, 2, 4, 6, 6]
    assert [one[i]["consumed_samples"] for i in range(1, 6)] == [2, 4, 8, 14, 20]
    for i in range(1, 6):
        assert grid[i]["consumed_samples"] == one[i]["consumed_samples"]
        assert grid[i]["loss"] == pytest.approx(one[i]["loss"], rel=1e-5)
        assert grid[i]["grad_norm"] == pytest.approx(one[i]["grad_norm"], rel=1e-5)
    assert sorted(resumed) == [3, 4, 5]
    for i in (3, 4, 5):
        for key in ("consumed_samples", "global_batch_size", "lr", "loss", "grad_norm"):
            assert resumed[i][key] == one[i][key], (i, key)


def test_resume_keeps_the_checkpoints_lr_schedule(ranks, tmp_path, capsys):
    """Another train_iters (the decay end, lr_decay_iters being null) or lr on resume is one line
    naming the keys; optimizer.override_opt_param_scheduler=true continues under the new schedule."""
    base = TINY + ["training.global_batch_size=2", "logging.log_interval=100", "optimizer.lr_warmup_iters=1"]
    ckpt = tmp_path / "ckpt"
    ranks(1).run(_train, base + ["training.train_iters=2", f"logging.dir={tmp_path / 'a'}", f"checkpoint.save={ckpt}"])
    resume = base + [f"checkpoint.load={ckpt}", f"logging.dir={tmp_path / 'b'}"]
    error = ranks(1).run(_train_or_error, resume + ["training.train_iters=4", "optimizer.lr=2e-3"])[0]
    assert config_main(["--world-size", "1", *resume, "training.train_iters=4", "optimizer.lr=2e-3"]) == 2
    assert capsys.readouterr().err == error + "\n"  # the same line before launch (scripts/pretrain_gpt.sh)
    assert error == (
        "config error: optimizer.override_opt_param_scheduler: the learning-rate schedule differs from the "
        "checkpoint's (optimizer.lr 0.001 -> 0.002, training.train_iters 2 -> 4); restore those values, or set "
        "optimizer.override_opt_param_scheduler=true to continue under this run's schedule")
    console = ranks(1).run(_train, resume + ["training.train_iters=4", "optimizer.override_opt_param_scheduler=true"])[0]
    assert "this run's learning-rate schedule replaces the checkpoint's (training.train_iters 2 -> 4)" in console
    cfg = load_config(base + ["training.train_iters=4"]).optimizer
    assert {i: r["lr"] for i, r in _records(tmp_path / "b").items()} == {3: learning_rate(2, cfg, 4),
                                                                          4: learning_rate(3, cfg, 4)}


@pytest.mark.parametrize("override, message", [
    ("training.trian_iters=3", "Key 'trian_iters' not in 'TrainingConfig' full_key: training.trian_iters "
                               "did you mean training.train_iters?"),
    ("model.rope_scaling.facter=2", "did you mean model.rope_scaling.factor?"),
    ("profilng.enabled=true", "did you mean profiling?"),
])
def test_misspelt_key_suggests_the_right_one(override, message):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["training.rampup_batch_size=[4,4]"], "training.rampup_batch_size: [4, 4] is not three integers"),
    (["training.rampup_batch_size=[6,4,100]"], "start 6 must be at most training.global_batch_size=16 and differ "
                                               "from it by a multiple of the increment 4"),
    (["training.rampup_batch_size=[2,2,100]"], "start 2 and increment 2 must be multiples of micro_batch_size × "
                                               "data-parallel size = 2×4 = 8"),
    (["training.rampup_batch_size=[4,4,100]", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=2"],
     "the global batch of 4 samples has 1 microbatch: the interleaved schedule needs"),
    (["profiling.enabled=true", "profiling.step_start=5", "profiling.step_end=4"],
     "profiling.step_end: 4 is before profiling.step_start=5"),
    (["profiling.enabled=true", "profiling.ranks=[4]"], "profiling.ranks: [4] must name ranks in [0, 4)"),
])
def test_bad_run_controls_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(["training.micro_batch_size=2", "training.global_batch_size=16"] + overrides), 4)
    assert message in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed")
def test_explicit_vendor_backend_that_is_not_installed_is_an_error():
    """model.kernel_backend=te/apex chosen explicitly: a start-up error before any process group
    (auto still falls back)."""
    from megatron_lite.training.startup import check_optional_packages

    with pytest.raises(ConfigError, match=r"^model.kernel_backend: te is not installed here \(needs Transformer Engine"):
        check_optional_packages(load_config(["model.kernel_backend=te"]))
    check_optional_packages(load_config(["model.kernel_backend=auto"]))
    assert re.search(r"use auto \(the best available\), csrc or torch$", str(_apex_error()))


def _apex_error() -> ConfigError | None:
    from megatron_lite import ops

    try:
        ops.require_backend("apex")
    except ConfigError as err:
        return err
    pytest.skip("apex is installed")


def test_data_summary_shows_splits_blends_and_empty_splits(tmp_path):
    """The start-up lines: documents, tokens, samples and epochs per split, each blend member's weight,
    and a line for a split the run wants samples of but that has no documents."""
    import numpy as np

    from megatron_lite.data import IndexedDatasetWriter, build_datasets, build_tokenizer
    from megatron_lite.data.builder import describe_splits

    for name, length in (("a", 30), ("b", 50)):
        writer = IndexedDatasetWriter(tmp_path / name, np.uint16)
        for doc in range(10):
            writer.add_document(list(range(doc, doc + length)))
        writer.finalize()
    cfg = load_config([f"data.paths=[0.3,{tmp_path / 'a'},0.7,{tmp_path / 'b'}]", "data.split='100,0,0'",
                       f"data.cache_dir={tmp_path / 'cache'}"]).data
    counts = (20, 4, 0)
    splits = build_datasets(cfg, build_tokenizer(cfg.tokenizer), 16, 1, counts)
    assert describe_splits(cfg, splits, counts) == [
        "data: train: blend of 2: weight 0.3 a: 10 documents, 300 tokens; 6 samples of 16 = 0.32 epochs; "
        "weight 0.7 b: 10 documents, 500 tokens; 14 samples of 16 = 0.448 epochs",
        "data: the valid split is empty (data.split=100,0,0 gives it no documents): no validation loss",
    ]  # the test split is not asked for (eval_iters batches only at the end: here 0)
