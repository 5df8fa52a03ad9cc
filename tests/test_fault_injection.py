"""Fault injection on a real run: 4 gloo ranks under torchrun (TP1 × PP2 × DP2, tiny GPT, endless
iterations). One rank is killed (kill -9) or frozen (SIGSTOP, a hang) after a few iterations; every
other rank must be gone within the collective timeout with a message naming what happened.

With checkpoints: after the kill the last checkpoint loads and training resumes; SIGTERM to every
rank saves a checkpoint and exits 0, and the resumed run continues exactly (same losses).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _start(tmp_path: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "megatron_lite.train", *TINY, *extra, f"logging.dir={tmp_path}"],
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
    return {r["iteration"]: r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "split" not in r}


def _torchrun(tmp_path: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "megatron_lite.train", *TINY, *extra, f"logging.dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_killed_rank_ends_the_job_and_is_named(tmp_path):
    """Rank 2 is killed: the others' next collective fails at once (gloo: connection reset), each
    prints one watchdog line naming itself, the collective and its group, and torchrun's summary
    names rank 2 and SIGKILL as the root cause. The last checkpoint then loads and training resumes."""
    ckpt = tmp_path / "ckpt"
    out, code, others, gone_after = _inject(
        tmp_path, [f"checkpoint.save={ckpt}", "checkpoint.save_interval=2"], rank=2, sig=signal.SIGKILL
    )
    (tmp_path / "kill_output.txt").write_text(out)
    assert not any(_alive(p) for p in others), f"ranks still alive {gone_after:.0f} s after the kill"
    assert code != 0
    root_cause = out.split("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 2 (local_rank: 2)" in root_cause and "Signal 9 (SIGKILL)" in root_cause, out[-3000:]
    for line in (ln for ln in out.splitlines() if "watchdog: rank" in ln):
        assert "a peer rank has probably died" in line and "waiting in" in line, line
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 2
    resumed = _torchrun(tmp_path / "resumed", [f"checkpoint.load={ckpt}", f"training.train_iters={saved + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(_losses(tmp_path / "resumed" / "metrics.jsonl")) == [saved + 1, saved + 2]


def test_sigterm_to_every_rank_saves_then_resume_is_exact(tmp_path):
    """SIGTERM to all 4 ranks: they agree, save, exit 0; the resumed run's losses equal those of an
    uninterrupted run bit for bit."""
    fixed = ["training.train_iters=40", "optimizer.lr_decay_style=constant"]
    ckpt = tmp_path / "ckpt"
    proc = _start(tmp_path / "stopped", fixed + [f"checkpoint.save={ckpt}"])
    _wait_for_iterations(proc, tmp_path / "stopped" / "metrics.jsonl", 3)
    for pid in _rank_pids(proc.pid).values():
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 40, out[-3000:]
    resumed = _torchrun(tmp_path / "resumed", fixed + [f"checkpoint.load={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _torchrun(tmp_path / "reference", fixed)
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, ref = _losses(tmp_path / "resumed" / "metrics.jsonl"), _losses(tmp_path / "reference" / "metrics.jsonl")
    assert sorted(got) == list(range(saved + 1, 41))
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
