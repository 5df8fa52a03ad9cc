"""Activation memory and step time for each recompute mode, single rank, fp32.

    python benchmarks/recompute.py [--steps 5]

Activation memory is measured, not estimated: the bytes of every tensor autograd keeps for the
backward during one forward (torch.autograd.graph.saved_tensors_hooks; a tensor saved twice counts
once). Parameters are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megatron_lite.config import load_config
from megatron_lite.model import build_model_chunks

# (overrides, micro batch, padded vocabulary). The explicit attention path stores the s×s attention
# probabilities that selective recomputation removes; SDPA's fused kernels never store them.
CONFIGS = {
    "gpt_tiny b4 s128 sdpa": (["model=gpt_tiny"], 4, 4096),
    "gpt_tiny b4 s128 explicit": (["model=gpt_tiny", "model.attention_backend=explicit"], 4, 4096),
    "gpt2_124m b1 s512 sdpa": (["model=gpt2_124m", "model.seq_length=512"], 1, 50304),
    "gpt2_124m b1 s512 explicit": (["model=gpt2_124m", "model.seq_length=512", "model.attention_backend=explicit"], 1, 50304),
}
MODES = [("none", 1), ("selective", 1), ("full", 1), ("full", 2)]


def saved_bytes(chunk, ids) -> int:
    params = {p.data_ptr() for p in chunk.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunk(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, (overrides, batch, vocab) in CONFIGS.items():
        cfg = load_config(overrides).model
        ids = torch.randint(0, vocab, (batch, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
        base_time = None
        for mode, k in MODES:
            chunk = build_model_chunks(cfg, vocab, recompute=mode, recompute_num_layers=k)[0]
            memory = saved_bytes(chunk, ids)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                chunk(ids[:, :-1], ids[:, 1:]).mean().backward()
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            base_time = base_time or t
            rows.append({"config": name, "recompute": mode if mode != "full" else f"full (k={k})",
                         "activation_mb": memory / 2**20, "step_ms": t * 1e3, "time_vs_none": t / base_time})
    print(f"{'config':<28} {'recompute':<12} {'activations MB':>15} {'fwd+bwd ms':>11} {'× none':>7}")
    for r in rows:
        print(f"{r['config']:<28} {r['recompute']:<12} {r['activation_mb']:>15.1f} {r['step_ms']:>11.1f} {r['time_vs_none']:>7.2f}")
    print(json.dumps({"benchmark": "recompute", "rows": rows}))


if __name__ == "__main__":
    main()
