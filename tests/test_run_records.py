"""What a run leaves in logging.dir: run records (config.yaml, overrides.yaml, launches.jsonl with
the git commit), metrics.jsonl (a new run there moves the earlier run's records aside, never
overwrites them), the test split's evaluation at the end, and wandb (offline) and tensorboard
holding the same numbers as metrics.jsonl.

wandb and tensorboard are optional packages: their checks skip where they are not installed
(scripts/run_tests.sh installs both into the test environment it creates, as CI does).
"""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.metrics import IntervalAverage, console_line
from megatron_lite.training.records import EARLIER_RUNS, RUN_RECORDS, set_aside_earlier_run
from megatron_lite.training.startup import check_optional_packages

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "training.micro_batch_size=1", "training.global_batch_size=2", "training.train_iters=6",
    "training.eval_interval=3", "training.eval_iters=1", "logging.log_interval=3",
]


def _have(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _train(overrides: list[str]) -> None:
    from megatron_lite.train import run

    run(load_config(overrides), overrides).state.destroy()


def _wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} from the offline run's .wandb file (a LevelDB-style log of protobuf
    records in 32 KiB blocks after a 7-byte header; wandb has no reader of its own for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data, pos, pending, history = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = items
    return history


def _tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_run_records_metrics_and_mirrors(ranks, tmp_path):
    """One short run: the run records, the per-iteration metrics with validation and the final test
    evaluation, the same numbers in wandb's offline files and tensorboard's event files; a new run
    in the same directory moves these records, all of them, into earlier_runs/<start time>/."""
    mirrors = []
    if _have("wandb"):
        mirrors.append("logging.wandb.enabled=true")
    if _have("tensorboard"):
        mirrors.append("logging.tensorboard=true")
    overrides = TINY + mirrors + [f"logging.dir={tmp_path}"]
    ranks(1).run(_train, overrides)

    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text()) == overrides
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["training"]["train_iters"] == 6
    launch = json.loads((tmp_path / "launches.jsonl").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert launch["git_commit"] is None or launch["git_commit"].split("+")[0] == head
    assert launch["world_size"] == 1 and launch["restart"] == 0 and launch["overrides"] == overrides

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in records if "split" not in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert [(r["split"], r["iteration"]) for r in records if "split" in r] == [
        ("valid", 0), ("valid", 3), ("valid", 6), ("test", 6)]

    if _have("tensorboard"):
        scalars = _tensorboard_scalars(tmp_path)
        assert scalars["train/loss"] == pytest.approx({i: r["loss"] for i, r in train.items()}, rel=1e-6)
        assert scalars["test/loss"] == pytest.approx({6: records[-1]["loss"]}, rel=1e-6)
    if _have("wandb"):
        history = _wandb_history(tmp_path)
        for i, r in train.items():
            assert history[i]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
            assert history[i]["train/grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-12)
    print(f"mirrors checked: {mirrors or 'none installed'}")

    assert set_aside_earlier_run(tmp_path, new_run=False) is None  # a resume appends
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    line = set_aside_earlier_run(tmp_path, new_run=True)
    print(line)
    (moved,) = (tmp_path / EARLIER_RUNS).iterdir()
    assert f"moved them to {moved}/" in line and "(metrics.jsonl: 10 lines)" in line
    assert moved.name == launch["time"][:19].replace("-", "").replace(":", "").replace("T", "-")
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.is_file()} == written
    assert not any((tmp_path / name).exists() for name in RUN_RECORDS)
    assert (moved / "tensorboard").is_dir() == _have("tensorboard")


def test_console_line_averages_the_interval():
    """The console line shows the interval's mean loss and ms/iter, its throughput as total tokens
    over total time (non-finite losses left out), and the last iteration's lr and grad norm."""
    interval = IntervalAverage()
    base = {"consumed_samples": 0, "global_batch_size": 16, "tflops_per_device": 1.0, "mfu": None,
            "peak_memory_gb": 1.0, "eta_s": 10.0, "loss_scale": 1.0, "skipped_iterations": 0}
    for i, (loss, ms, norm) in enumerate([(4.0, 100.0, 1.0), (2.0, 300.0, 3.0), (math.nan, 200.0, math.nan)], start=1):
        interval.add({**base, "iteration": i, "loss": loss, "ms_per_iter": ms, "grad_norm": norm, "lr": i * 1e-3,
                      "tokens_per_s": 1000 / (ms / 1e3)})
    average = interval.take()
    assert average["loss"] == 3.0 and average["ms_per_iter"] == 200.0 and math.isnan(average["grad_norm"])
    assert average["lr"] == 3e-3 and average["tokens_per_s"] == pytest.approx(3000 / 0.6)
    line = console_line(average, 10)
    assert "iteration      3/10" in line and "lr 3.000e-03 | grad norm nan" in line
    assert "mean of 3 iterations: loss 3.0000, ms/iter 200.0, tokens/s 5,000" in line
    assert interval.records == []


def test_missing_optional_package_is_one_line_on_every_rank(tmp_path, monkeypatch):
    """logging.wandb.enabled / logging.tensorboard without the package: a ConfigError naming the key
    and the install command, raised by the start-up check every rank runs before any process group
    exists (here: the package made unimportable)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    for key, package in (("logging.wandb.enabled", "wandb"), ("logging.tensorboard", "tensorboard")):
        with pytest.raises(ConfigError) as err:
            check_optional_packages(load_config([f"{key}=true", f"logging.dir={tmp_path}"]))
        print(err.value)
        assert str(err.value).startswith(f"{key}: is true but the {package} package is not installed: pip install {package}")
    check_optional_packages(load_config(["logging.wandb.enabled=true", "logging.wandb.mode=disabled"]))


def test_hydra_remedy_lines_are_kept(tmp_path):
    """An ambiguous override keeps Hydra's numbered remedies (how to quote it), on one line, no traceback."""
    done = subprocess.run([sys.executable, "-m", "megatron_lite.train", "data.split=98,2,0", f"logging.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    print(done.stderr.strip())
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "2. To use it as string, quote the value: key=" in done.stderr and "--multirun" in done.stderr
