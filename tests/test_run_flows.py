"""The README's flows in the order a user meets them, with short overrides (issue 29, items 1-3).

- The main job, then the sanity check's ``checkpoint.save=…/checkpoints`` in the same logging.dir
  through scripts/pretrain_gpt.sh: the second run keeps the first run's records apart (moved to
  earlier_runs/, one line says where); a rank's user error (loading that checkpoint into another
  model shape) ends the script with that one line and exit code 2, not torchrun's report;
  plot_metrics draws each iteration's latest record.
- Killing the launcher (kill -9 of torchrun): every rank ends within seconds, exit code 4, with
  one line.
- An HF import with ``--seq-length S`` trains with ``use_checkpoint_model_config=true`` at S on
  the imported tokenizer (data preprocessed with it), data made by another tokenizer is one line
  before any rank starts, and export writes S as the context length.
"""

import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["parallel=single", "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.seq_length=16", "training.micro_batch_size=1", "training.global_batch_size=2",
        "training.eval_iters=1", "logging.log_interval=2"]
RANK_EXIT_S = 30  # a bound on the ranks' exit after the launcher is killed (they poll once a second)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _pretrain(*overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": str(nproc),
           "MASTER_PORT": _free_port(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "scripts/pretrain_gpt.sh"), *TINY, *overrides], env=env,
                          capture_output=True, text=True, timeout=300)


def _plot_metrics():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "scripts/plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_order_keeps_runs_apart_and_a_rank_error_is_the_last_line(tmp_path):
    main_job = tmp_path / "main_job"
    first = _pretrain("training.train_iters=2", f"logging.dir={main_job}")
    assert first.returncode == 0, first.stderr[-3000:]
    records = (main_job / "metrics.jsonl").read_text()

    # The sanity check's command in the same logging.dir: a new run, not refused.
    second = _pretrain("training.train_iters=4", "training.eval_interval=2", f"logging.dir={main_job}",
                       f"checkpoint.save={main_job / 'checkpoints'}")
    assert second.returncode == 0, second.stderr[-3000:]
    (earlier,) = (main_job / "earlier_runs").iterdir()
    moved = [line for line in second.stderr.splitlines() if line.startswith("logging:")]
    print(moved[0])
    assert len(moved) == 1 and f"moved them to {earlier}/" in moved[0]
    assert (earlier / "metrics.jsonl").read_text() == records  # the first run's records, intact
    assert "train_iters=2" in (earlier / "overrides.yaml").read_text()
    lines = [json.loads(x) for x in (main_job / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "split" not in r] == [1, 2, 3, 4]

    # A user error only the ranks can find (the checkpoint holds another model's shape): one line, last.
    third = _pretrain("training.train_iters=6", "model.hidden_size=64", f"checkpoint.load={main_job / 'checkpoints'}",
                      f"logging.dir={tmp_path / 'other'}", nproc=2)
    print(third.stderr.strip().splitlines()[-1])
    assert third.returncode == 2, third.stderr[-3000:]
    assert third.stderr.strip().splitlines()[-1].startswith("checkpoint error:")
    assert third.stderr.count("checkpoint error:") == 1
    assert "Traceback" not in third.stderr and "ChildFailedError" not in third.stderr

    # A resume redoes iterations 3-4: the plot keeps each iteration's latest record.
    redone = [{**r, "loss": r["loss"] + 1.0} for r in lines if r.get("iteration") in (3, 4) and "split" not in r]
    plot = _plot_metrics()
    train = plot.latest_per_iteration(lines + redone)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4] and train[2:] == redone
    (main_job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + redone))
    assert plot.main([str(main_job / "metrics.jsonl")]) == 0 and (main_job / "metrics.png").stat().st_size > 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_launcher_and_reap(run_dir: Path) -> dict:
    """(Run in a subprocess of its own, which adopts orphans as a subreaper.) Start 2 ranks through
    megatron_lite.launch, kill -9 the launcher after the second logged iteration, and wait up to
    RANK_EXIT_S for its ranks; returns their exit codes, the seconds it took and the stderr lines
    written after the kill."""
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the orphaned ranks become ours
    stderr = open(run_dir / "stderr.txt", "w+")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "megatron_lite.launch", "--nproc-per-node", "2", "--master-port", _free_port(),
         "-m", "megatron_lite.train", *TINY, "training.train_iters=100000", "training.eval_iters=0",
         "logging.log_interval=1", f"logging.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    ranks = _children(launcher.pid)
    offset = stderr.tell()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed, codes = time.monotonic(), {}
    while len(codes) < len(ranks) and time.monotonic() < killed + RANK_EXIT_S:
        for pid in set(ranks) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    seconds = time.monotonic() - killed
    for pid in set(ranks) - set(codes):  # still training: the failure this test is about
        os.kill(pid, signal.SIGKILL)
        codes[pid] = "alive"
    stderr.seek(offset)
    return {"codes": list(codes.values()), "seconds": seconds, "after_kill": stderr.read().splitlines()}


