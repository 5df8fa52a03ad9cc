"""Fault injection on a real run: 4 gloo ranks under torchrun (TP1 × PP2 × DP2, tiny GPT). One rank is
killed (kill -9) or frozen (SIGSTOP, a hang) in the middle of training; every other rank must be
gone within the collective timeout with a watchdog line that names, from the ranks' heartbeats,
the rank that stopped answering (not torchrun's summary, whose first reported failure is a race).

In-job restart: with torchrun's --max-restarts 1 and checkpoint.save, the killed job restarts on
its own from its last checkpoint, exits 0 and ends with the parameters of an uninterrupted run, bit
for bit. SIGTERM to every rank saves a checkpoint and exits 0, and the resumed run continues
exactly (same losses as the uninterrupted run).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "training.micro_batch_size=1", "training.global_batch_size=4", "training.train_iters=100000",
    "training.eval_interval=100000", "training.eval_iters=0", "logging.log_interval=1",
    "parallel.pipeline_model_parallel_size=2", "parallel.distributed_timeout_minutes=1",
]
DEADLINE_S = 90  # a bound on the whole run after the fault: the collective timeout plus start-up slack


def _rank_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(entry.name)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path, extra: list[str], max_restarts: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "--max-restarts", str(max_restarts), "-m", "megatron_lite.train", *TINY, *extra, f"logging.dir={tmp_path}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_iterations(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    """Until the logging rank has written ``n`` iterations (the run is in its steady state)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not reach its first iterations")


def _inject(tmp_path: Path, extra: list[str], rank: int, sig: int) -> tuple[str, int, list[int], float]:
    """Start the run, send ``sig`` to ``rank`` after 3 iterations, wait until every other rank is gone.

    Returns (torchrun's output, its exit code, the other ranks' pids, seconds from the signal until
    the last other rank exited).
    """
    proc = _start(tmp_path, extra)
    _wait_for_iterations(proc, tmp_path / "metrics.jsonl", 3)
    pids = _rank_pids(proc.pid)
    assert sorted(pids) == [0, 1, 2, 3], pids
    others = [pid for r, pid in pids.items() if r != rank]
    os.kill(pids[rank], sig)
    sent = time.monotonic()
    while any(_alive(p) for p in others) and time.monotonic() - sent < DEADLINE_S:
        time.sleep(0.05)
    gone_after = time.monotonic() - sent
    if sig == signal.SIGSTOP:
        os.kill(pids[rank], signal.SIGKILL)  # the frozen rank itself cannot act on torchrun's SIGTERM
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    print(f"signal {sig} to rank {rank}: other ranks gone after {gone_after:.2f} s")
    return out, proc.returncode, others, gone_after


