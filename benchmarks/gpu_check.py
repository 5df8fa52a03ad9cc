"""The Python side of ``benchmarks/gpu_check.sh``: the environment report, the MFU training runs (micro
batch as large as the planner says fits, halved once on an out-of-memory), and ``summary.json``,
rebuilt after every stage from whatever the stages left, so a run cut short still has one.

    python benchmarks/gpu_check.py env OUT/env.json
    python benchmarks/gpu_check.py train OUT NAME [--micro-batch N | --micro-batch-of RUN] -- OVERRIDES
    python benchmarks/gpu_check.py summary OUT

Needs only torch (and, for ``train``, the trainer's hydra/omegaconf), so it runs in the GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GiB = 2**30
MEDIAN_ITERATIONS = range(4, 13)  # iterations 4–12: after the first steps' allocator and kernel warm-up
# csrc and torch kernels differ only in rounding: their loss curves must agree this closely.
LOSS_AGREEMENT = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 1e-5}
OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


# ---- env ----

def _run(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - absent or broken counts as absent
        return None
    return str(getattr(module, "__version__", "present"))


def environment() -> dict[str, Any]:
    """GPU name, clocks, power limit, versions of torch / CUDA / NCCL / TE / apex, apex extensions."""
    import torch

    from megatron_lite.ops import csrc, vendor

    env: dict[str, Any] = {
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "transformer_engine": _module_version("transformer_engine"), "apex": _module_version("apex"),
        "apex_extensions": vendor.apex_extensions(), "hydra": _module_version("hydra"),
        "nvcc": _run(["nvcc", "--version"]), "csrc_cuda_plan": csrc.cuda_plan().__dict__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability="%d.%d" % torch.cuda.get_device_capability(0),
                   gpu_memory_gib=props.total_memory / GiB, sms=props.multi_processor_count,
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    smi = _run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
                "power.max_limit,memory.total,driver_version,persistence_mode", "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    return env


# ---- train ----

def planned_micro_batch(overrides: list[str], memory_bytes: float, candidates=(16, 12, 8, 6, 4, 3, 2, 1)) -> int:
    """The largest micro batch whose memory the planner predicts below ``memory_bytes``."""
    from megatron_lite.config import load_config
    from megatron_lite.plan.estimate import peak_memory, setup_from_config

    for mb in candidates:
        cfg = load_config([*overrides, f"training.micro_batch_size={mb}", f"training.global_batch_size={mb}"])
        vocab = cfg.model.vocab_size or 50257
        if peak_memory(setup_from_config(cfg, 1, vocab)).total <= memory_bytes:
            return mb
    return 1


def train(out: Path, name: str, overrides: list[str], micro_batch: Optional[int], memory_fraction: float) -> int:
    """Run the trainer for one MFU measurement into OUT/NAME (metrics.jsonl, train.log, run.json):
    micro batch = global batch (one micro batch per iteration), halved once after an OOM."""
    import torch

    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if micro_batch is None:
        memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 8 * GiB
        micro_batch = planned_micro_batch(overrides, memory_fraction * memory)
    attempts = []
    rc = 1
    while micro_batch >= 1:
        log = run_dir / "train.log"
        if (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        cmd = [sys.executable, "-m", "megatron_lite.train", *overrides, f"training.micro_batch_size={micro_batch}",
               f"training.global_batch_size={micro_batch}", f"logging.dir={run_dir}"]
        start = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                                ).returncode
        attempts.append({"micro_batch": micro_batch, "rc": rc, "seconds": time.perf_counter() - start})
        oom = rc != 0 and OOM.search(log.read_text(errors="replace")) is not None
        (run_dir / "run.json").write_text(json.dumps({"name": name, "overrides": overrides, "attempts": attempts,
                                                      "micro_batch": micro_batch, "rc": rc}, indent=1))
        if not oom or len(attempts) > 1:
            break
        micro_batch //= 2
    print(f"{name}: micro batch {micro_batch}, exit {rc}, {attempts[-1]['seconds']:.0f} s "
          f"({len(attempts)} attempt{'s' if len(attempts) > 1 else ''})")
    return rc


# ---- summary ----

def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_figures(run_dir: Path) -> Optional[dict]:
    """Median over iterations 4–12 of metrics.jsonl: tokens/s, TFLOP/s, MFU (causal and Megatron's
    non-causal count), peak memory; the loss curve; the micro batch it ran with."""
    records = [r for r in _jsonl(run_dir / "metrics.jsonl") if "split" not in r]
    if not records:
        return None
    window = [r for r in records if r["iteration"] in MEDIAN_ITERATIONS] or records[-1:]

    def median(key: str) -> Optional[float]:
        values = [r[key] for r in window if r.get(key) is not None]
        return statistics.median(values) if values else None

    run = _json(run_dir / "run.json") or {}
    return {
        "iterations": len(records), "micro_batch": run.get("micro_batch"),
        "tokens_per_s": median("tokens_per_s"), "tflops_per_device": median("tflops_per_device"),
        "tflops_per_device_noncausal": median("tflops_per_device_noncausal"),
        "mfu": median("mfu"), "mfu_noncausal": median("mfu_noncausal"),
        "ms_per_iter": median("ms_per_iter"), "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "losses": [r["loss"] for r in records],
    }


def loss_agreement(a: Optional[dict], b: Optional[dict], precision: str) -> Optional[dict]:
    """Largest relative difference of two runs' per-iteration losses, and whether it is within the
    tolerance for the precision."""
    if not a or not b or not a["losses"] or not b["losses"]:
        return None
    n = min(len(a["losses"]), len(b["losses"]))
    worst = max(abs(x - y) / abs(y) for x, y in zip(a["losses"][:n], b["losses"][:n]))
    return {"iterations": n, "max_relative_difference": worst, "tolerance": LOSS_AGREEMENT[precision],
            "agree": worst <= LOSS_AGREEMENT[precision]}


def test_counts(path: Path) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def kernel_figures(path: Path) -> Optional[dict]:
    data = _json(path)
    if not data:
        return None
    rows = [{k: r.get(k) for k in ("case", "backend", "seconds", "of_copy", "speedup_vs_torch", "skipped", "error")}
            for r in data["rows"]]
    return {"device": data["device"], "copy_bytes_per_s": data["copy_bytes_per_s"], "rows": rows}


def fp8_speedup(fp8: Optional[dict], reference: Optional[dict]) -> Optional[float]:
    """tokens/s of the FP8 run over the same model's in the run's precision (same micro batch)."""
    if not fp8 or not reference or not reference.get("tokens_per_s"):
        return None
    return fp8["tokens_per_s"] / reference["tokens_per_s"]


def summary(out: Path) -> dict:
    stages = _jsonl(out / "stages.jsonl")
    meta = _json(out / "meta.json") or {}
    runs = {d.name: run_figures(d) for d in sorted(out.iterdir()) if d.is_dir() and (d / "run.json").exists()}
    precision = meta.get("precision", "bf16")
    result = {
        "meta": meta, "stages": stages,
        "total_seconds": sum(s.get("seconds", 0) for s in stages),
        "env": _json(out / "env.json"), "tests": test_counts(out / "tests.xml"), "runs": runs,
        "loss_agreement_csrc_vs_torch": loss_agreement(runs.get("mfu_gpt_csrc"), runs.get("mfu_gpt_torch"), precision),
        "kernels": kernel_figures(out / "kernels.json"), "kernels_compile": kernel_figures(out / "kernels_compile.json"),
        "fp8_vs_bf16": fp8_speedup(runs.get("mfu_gpt_fp8"), runs.get("mfu_gpt_csrc")),
    }
    result["ok"] = bool(stages) and all(s["status"] in ("ok", "skipped") for s in stages) and (
        result["loss_agreement_csrc_vs_torch"] is None or result["loss_agreement_csrc_vs_torch"]["agree"])
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "summary.json")
    return result


def print_summary(result: dict) -> None:
    for s in result["stages"]:
        extra = f" ({s['reason']})" if s.get("reason") else ""
        print(f"  {s['stage']:<16} {s['status']:<8} {s.get('seconds', 0):6.1f} s{extra}")
    if result["tests"]:
        t = result["tests"]
        print(f"  tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
    for name, r in result["runs"].items():
        if r:
            mfu = f", MFU {r['mfu']:.1%} (non-causal count {r['mfu_noncausal']:.1%})" if r.get("mfu") else ""
            print(f"  {name}: micro batch {r['micro_batch']}, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tflops_per_device']:.3g} TFLOP/s{mfu}, peak {r['peak_memory_gb']:.1f} GB")
    agreement = result["loss_agreement_csrc_vs_torch"]
    if agreement:
        print(f"  csrc vs torch losses: max relative difference {agreement['max_relative_difference']:.2e} "
              f"over {agreement['iterations']} iterations ({'agree' if agreement['agree'] else 'DISAGREE'})")
    if result.get("fp8_vs_bf16"):
        print(f"  FP8 vs {result['meta'].get('precision', 'bf16')} (gpt): {result['fp8_vs_bf16']:.2f}× the tokens/s")
    print(f"  total {result['total_seconds']:.0f} s; {'OK' if result['ok'] else 'NOT OK'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env")
    p_env.add_argument("path", type=Path)
    p_train = sub.add_parser("train")
    p_train.add_argument("out", type=Path)
    p_train.add_argument("name")
    p_train.add_argument("--micro-batch", type=int)
    p_train.add_argument("--micro-batch-of", help="use the micro batch of this earlier run (OUT/NAME/run.json)")
    p_train.add_argument("--memory-fraction", type=float, default=0.8)
    p_summary = sub.add_parser("summary")
    p_summary.add_argument("out", type=Path)
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # the trainer's Hydra overrides
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "env":
        env = environment()
        args.path.write_text(json.dumps(env, indent=1))
        print(json.dumps(env, indent=1))
        return 0
    if args.command == "train":
        micro_batch = args.micro_batch
        if args.micro_batch_of:
            micro_batch = (_json(args.out / args.micro_batch_of / "run.json") or {}).get("micro_batch") or micro_batch
        return train(args.out, args.name, overrides, micro_batch, args.memory_fraction)
    print_summary(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