def test_killing_the_launcher_ends_every_rank(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"ranks {report['codes']} {report['seconds']:.1f} s after the kill: {report['after_kill']}")
    assert report["codes"] == [4, 4]
    assert len(report["after_kill"]) == 1 and "the launcher of this node's ranks" in report["after_kill"][0]


def test_imported_model_trains_at_its_length_on_its_tokenizer(ranks, tmp_path):
    pytest.importorskip("transformers")
    from hf_models import TEXT, save_hf_model
    from test_checkpoint import _train

    from megatron_lite.checkpoint.hf import main as hf
    from megatron_lite.checkpoint.storage import find_checkpoint
    from megatron_lite.config import ConfigError, load_config
    from megatron_lite.data import DataError
    from megatron_lite.data.preprocess import main as preprocess
    from megatron_lite.training.startup import settle

    save_hf_model("llama", tmp_path / "hf")
    imported = tmp_path / "imported"
    assert hf(["import", "--hf", str(tmp_path / "hf"), "--output", str(imported), "--seq-length", "64"]) == 0
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{k}: {TEXT[k % 2]}"}) + "\n" for k in range(40)))
    # The README recipe: the user's corpus tokenized with the imported tokenizer.
    assert preprocess(["--input", str(corpus), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       str(imported / "tokenizer"), "--output-prefix", str(tmp_path / "corpus"), "--append-eod"]) == 0
    run = ["training.micro_batch_size=1", "training.global_batch_size=2", "training.train_iters=2",
           "training.eval_iters=0", "data.split='1,0,0'", f"checkpoint.load={imported}",
           "checkpoint.use_checkpoint_model_config=true", f"checkpoint.save={tmp_path / 'trained'}",
           f"logging.dir={tmp_path / 'run'}"]

    # Data made by another tokenizer (the bundled one) is one line before any rank starts.
    assert preprocess(["--input", str(corpus), "--output-prefix", str(tmp_path / "bundled")]) == 0
    wrong = run + [f"data.paths=[{tmp_path / 'bundled_text_document'}]"]
    with pytest.raises(DataError) as err:
        settle(load_config(wrong), 1, wrong)
    print(err.value)
    assert "were tokenized with SentencePieceTokenizer" in str(err.value)
    assert f"data.tokenizer is HuggingFaceTokenizer {imported / 'tokenizer'}" in str(err.value)

    right = run + [f"data.paths=[{tmp_path / 'corpus_text_document'}]"]
    settled = settle(load_config(right), 1, right)
    assert settled.config.model.seq_length == 64 and settled.config.data.tokenizer.type == "HuggingFaceTokenizer"
    assert any("seq_length" in n and "data.tokenizer.model" in n for n in settled.notes), settled.notes
    ranks(1).run(_train, right)
    trained = find_checkpoint(tmp_path / "trained")
    assert trained.meta["trainer"]["iteration"] == 2 and trained.meta["model_config"]["seq_length"] == 64
    assert hf(["export", "--load", str(tmp_path / "trained"), "--output", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported/config.json").read_text())["max_position_embeddings"] == 64
    assert json.loads((tmp_path / "exported/tokenizer_config.json").read_text())["model_max_length"] == 64
    # The command line still wins: a length of its own; another tokenizer, whose mismatch says to drop it.
    shorter = right + ["model.seq_length=16"]
    assert settle(load_config(shorter), 1, shorter).config.model.seq_length == 16
    bundled = right + ["data.tokenizer.type=SentencePieceTokenizer"]
    with pytest.raises(ConfigError, match="leave data.tokenizer unset to use the tokenizer saved with it"):
        settle(load_config(bundled), 1, bundled)


if __name__ == "__main__":  # the subreaper side of test_killing_the_launcher_ends_every_rank
    print(json.dumps(kill_launcher_and_reap(Path(sys.argv[1]))))
