"""Pipeline schedules checked by the simulator: bubble fractions, validity, and the checks failing."""

import json
import subprocess
import sys

import pytest

from megatron_lite.pipeline import schedules as S
from megatron_lite.pipeline.simulate import ScheduleError, simulate, simulate_schedule

TABLE = [
    (name, p, v, m)
    for p in (2, 4, 8)
    for v in (1, 2, 4)
    for m in (p, 2 * p, 4 * p)
    for name in ("gpipe", "1f1b", "interleaved")
    if v == 1 or name == "interleaved"
]


def test_bubble_fractions_match_the_paper():
    """(p−1)/(v·m) for interleaved 1F1B, (p−1)/m for GPipe and 1F1B; every list valid."""
    for name, p, v, m in TABLE:
        result = simulate_schedule(name, p, v, m)  # raises on deadlock or invalid order
        expected = (p - 1) / (v * m) if name == "interleaved" else (p - 1) / m
        assert abs(result.bubble_fraction - expected) < 1e-9, (name, p, v, m, result.bubble_fraction)
        assert result.ideal == m * 3.0


def test_communication_cost():
    """GPipe's critical path crosses 2(p − 1) messages (fill and drain); interleaving adds hops."""
    p, m, t = 4, 8, 0.1
    assert abs(simulate_schedule("gpipe", p, 1, m, t_comm=t).makespan - (33 + 2 * (p - 1) * t)) < 1e-9
    plain = simulate_schedule("interleaved", p, 2, m).makespan
    assert simulate_schedule("interleaved", p, 2, m, t_comm=t).makespan > plain + 2 * (p - 1) * t


def test_peak_activations():
    """GPipe stores all m microbatches; 1F1B at most p − rank; interleaved (in chunk units) more."""
    p, m = 4, 16
    assert simulate_schedule("gpipe", p, 1, m).peak_activations == [m] * p
    assert simulate_schedule("1f1b", p, 1, m).peak_activations == [4, 3, 2, 1]
    assert simulate_schedule("1f1b", p, 1, 2).peak_activations == [2, 2, 2, 1]
    # Megatron's warm-up 2(p−r−1) + (v−1)p forwards, plus the one in flight.
    assert simulate_schedule("interleaved", p, 2, m).peak_activations == [11, 9, 7, 5]
    assert simulate_schedule("interleaved", p, 2, m, forward_only=True).peak_activations == [0] * p


def test_schedule_shapes():
    """1F1B reads like the paper: warm-up min(p−r−1, m) forwards, then F/B pairs, then backwards."""
    actions = S.one_f_one_b(4, 1, 6, 1)
    computes = [S.describe(a) for a in actions if isinstance(a, S.COMPUTE)]
    assert computes == ["F0.0", "F1.0", "F2.0", "B0.0", "F3.0", "B1.0", "F4.0", "B2.0", "F5.0",
                        "B3.0", "B4.0", "B5.0"]
    assert actions[:3] == [S.RecvActivation(0, 0, 0), S.Forward(0, 0), S.SendActivation(0, 0, 2)]
    # Interleaved, rank 0 of p=2, v=2: chunk 0 on microbatches 0,1, then chunk 1 (the group of p).
    inter = [S.describe(a) for a in S.interleaved(2, 2, 4, 0) if isinstance(a, S.COMPUTE)]
    assert inter[:6] == ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1"]
    assert S.resolve("auto", 2) == "interleaved" and S.resolve("auto", 1) == "1f1b"
    forward_only = S.schedule("1f1b", 2, 1, 3, 0, forward_only=True)
    assert not any(isinstance(a, (S.Backward, S.SendGrad, S.RecvGrad)) for a in forward_only)
    simulate_schedule("1f1b", 2, 1, 3, forward_only=True)


@pytest.mark.parametrize("name, p, v, m, message", [
    ("interleaved", 4, 2, 6, "multiple of PP=4"),
    ("1f1b", 4, 2, 8, "use interleaved"),
    ("gpipe", 1, 2, 4, "use interleaved"),
    ("interleaved", 1, 2, 4, "more than one pipeline rank"),
    ("zigzag", 2, 1, 4, "not one of"),
])
def test_bad_sizes_are_rejected(name, p, v, m, message):
    with pytest.raises(ValueError, match=message):
        S.schedule(name, p, v, m, 0)


def _lists(p=2, m=2):
    return S.all_ranks("1f1b", p, 1, m)


def test_simulator_catches_broken_schedules():
    """Each check fails on a list broken on purpose."""
    # Deadlock: rank 0 waits for microbatch 0's gradient before sending its activation.
    lists = _lists()
    lists[0].remove(S.RecvGrad(0, 0, 1))
    lists[0].insert(0, S.RecvGrad(0, 0, 1))
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(lists, 2, 1, 2)
    # A backward dropped.
    lists = _lists()
    lists[1] = [a for a in lists[1] if a != S.Backward(1, 0)]
    lists[1] = [a for a in lists[1] if a != S.SendGrad(1, 0, 0)]
    lists[0] = [a for a in lists[0] if a != S.RecvGrad(1, 0, 1)]
    lists[0] = [a for a in lists[0] if a != S.Backward(1, 0)]
    with pytest.raises(ScheduleError, match="never runs"):
        simulate(lists, 2, 1, 2)
    # A forward repeated.
    lists = _lists()
    lists[1].append(S.Forward(0, 0))
    with pytest.raises(ScheduleError, match="twice|before its input"):
        simulate(lists, 2, 1, 2)
    # Backward before its forward.
    lists = _lists()
    first_b = lists[1].index(S.Backward(0, 0))
    lists[1].insert(0, lists[1].pop(first_b))
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate(lists, 2, 1, 2)
    # Messages received in another order than sent.
    lists = _lists(m=3)
    i, j = lists[1].index(S.RecvActivation(0, 0, 0)), lists[1].index(S.RecvActivation(1, 0, 0))
    lists[1][i], lists[1][j] = lists[1][j], lists[1][i]
    with pytest.raises(ScheduleError, match="channel 0->1"):
        simulate(lists, 2, 1, 3)


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "timeline.png"
    out = subprocess.run(
        [sys.executable, "-m", "megatron_lite.pipeline.simulate", "--pp", "4", "--vpp", "2",
         "--microbatches", "8", "--json", "--plot", str(png)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.stdout)
    assert report["schedule"] == "interleaved"
    assert abs(report["bubble_fraction"] - 3 / 16) < 1e-9
    assert report["peak_activations"] == [11, 9, 7, 5]
    assert png.stat().st_size > 10_000
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_lite.pipeline.simulate", "--pp", "4", "--vpp", "2",
         "--microbatches", "6"], capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "multiple of PP=4" in bad.stderr
