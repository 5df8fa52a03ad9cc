"""Fused-kernel benchmark: forward + backward of each op with every backend importable on this machine
(torch eager with F.rms_norm / F.layer_norm as the fair baselines, csrc, Transformer Engine, apex, and
torch.compile of the reference last), at the shapes of gpt_1p5b and llama_1b and at h = 8192. Reports
time, the bandwidth the op must move, that bandwidth as a fraction of a device-to-device copy timed in
the same run, and speed against torch eager.

    python benchmarks/kernels.py                                 # CPU, fp32, small token count
    python benchmarks/kernels.py --device cuda --json out.json   # GPU, bf16, 16384 tokens
    python benchmarks/kernels.py --compile-only --json c.json    # only torch.compile (slow to build)

Bytes moved are what an ideally fused forward + backward must read and write once: the norms,
bias-GeLU: 5 × numel (fwd x → y; bwd dy, x → dx); rotary: 4 × numel; SwiGLU: 4 × numel of its
[rows, 2f] input (fwd 2f → f; bwd f + 2f → 2f); causal softmax: 3 × the visible scores + 2 × numel
(only keys ≤ the query are read; every output is written). Parameters and statistics are ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_lite.ops import csrc, reference, vendor  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The shapes of configs/model/gpt_1p5b.yaml and llama_1b.yaml (tests/test_gpu_check.py checks them
# against the YAML), and a wide norm; `tiny` is the dry run's. `seq` is the sequence of the rotary and
# softmax cases (gpt_1p5b's own, 1024; llama_1b's 2048).
MODELS = {
    "gpt_1p5b": dict(hidden=1600, heads=25, head_dim=64, ffn=6400, norm="layer_norm", act="bias_gelu",
                     rope=False, seq=1024),
    "llama_1b": dict(hidden=2048, heads=32, head_dim=64, ffn=8192, norm="rms_norm", act="swiglu", rope=True,
                     seq=2048),
    "h8192": dict(hidden=8192, heads=64, head_dim=128, ffn=2 * 8192, norm="rms_norm", act="swiglu", rope=False,
                  seq=None),
    "tiny": dict(hidden=96, heads=4, head_dim=24, ffn=256, norm="layer_norm", act="swiglu", rope=True, seq=64),
}
BACKENDS = ("torch", "csrc", "te", "apex", "compile")


def cases(model: str, tokens: int) -> list[tuple[str, str]]:
    """(case name, op) of one model: its norm(s), activation, rotary and the explicit-attention softmax."""
    m = MODELS[model]
    ops = ["rms_norm", "layer_norm"] if model == "h8192" else [m["norm"]]
    ops.append(m["act"])
    whole_sequences = bool(m["seq"]) and tokens >= m["seq"] and tokens % m["seq"] == 0
    if m["rope"] and whole_sequences:
        ops.append("rotary")
    if whole_sequences:
        ops.append("causal_softmax")
    return [(f"{model}/{op}", op) for op in ops]


def make_args(model: str, op: str, tokens: int, dtype: torch.dtype, device: str) -> tuple[tuple, int]:
    """Arguments of one call of ``op`` at a model's shapes (tokens = micro batch × sequence) and the
    elements an ideally fused forward + backward moves (module docstring)."""
    m = MODELS[model]
    h = m["hidden"]

    def t(*shape, scale=1.0):
        return (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype).requires_grad_()

    if op in ("rms_norm", "layer_norm"):
        x = t(tokens, h)
        w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
        return ((x, w, 1e-5) if op == "rms_norm" else (x, w, t(h), 1e-5)), 5 * x.numel()
    if op == "swiglu":
        x = t(tokens, 2 * m["ffn"], scale=2.0)
        return (x,), 4 * x.numel()
    if op == "bias_gelu":
        x = t(tokens, m["ffn"], scale=2.0)
        return (x, t(m["ffn"])), 5 * x.numel()
    seq = m["seq"]
    if op == "rotary":
        x = t(tokens // seq, seq, m["heads"], m["head_dim"])
        angles = torch.arange(seq, device=device)[:, None] * torch.rand(m["head_dim"] // 2, device=device)
        return (x, angles.cos(), angles.sin()), 4 * x.numel()
    if op == "causal_softmax":
        scores = t(tokens // seq * m["heads"], seq, seq, scale=3.0)
        visible = scores.shape[0] * seq * (seq + 1) // 2
        return (scores, 1 / math.sqrt(m["head_dim"])), 3 * visible + 2 * scores.numel()
    raise KeyError(op)


def eager(op: str) -> Callable:
    """torch eager: the fused ATen norms where PyTorch has them (the fair baseline), else the reference."""
    if op == "rms_norm" and hasattr(F, "rms_norm"):
        return lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps)
    if op == "layer_norm":
        return lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return getattr(reference, op)


def vendor_fn(backend: str, op: str, args: tuple) -> Optional[Callable]:
    """The TE / apex kernel for ``op`` if the library is installed and takes these arguments."""
    provider = vendor.te_ops() if backend == "te" else vendor.apex_ops()
    if op not in provider:
        return None
    accepts, fn = provider[op]
    return fn if accepts(*args) else None


def available_backends(device: str) -> dict[str, str]:
    """Backend → why it is not available ("" if it is)."""
    te, apex = vendor.te_ops(), vendor.apex_ops()
    return {
        "torch": "",
        "csrc": "" if csrc.available() and (device == "cpu" or csrc.has_cuda_kernels()) else csrc.describe_build(),
        "te": "" if device == "cuda" and te else "not installed" if not te else "CPU run",
        "apex": "" if device == "cuda" and apex else "not installed (or no CUDA extensions)" if not apex else "CPU run",
        "compile": "",
    }


def time_fwd_bwd(fn: Callable, args: tuple, device: str, min_seconds: float) -> float:
    """Median seconds of one forward + backward (gradients of every grad-requiring input). Steps run
    in batches of ≥ ~10 ms between synchronisations, so that on a GPU the timing is not the host's."""
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grad_out = torch.randn_like(fn(*args))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def batch(steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            torch.autograd.grad(fn(*args), wrt, grad_out)
        sync()
        return (time.perf_counter() - t0) / steps

    batch(2)
    steps = max(1, math.ceil(0.01 / batch(1)))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - start < min_seconds:
        samples.append(batch(steps))
    return statistics.median(samples)


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes/s of a device-to-device tensor copy (bytes read + written): the practical bound."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)
    runs = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        sync()
        runs.append((time.perf_counter() - t0) / 5)
    return 2 * src.numel() * 4 / statistics.median(runs)


def benchmark(models: list[str], tokens: int, dtype: torch.dtype, device: str, backends: list[str],
              min_seconds: float, time_budget: float, copy_bw: float,
              on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """One row per (case, backend): seconds, bytes/s, fraction of the copy rate, speed-up over torch
    eager; torch.compile runs only while ``time_budget`` seconds are not used up (it compiles each op
    first). ``on_row(rows)`` after every row (a run killed later keeps what it measured)."""
    start = time.perf_counter()
    rows: list[dict] = []
    for model in models:
        for case, op in cases(model, tokens):
            args, elements = make_args(model, op, tokens, dtype, device)
            moved = elements * torch.empty((), dtype=dtype).element_size()
            for backend in backends:
                row = {"case": case, "op": op, "backend": backend, "bytes": moved}
                if backend == "torch":
                    fn = eager(op)
                elif backend == "csrc":
                    fn = getattr(csrc, op)
                elif backend in ("te", "apex"):
                    fn = vendor_fn(backend, op, args)
                else:
                    fn = None
                    if time.perf_counter() - start > time_budget:
                        row["skipped"] = "time budget used up"
                    else:
                        try:
                            t0 = time.perf_counter()
                            fn = torch.compile(getattr(reference, op))
                            time_fwd_bwd(fn, args, device, 0.0)  # compile outside the timing
                            row["compile_s"] = time.perf_counter() - t0
                        except Exception as err:  # noqa: BLE001 - report and go on without it
                            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                            fn = None
                if fn is None:
                    row.setdefault("skipped", "the kernel does not take this input")
                else:
                    row["seconds"] = time_fwd_bwd(fn, args, device, min_seconds)
                    row["bytes_per_s"] = moved / row["seconds"]
                    row["of_copy"] = row["bytes_per_s"] / copy_bw
                    base = next((r for r in rows if r["case"] == case and r["backend"] == "torch"), row)
                    if "seconds" in base:
                        row["speedup_vs_torch"] = base["seconds"] / row["seconds"]
                rows.append(row)
                on_row(rows)
            del args
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':26s} {'backend':8s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s} {'vs torch':>9s}")
    for r in rows:
        if "seconds" in r:
            print(f"{r['case']:26s} {r['backend']:8s} {r['seconds'] * 1e3:9.3f} {r['bytes_per_s'] / 1e9:8.1f} "
                  f"{r['of_copy']:8.0%} {r.get('speedup_vs_torch', float('nan')):8.2f}x", flush=True)
        else:
            print(f"{r['case']:26s} {r['backend']:8s} {'-':>9s}   ({r.get('error') or r['skipped']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--tokens", type=int, default=None, help="rows per call (default 16384 GPU, 2048 CPU)")
    parser.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS)
                        + " (default: gpt_1p5b,llama_1b,h8192; on CPU gpt_1p5b,llama_1b)")
    parser.add_argument("--compile-only", action="store_true", help="only torch.compile of the reference")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="timing per variant")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds after which torch.compile variants are skipped")
    parser.add_argument("--copy-mb", type=int, default=None, help="size of the copy (default 1024 GPU, 256 CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    tokens = args.tokens or (16384 if device == "cuda" else 2048)
    models = (args.models or ("gpt_1p5b,llama_1b,h8192" if device == "cuda" else "gpt_1p5b,llama_1b")).split(",")
    unavailable = available_backends(device)
    if args.compile_only:
        backends = ["torch", "compile"]
    else:
        backends = [b for b in BACKENDS if not unavailable[b] and (b != "compile" or not args.no_compile)]
    copy_bw = copy_bandwidth(device, args.copy_mb or (1024 if device == "cuda" else 256))
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {dtype}, {tokens} tokens; copy {copy_bw / 1e9:.1f} GB/s; backends {', '.join(backends)}"
          + "".join(f"; {b}: {why}" for b, why in unavailable.items() if why))
    def write(rows: list[dict]) -> None:  # the JSON after every row, replaced atomically
        if args.json:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps({
                "device": name, "dtype": str(dtype), "tokens": tokens, "copy_bytes_per_s": copy_bw,
                "backends": backends, "unavailable": {b: w for b, w in unavailable.items() if w}, "rows": rows,
            }, indent=1))
            os.replace(tmp, args.json)

    rows = benchmark(models, tokens, dtype, device, backends, args.min_seconds, args.time_budget, copy_bw, write)
    print_table(rows)


if __name__ == "__main__":
    main()