def _losses(metrics: Path) -> dict[int, float]:
    """{iteration: loss} of the training records; an iteration redone after a restart: its last."""
    return {r["iteration"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "split" not in r}


def _torchrun(tmp_path: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "megatron_lite.train", *TINY, *extra, f"logging.dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def _final_parameters(ckpt: Path) -> dict:
    from megatron_lite.checkpoint.storage import find_checkpoint, read_full

    return read_full(find_checkpoint(ckpt), prefix="model/")


# The uninterrupted run both resume tests compare with: 160 iterations, constant LR, saved at the end.
# Long enough that a kill after the first few iterations lands while the job still trains (at ~30 ms
# per iteration on an idle machine, 40 iterations could end before the test found the rank's pid).
FIXED = ["training.train_iters=160", "optimizer.lr_decay_style=constant"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(losses, final parameters) of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = _torchrun(run_dir, FIXED + [f"checkpoint.save={run_dir / 'ckpt'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(run_dir / "metrics.jsonl"), _final_parameters(run_dir / "ckpt")


def test_killed_rank_is_named_and_the_job_restarts_exactly(tmp_path, reference):
    """Rank 2 is killed (kill -9) once 7 iterations are logged, in a job with checkpoint.save_interval=5
    under torchrun --max-restarts 1. The survivors' next collective fails; each prints one watchdog
    line naming rank 2 as the rank that stopped answering (from the heartbeats). torchrun restarts
    the workers, which resume from the last checkpoint on their own: the job exits 0, redoes at most
    5 iterations, and its final parameters equal the uninterrupted run's bit for bit."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    proc = _start(tmp_path, FIXED + [f"checkpoint.save={ckpt}", "checkpoint.save_interval=5"], max_restarts=1)
    _wait_for_iterations(proc, metrics, 7)
    pids = _rank_pids(proc.pid)
    assert sorted(pids) == [0, 1, 2, 3], pids
    os.kill(pids[2], signal.SIGKILL)
    killed, done_before = time.monotonic(), len(metrics.read_text().splitlines())
    resumed_after = None
    while proc.poll() is None and time.monotonic() - killed < 300:
        if resumed_after is None and len(metrics.read_text().splitlines()) > done_before:
            resumed_after = time.monotonic() - killed  # the restarted job's first iteration is logged
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=60)
    (tmp_path / "output.txt").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if "watchdog: rank" in ln]
    print("\n".join(lines))
    assert lines, out[-4000:]
    for line in lines:
        assert "rank 2 stopped answering at" in line and "waiting in" in line, line
    iterations = [r["iteration"] for r in map(json.loads, metrics.read_text().splitlines()) if "split" not in r]
    redone = len(iterations) - len(set(iterations))
    print(f"kill at iteration {done_before}: job exited 0 after {time.monotonic() - killed:.1f} s; first iteration "
          f"of the restarted job logged {resumed_after:.1f} s after the kill; {redone} iterations redone")
    # The restarted workers loaded the last checkpoint (a multiple of 5). Which one depends on how far
    # training got before the kill reached rank 2, so up to 5 iterations are redone (0 if it died
    # right after a save).
    loaded = [int(m) for m in re.findall(r"checkpoint: loaded \S*iter_(\d+)", out)]
    assert len(loaded) == 1 and loaded[0] % 5 == 0 and loaded[0] >= 5, out[-4000:]
    assert sorted(set(iterations)) == list(range(1, 161)) and 0 <= redone <= 5, iterations
    ref_losses, ref_params = reference
    assert _losses(metrics) == ref_losses
    params = _final_parameters(ckpt)
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[k], ref_params[k]) for k in params), [k for k in params if not torch.equal(params[k], ref_params[k])]


def test_sigterm_to_every_rank_saves_then_resume_is_exact(tmp_path, reference):
    """SIGTERM to all 4 ranks: they agree, save, exit 0; the resumed run's losses equal those of an
    uninterrupted run bit for bit."""
    ckpt = tmp_path / "ckpt"
    proc = _start(tmp_path / "stopped", FIXED + [f"checkpoint.save={ckpt}"])
    _wait_for_iterations(proc, tmp_path / "stopped" / "metrics.jsonl", 3)
    for pid in _rank_pids(proc.pid).values():
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 160, out[-3000:]
    resumed = _torchrun(tmp_path / "resumed", FIXED + [f"checkpoint.load={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, ref = _losses(tmp_path / "resumed" / "metrics.jsonl"), reference[0]
    assert sorted(got) == list(range(saved + 1, 161))
    assert all(got[i] == ref[i] for i in got), [(i, got[i], ref[i]) for i in got if got[i] != ref[i]][:3]


def test_hung_rank_is_reported_by_the_watchdog(tmp_path):
    """Rank 3 freezes (SIGSTOP): the others wait in a collective or a receive until the watchdog's
    step_timeout, then each prints one line naming its rank, action and collective, and exits 4."""
    out, code, others, gone_after = _inject(tmp_path, ["training.step_timeout=5"], rank=3, sig=signal.SIGSTOP)
    (tmp_path / "hang_output.txt").write_text(out)
    assert not any(_alive(p) for p in others), f"ranks still alive {gone_after:.0f} s after the hang"
    assert code != 0
    lines = [ln for ln in out.splitlines() if "watchdog: rank" in ln]
    print("\n".join(lines))
    for line in lines:  # named by the heartbeats, whoever reported first
        assert "rank 3 stopped answering at" in line, line
    # The first rank to reach the limit reports the timeout; its exit closes its connections, so
    # ranks still waiting on it may report a closed connection instead: both name where they wait.
    assert any("exceeded training.step_timeout=5.0 s" in line for line in lines), out[-3000:]
    for line in lines:
        assert "pipeline action" in line and "waiting in" in line, line


def test_derived_step_timeout():
    """None: the collective timeout until 3 steps are timed, then max(10 × their median, 60 s)."""
    from datetime import timedelta

    from megatron_lite.training.watchdog import Watchdog

    dog = Watchdog(None, None, timedelta(minutes=2))
    assert dog.limit() == 120.0 and dog.limit(scale=5) == 600.0
    assert "distributed_timeout_minutes" in dog._limit_source()
    dog.step_times = [0.5, 1.0, 20.0]
    assert dog.limit() == 60.0  # the floor: 10 × median 1 s is less
    dog.step_times = [10.0, 12.0, 11.0]
    assert dog.limit() == 110.0 and "derived" in dog._limit_source()
    assert Watchdog(None, 5.0, timedelta(minutes=2)).limit(scale=2) == 10.0


def test_watchdog_thread_ends_with_the_run():
    """``stop`` ends the checking thread (a finished trainer's thread kept its process groups, and
    their gloo threads, alive); the next ``watch`` starts a new one."""
    import threading
    from datetime import timedelta

    from megatron_lite.training.watchdog import Watchdog

    dog = Watchdog(None, 60.0, timedelta(minutes=2), poll_s=0.01)
    for _ in range(2):
        with dog.watch("iteration 1"):
            thread = dog._thread
            assert thread is not None and thread.is_alive()
        dog.stop()
        assert not thread.is_alive() and dog._thread is None
    assert not any(t.name == "megatron_lite-watchdog" for t in threading.enumerate())
