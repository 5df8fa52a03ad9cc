"""Timelines of pipeline runs, simulated or recorded: the bubble of a trace, and the picture.

An event is a dict ``{"rank", "kind", "microbatch", "chunk", "start", "end"}`` with ``kind`` one of
``forward``, ``backward``, ``backward_input``, ``backward_weight`` (computations, drawn as boxes) or
``p2p`` (a wait for messages, drawn as a thin bar);
``simulate.simulate`` produces them in time units of a full-stage forward, the executor's ``trace``
in wall-clock seconds. matplotlib is imported only to draw (an optional dependency).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence


COMPUTE_KINDS = ("forward", "backward", "backward_input", "backward_weight")


def trace_bubble(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Bubble of a recorded run: (makespan − mean per-rank compute time) / mean compute time."""
    computes = [e for e in events if e["kind"] in COMPUTE_KINDS]
    t0 = min(e["start"] for e in computes)
    makespan = max(e["end"] for e in computes) - t0
    busy: dict[int, float] = defaultdict(float)
    for e in computes:
        busy[e["rank"]] += e["end"] - e["start"]
    ideal = sum(busy.values()) / len(busy)
    return {"makespan": makespan, "ideal": ideal, "bubble_fraction": (makespan - ideal) / ideal,
            "steady_bubble_fraction": rank_bubble(events)}


def rank_bubble(events: Sequence[dict[str, Any]]) -> float:
    """The most idle time any rank has between its own first and last computation, over the mean
    per-rank compute time: the bubble left when each rank may start the next iteration as soon as it
    is done (no synchronising step between iterations)."""
    spans: dict[int, list[float]] = {}
    busy: dict[int, float] = defaultdict(float)
    for e in events:
        if e["kind"] not in COMPUTE_KINDS:
            continue
        span = spans.setdefault(e["rank"], [e["start"], e["end"]])
        span[0], span[1] = min(span[0], e["start"]), max(span[1], e["end"])
        busy[e["rank"]] += e["end"] - e["start"]
    ideal = sum(busy.values()) / len(busy)
    return max(end - start - busy[r] for r, (start, end) in spans.items()) / ideal


def plot_timeline(events: Sequence[dict[str, Any]], path: str, title: str = "", v: int = 1) -> None:
    """Draw ranks × time boxes, forward blue, backward (or its input half) green, the weight half
    orange (darker for later chunks), each
    labelled with its microbatch number; other events (communication waits) as thin grey bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None

    t0 = min(e["start"] for e in events)
    nranks = max(e["rank"] for e in events) + 1
    span = max(e["end"] for e in events) - t0
    fig, ax = plt.subplots(figsize=(min(24, 4 + 0.25 * len(events) / nranks), 0.6 * nranks + 1.4))
    blues, greens, oranges = plt.get_cmap("Blues"), plt.get_cmap("Greens"), plt.get_cmap("Oranges")
    for e in events:
        start, width = e["start"] - t0, e["end"] - e["start"]
        y = nranks - 1 - e["rank"]
        if e["kind"] not in COMPUTE_KINDS:
            ax.barh(y - 0.3, width, left=start, height=0.12, color="0.6")
            continue
        shade = 0.45 + 0.4 * e["chunk"] / max(1, v - 1) if v > 1 else 0.6
        colour = {"forward": blues, "backward_weight": oranges}.get(e["kind"], greens)(shade)
        ax.barh(y, width, left=start, height=0.8, color=colour, edgecolor="black", linewidth=0.4)
        if width > span / 150:
            ax.text(start + width / 2, y, str(e["microbatch"]), ha="center", va="center",
                    fontsize=7, color="white" if shade > 0.7 else "black")
    ax.set_yticks(range(nranks), [f"rank {r}" for r in reversed(range(nranks))])
    ax.set_xlabel("time")
    ax.set_xlim(0, span)
    later = " (darker: later chunk)" if v > 1 else ""
    handles = [Patch(color=blues(0.6), label="forward"), Patch(color=greens(0.6), label="backward" + later)]
    if any(e["kind"] == "backward_weight" for e in events):
        handles[1] = Patch(color=greens(0.6), label="input gradient" + later)
        handles.append(Patch(color=oranges(0.6), label="weight gradient"))
    ax.legend(handles=handles,
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=len(handles), frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
