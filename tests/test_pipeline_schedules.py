"""Pipeline schedules checked by the simulator under NCCL's group semantics: every schedule and size
runs, bubble fractions and memory match the papers, and the checks fail on broken lists."""

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


SWEEP = [
    (name, p, v, m, forward_only)
    for name in S.SCHEDULES
    for p in (2, 3, 4, 8)
    for v in ((1, 2, 4) if name == "interleaved" else (2,) if name == "zbv" else (1,))
    for m in sorted({p, 2 * p, 4 * p, p if name == "interleaved" else 1})  # and the smallest m
    for forward_only in (False, True)
]


def test_every_schedule_runs_under_nccl_semantics():
    """Each batch completes only when the peers have posted the batches holding the other ends of
    all its messages: no deadlock, complete work in order, for every schedule and size."""
    assert len(SWEEP) == 200
    for name, p, v, m, forward_only in SWEEP:
        simulate_schedule(name, p, v, m, forward_only=forward_only)  # raises ScheduleError if not


def test_zero_bubble_figures():
    """ZB-H1: (p−1)/(3m) at unit costs, at most 1F1B's peak. ZB-V: no rank idles inside its own span
    once m ≥ 2p, the makespan pays only the start-up offset (p−1)/(6m) (what optimizer
    post-validation would remove between iterations), and every rank holds at most p full-stage
    microbatches."""
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p):
            zb1p, one_f_one_b = simulate_schedule("zb1p", p, 1, m), simulate_schedule("1f1b", p, 1, m)
            assert abs(zb1p.bubble_fraction - (p - 1) / (3 * m)) < 1e-9, (p, m)
            assert max(zb1p.peak_activations) <= max(one_f_one_b.peak_activations) == p
            zbv = simulate_schedule("zbv", p, 2, m)
            assert max(zbv.peak_activations) <= 2 * p  # chunk sets: p full-stage microbatches
            if m >= 2 * p:
                assert zbv.steady_bubble_fraction <= 0.02, (p, m, zbv.steady_bubble_fraction)
                assert abs(zbv.bubble_fraction - (p - 1) / (6 * m)) < 1e-9, (p, m)


def test_split_backward_costs():
    """Separate costs for the two backward halves: a whole Backward costs both; laid out for its
    costs, ZB-H1 reaches the paper's (p−1)(F + B_input − B_weight)/(m(F + B_input + B_weight)); the
    default lists (laid out for equal costs) stay valid at any costs, only slower."""
    p, m = 4, 8
    plain = simulate_schedule("1f1b", p, 1, m, t_f=1, t_bi=1.5, t_bw=0.5)
    assert abs(plain.bubble_fraction - (p - 1) / m) < 1e-9
    for t_bw in (0.5, 1.0):
        zb1p = simulate_schedule("zb1p", p, 1, m, t_f=1, t_bi=1, t_bw=t_bw)
        assert abs(zb1p.bubble_fraction - (p - 1) * (2 - t_bw) / (m * (2 + t_bw))) < 1e-9, t_bw
    default_lists = simulate_schedule("zb1p", p, 1, m, t_f=1, t_bi=1, t_bw=0.5, layout_costs=(1, 1, 1))
    assert default_lists.bubble_fraction > zb1p.bubble_fraction
    for costs in (dict(t_f=1, t_bi=2, t_bw=0.3), dict(t_f=2, t_bi=1, t_bw=3, t_comm=0.2)):
        for name, v in (("zb1p", 1), ("zbv", 2), ("interleaved", 2)):
            simulate_schedule(name, p, v, m, layout_costs=(1, 1, 1), **costs)  # runs (raises if not)
            result = simulate_schedule(name, p, v, m, **costs)
            assert result.bubble_fraction < simulate_schedule("1f1b", p, 1, m, **costs).bubble_fraction


def test_communication_cost():
    """A batch holds both its ranks until it completes, sends too: GPipe's critical path crosses all
    2m exchanges of the first stage (m sends, m receives) and the 2(p − 2) further hops of the first
    microbatch's fill and the last one's drain. Interleaving adds hops."""
    p, m, t = 4, 8, 0.1
    gpipe = simulate_schedule("gpipe", p, 1, m, t_comm=t).makespan
    assert abs(gpipe - (3 * m + 3 * (p - 1) + 2 * (m + p - 2) * t)) < 1e-9
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
    # Each message is exchanged when it is produced: the next input arrives with this output's send.
    assert actions[:4] == [S.RecvActivation(0, 0, 0), S.Forward(0, 0), S.RecvActivation(1, 0, 0),
                           S.SendActivation(0, 0, 2)]
    # Steady state: [send gradient, receive activation] here against [send activation, receive
    # gradient] on the previous stage, Megatron's pairing.
    labels = [S.describe(a) for a in actions]
    assert labels[labels.index("B1.0") + 1:labels.index("F4.0")] == ["sendG1.0->0", "recvA4.0<-0"]
    # ZB-H1: stage r runs the weight half of microbatch k − r after the input half of k.
    zb = [S.describe(a) for a in S.schedule("zb1p", 4, 1, 6, 2) if isinstance(a, S.COMPUTE)]
    assert zb[:6] == ["F0.0", "F1.0", "Bi0.0", "F2.0", "Bi1.0", "F3.0"]
    assert zb[6:8] == ["Bi2.0", "W0.0"] and zb[-3:] == ["W3.0", "W4.0", "W5.0"]
    # ZB-V: rank p−1 holds the two middle chunks and hands the activation over without a message.
    last = S.schedule("zbv", 2, 2, 4, 1)
    assert S.Forward(0, 1) in last and S.SendActivation(0, 0, 0) not in last
    assert [S.global_chunk(2, r, c, S.V_SHAPE) for r in (0, 1) for c in (0, 1)] == [0, 3, 1, 2]
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
    ("zbv", 4, 1, 8, "exactly 2 virtual stages"),
    ("zb1p", 4, 2, 8, "use interleaved or zbv"),
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
    # Batches that do not pair up: rank 1 receives activation 2 only after weight passes that follow
    # its gradient-1 send, which waits for rank 0's gradient-1 receive, which rank 0 lists after its
    # activation-2 send. With sends that never block this would run; under NCCL's semantics it is
    # the deadlock it is on GPUs.
    f, b, bi, w = S.Forward, S.Backward, S.BackwardInput, S.BackwardWeight
    rank0 = [f(0, 0), S.SendActivation(0, 0, 1), f(1, 0), S.SendActivation(1, 0, 1), f(2, 0),
             S.SendActivation(2, 0, 1), S.RecvGrad(0, 0, 1), b(0, 0), S.RecvGrad(1, 0, 1), b(1, 0),
             S.RecvGrad(2, 0, 1), b(2, 0)]
    rank1 = [S.RecvActivation(0, 0, 0), f(0, 0), S.RecvActivation(1, 0, 0), f(1, 0), bi(0, 0),
             S.SendGrad(0, 0, 0), bi(1, 0), S.SendGrad(1, 0, 0), w(0, 0), w(1, 0),
             S.RecvActivation(2, 0, 0), f(2, 0), bi(2, 0), S.SendGrad(2, 0, 0), w(2, 0)]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 waits in \[sendA2.0->1, recvG0.0<-1\]"):
        simulate([rank0, rank1], 2, 1, 3)
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
