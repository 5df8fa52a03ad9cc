"""Fused-kernel benchmark: each op's forward + backward with the csrc kernels, the PyTorch reference
(eager) and torch.compile of the reference, on the CPU or a GPU, reporting time, achieved memory
bandwidth and speed ratios against the reference measured in the same run.

    python benchmarks/kernels.py                      # CPU, fp32
    python benchmarks/kernels.py --device cuda --dtype bf16 --json out.json

Bandwidth counts the bytes an ideally fused forward + backward must move (inputs and saved tensors
read, outputs and gradients written, each once) and is compared with a plain tensor copy timed in
the same run (and, on a GPU, with the H200's ~4.3 TB/s).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_lite.ops import csrc, reference  # noqa: E402

H200_COPY_BYTES_PER_S = 4.3e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_case(op: str, scale: int, dtype: torch.dtype, device: str) -> tuple[tuple, int]:
    """Arguments of a GPT-like call to ``op`` (tokens = 2048·scale) and the number of activation
    elements an ideally fused forward + backward reads and writes."""
    tokens, hidden, heads, head_dim = 2048 * scale, 1024, 16, 64

    def t(*shape, grad=True):
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)

    if op in ("rms_norm", "layer_norm"):
        x, w = t(tokens, hidden), (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
        args = (x, w, 1e-5) if op == "rms_norm" else (x, w, t(hidden), 1e-5)
        return args, 5 * x.numel()  # fwd: x → y; bwd: dy, x → dx
    if op == "rotary":
        seq = 512
        x = t(tokens // seq, seq, heads, head_dim)
        angles = torch.arange(seq, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
        return (x, angles.cos().to(dtype), angles.sin().to(dtype)), 4 * x.numel()  # fwd x → y; bwd dy → dx
    if op == "swiglu":
        x = t(tokens, 2 * 2816)
        return (x,), 3 * x.numel()  # fwd: 2f → f; bwd: f + 2f → 2f
    if op == "bias_gelu":
        x = t(tokens, 4 * hidden)
        return (x, t(4 * hidden)), 5 * x.numel()
    if op == "causal_softmax":
        seq = 512
        s = t(tokens // seq * heads // 4, seq, seq)
        return (s, 1 / math.sqrt(head_dim)), 5 * s.numel()  # fwd x → y; bwd dy, y → dx
    raise KeyError(op)


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

    batch(3)
    steps = max(1, math.ceil(0.01 / batch(1)))
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - start < min_seconds:
        samples.append(batch(steps))
    return statistics.median(samples)


def copy_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Bytes/s of a large tensor copy (read + write), the machine's practical bandwidth bound."""
    src = torch.randn((2**30 if device == "cuda" else 2**26) // 4, device=device).to(dtype)
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
    return 2 * src.numel() * src.element_size() / statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--scale", type=int, default=None, help="tokens = 2048·scale (default 1 CPU, 64 GPU)")
    parser.add_argument("--ops", default="rms_norm,layer_norm,rotary,swiglu,bias_gelu,causal_softmax")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing per variant")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default torch's")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    scale = args.scale or (64 if args.device == "cuda" else 1)
    if csrc.extension() is None:
        sys.exit("benchmarks/kernels.py: the csrc extension did not build (see the warning above)")

    copy_bw = copy_bandwidth(args.device, dtype)
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads, dtype {dtype}, tokens {2048 * scale}; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    header = f"{'op':15s} {'torch ms':>9s} {'compile ms':>10s} {'csrc ms':>8s} {'csrc GB/s':>9s} " \
             f"{'of copy':>7s} {'torch/csrc':>10s} {'compile/csrc':>12s}"
    print(header)
    results = []
    for op in args.ops.split(","):
        case, elements = make_case(op, scale, dtype, args.device)
        moved = elements * torch.empty((), dtype=dtype).element_size()
        row = {"op": op, "bytes": moved}
        row["torch_s"] = time_fwd_bwd(getattr(reference, op), case, args.device, args.min_seconds)
        row["csrc_s"] = time_fwd_bwd(getattr(csrc, op), case, args.device, args.min_seconds)
        if not args.no_compile:
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(getattr(reference, op))
                time_fwd_bwd(compiled, case, args.device, 0.0)  # compile outside the timing
                row["compile_build_s"] = time.perf_counter() - t0
                row["compile_s"] = time_fwd_bwd(compiled, case, args.device, args.min_seconds)
            except Exception as err:  # noqa: BLE001 - report and go on without it
                row["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        row["csrc_bytes_per_s"] = moved / row["csrc_s"]
        compile_ms = f"{row['compile_s'] * 1e3:10.2f}" if "compile_s" in row else f"{'n/a':>10s}"
        compile_ratio = f"{row['compile_s'] / row['csrc_s']:12.2f}" if "compile_s" in row else f"{'n/a':>12s}"
        print(f"{op:15s} {row['torch_s'] * 1e3:9.2f} {compile_ms} {row['csrc_s'] * 1e3:8.2f} "
              f"{row['csrc_bytes_per_s'] / 1e9:9.1f} {row['csrc_bytes_per_s'] / copy_bw:7.0%} "
              f"{row['torch_s'] / row['csrc_s']:10.2f} {compile_ratio}", flush=True)
        results.append(row)
    if args.device == "cuda":
        fractions = ", ".join(f"{r['op']} {r['csrc_bytes_per_s'] / H200_COPY_BYTES_PER_S:.0%}" for r in results)
        print(f"csrc bandwidth as a fraction of the H200's 4.3 TB/s: {fractions}")
    for r in results:
        if "compile_error" in r:
            print(f"torch.compile failed for {r['op']}: {r['compile_error']}")
        elif "compile_build_s" in r:
            print(f"torch.compile of {r['op']}: {r['compile_build_s']:.0f} s to compile")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "dtype": str(dtype), "tokens": 2048 * scale,
                                         "copy_bytes_per_s": copy_bw, "ops": results}, indent=1))


if __name__ == "__main__":
    main()
