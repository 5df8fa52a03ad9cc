"""The Python side of ``benchmarks/gpu_check.sh``: the stage records, the environment report, the MFU
training runs (micro batch as large as the planner says fits, halved once on an out-of-memory), and
what comes back from the GPU machine: ``OUT/summary.json`` and ``OUT/gpu_check.tgz`` (the work
directory), rebuilt after every stage from whatever the stages left, so a run cut short still has both.

    python benchmarks/gpu_check.py start WORK OUT --dry-run 0|1 --budget S --limits "stage=S ..."
    python benchmarks/gpu_check.py record WORK OUT --stage NAME --status S --rc RC --seconds T ...
    python benchmarks/gpu_check.py wheels .whl benchmarks/gpu_check_wheels.txt
    python benchmarks/gpu_check.py toolchain            # prints "ARCH CUDA_HOME" for the build
    python benchmarks/gpu_check.py env WORK/env.json
    python benchmarks/gpu_check.py train WORK NAME [--micro-batch N | --micro-batch-of RUN] -- OVERRIDES
    python benchmarks/gpu_check.py summary WORK OUT

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
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GiB = 2**30
MEDIAN_ITERATIONS = range(4, 13)  # iterations 4–12: after the first steps' allocator and kernel warm-up
# Iteration 1 of the csrc and the torch run has the same weights and the same batch: the losses differ
# only by the kernels' rounding and must agree this closely. Later iterations (the updates amplify
# the difference) are reported, not gated.
LOSS_AGREEMENT = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 1e-5}
ARCHIVE = "gpu_check.tgz"
ARCHIVE_MAX_BYTES = 12 * 2**20  # uncompressed: the device tool hands back files under 16 MiB
KERNEL_BACKEND = re.compile(r"^kernel backend: (.*)$", re.MULTILINE)
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
        **toolkit_view(),
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


def toolkit_view() -> dict[str, Any]:
    """Where the CUDA toolkit is, as the build will see it: $CUDA_HOME, ``command -v nvcc``, torch's
    CUDA_HOME, and the toolkit root ``csrc.find_cuda_home`` picks (bin/nvcc and the headers)."""
    from torch.utils import cpp_extension

    from megatron_lite.ops import csrc

    return {"cuda_home_env": os.environ.get("CUDA_HOME"), "nvcc_on_path": shutil.which("nvcc"),
            "torch_cuda_home": cpp_extension.CUDA_HOME, "cuda_home_found": csrc.find_cuda_home(),
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "max_jobs": os.environ.get("MAX_JOBS")}


def toolchain() -> str:
    """``ARCH CUDA_HOME`` for the script to export before the build: the GPU's compute capability
    (``-`` without a GPU) and the CUDA toolkit root (``-`` if none)."""
    import torch

    from megatron_lite.ops import csrc

    arch = "%d.%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-"
    return f"{arch} {csrc.find_cuda_home() or '-'}"


def check_wheels(folder: Path, pins: Path) -> Optional[str]:
    """None if ``folder`` holds exactly one wheel of each package pinned in ``pins``, at its pin;
    else what is wrong, in one line (two versions of one package, a missing or other version)."""
    wanted = {}
    for line in pins.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            wanted[_normalise(name)] = version
    found: dict[str, set[str]] = {}
    for wheel in folder.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        found.setdefault(_normalise(name), set()).add(version)
    for name, versions in sorted(found.items()):
        if len(versions) > 1:
            return f"{folder}: {len(versions)} versions of {name} ({', '.join(sorted(versions))}); keep only {pins}'s"
    for name, version in wanted.items():
        if found.get(name) != {version}:
            have = ", ".join(sorted(found.get(name, ()))) or "none"
            return f"{folder}: {name}=={version} is pinned in {pins} but the folder has {have}"
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


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


def train(work: Path, name: str, overrides: list[str], micro_batch: Optional[int], memory_fraction: float) -> int:
    """Run the trainer for one MFU measurement into WORK/NAME (metrics.jsonl, train.log, run.json):
    micro batch = global batch (one micro batch per iteration), halved once after an OOM."""
    import torch

    run_dir = work / name
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
    backend = kernel_backend(log.read_text(errors="replace"))
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "kernel_backend": backend}, indent=1))
    print(f"{name}: micro batch {micro_batch}, exit {rc}, {attempts[-1]['seconds']:.0f} s "
          f"({len(attempts)} attempt{'s' if len(attempts) > 1 else ''}); kernel backend: {backend}")
    fell_back = csrc_fell_back(overrides, backend, torch.cuda.is_available())
    if rc == 0 and fell_back:
        print(f"{name}: {fell_back}")
        return 3
    return rc


def kernel_backend(log: str) -> Optional[str]:
    """The trainer's start-up line ``kernel backend: ...``, without its label."""
    match = KERNEL_BACKEND.search(log)
    return match.group(1).strip() if match else None


def csrc_fell_back(overrides: list[str], backend: Optional[str], cuda: bool) -> Optional[str]:
    """Why a run that asked for ``model.kernel_backend=csrc`` did not measure the csrc kernels (None
    if it did): the trainer fell back to torch, or, on a GPU, the extension has no CUDA kernels for it."""
    if "model.kernel_backend=csrc" not in overrides:
        return None
    if not backend or not backend.startswith("csrc"):
        return f"asked for model.kernel_backend=csrc but the trainer ran {backend or 'an unknown backend'}"
    if cuda and ("CUDA kernels for sm" not in backend or "not covering" in backend):
        return f"asked for model.kernel_backend=csrc but the GPU ran torch ops: {backend}"
    return None


# ---- summary ----

def _jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line that does not parse is skipped, not the file."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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
        "iterations": len(records), "micro_batch": run.get("micro_batch"), "kernel_backend": run.get("kernel_backend"),
        "tokens_per_s": median("tokens_per_s"), "tflops_per_device": median("tflops_per_device"),
        "tflops_per_device_noncausal": median("tflops_per_device_noncausal"),
        "mfu": median("mfu"), "mfu_noncausal": median("mfu_noncausal"),
        "ms_per_iter": median("ms_per_iter"), "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "losses": [r["loss"] for r in records],
    }


def loss_agreement(a: Optional[dict], b: Optional[dict], precision: str) -> Optional[dict]:
    """The relative difference of two runs' losses at iteration 1 (same weights, same batch: only the
    kernels' rounding differs), gated by the tolerance for the precision; the later iterations'
    differences reported without a gate."""
    if not a or not b or not a["losses"] or not b["losses"]:
        return None
    n = min(len(a["losses"]), len(b["losses"]))
    differences = [abs(x - y) / abs(y) for x, y in zip(a["losses"][:n], b["losses"][:n])]
    return {"iterations": n, "first_iteration_relative_difference": differences[0],
            "tolerance": LOSS_AGREEMENT[precision], "agree": differences[0] <= LOSS_AGREEMENT[precision],
            "later_max_relative_difference": max(differences[1:], default=None), "relative_differences": differences}


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


def summary(work: Path) -> dict:
    """Everything the stages left in ``work``, as one JSON-able dict (``ok``: the check passed)."""
    stages = _jsonl(work / "stages.jsonl")
    meta = _json(work / "meta.json") or {}
    runs = {d.name: run_figures(d) for d in sorted(work.iterdir()) if d.is_dir() and (d / "run.json").exists()}
    precision = meta.get("precision", "bf16")
    result = {
        "meta": meta, "stages": stages,
        "total_seconds": sum(s.get("seconds") or 0 for s in stages),
        "env": _json(work / "env.json"), "tests": test_counts(work / "tests.xml"), "runs": runs,
        "loss_agreement_csrc_vs_torch": loss_agreement(runs.get("mfu_gpt_csrc"), runs.get("mfu_gpt_torch"), precision),
        "kernels": kernel_figures(work / "kernels.json"), "kernels_compile": kernel_figures(work / "kernels_compile.json"),
        "fp8_vs_bf16": fp8_speedup(runs.get("mfu_gpt_fp8"), runs.get("mfu_gpt_csrc")),
    }
    agreement = result["loss_agreement_csrc_vs_torch"]
    result["ok"] = bool(stages) and all(s.get("status") in ("ok", "skipped", "partial") for s in stages) and (
        agreement is None or agreement["agree"])
    return result


def publish(work: Path, out: Path) -> dict:
    """Rebuild OUT's two result files from ``work``: ``summary.json`` and ``gpu_check.tgz`` (the work
    directory's files, smallest first up to ``ARCHIVE_MAX_BYTES``; what did not fit is listed in the
    summary), each written under a temporary name in OUT and moved into place."""
    result = summary(work)
    files = sorted((p for p in work.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    kept, total = [], 0
    for path in files:
        total += path.stat().st_size
        if total > ARCHIVE_MAX_BYTES:
            break
        kept.append(path)
    result["archive"] = {"name": ARCHIVE, "files": len(kept),
                         "left_out": [str(p.relative_to(work)) for p in files[len(kept):]]}
    tmp = out / f".{ARCHIVE}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in kept:
            tar.add(path, arcname=str(Path("gpu_check") / path.relative_to(work)))
    os.replace(tmp, out / ARCHIVE)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "summary.json")
    return result


def print_summary(result: dict) -> None:
    for s in result["stages"]:
        extra = f" ({s['reason']})" if s.get("reason") else ""
        print(f"  {s['stage']:<16} {s['status']:<8} {s.get('seconds') or 0:6.1f} s{extra}")
    if result["tests"]:
        t = result["tests"]
        print(f"  tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
    for name, r in result["runs"].items():
        if r:
            mfu = f", MFU {r['mfu']:.1%} (non-causal count {r['mfu_noncausal']:.1%})" if r.get("mfu") else ""
            print(f"  {name}: micro batch {r['micro_batch']}, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tflops_per_device']:.3g} TFLOP/s{mfu}, peak {r['peak_memory_gb']:.1f} GB; "
                  f"kernel backend {r['kernel_backend']}")
    agreement = result["loss_agreement_csrc_vs_torch"]
    if agreement:
        later = agreement["later_max_relative_difference"]
        print(f"  csrc vs torch loss at iteration 1: relative difference "
              f"{agreement['first_iteration_relative_difference']:.2e} (tolerance {agreement['tolerance']:.0e}: "
              f"{'agree' if agreement['agree'] else 'DISAGREE'}); iterations 2-{agreement['iterations']}: "
              f"at most {later:.2e} (not gated)" if later is not None else "")
    if result.get("fp8_vs_bf16"):
        print(f"  FP8 vs {result['meta'].get('precision', 'bf16')} (gpt): {result['fp8_vs_bf16']:.2f}× the tokens/s")
    print(f"  total {result['total_seconds']:.0f} s; {'OK' if result['ok'] else 'NOT OK'}")


def record(work: Path, args: argparse.Namespace) -> dict:
    """One stage's record (a JSON line in WORK/stages.jsonl); a failed stage's reason is the last
    line of its log, whatever characters it holds."""
    reason = args.reason
    if not reason and args.status == "failed":
        lines = [ln for ln in (work / f"{args.stage}.log").read_text(errors="replace").splitlines() if ln.strip()] \
            if (work / f"{args.stage}.log").exists() else []
        reason = f"exit {args.rc}: {lines[-1].strip()[:300] if lines else 'no output'}"
    elif not reason and args.status in ("timeout", "partial"):
        reason = f"ran past {args.timeout} s"
    entry = {"stage": args.stage, "status": args.status, "rc": None if args.rc == "null" else int(args.rc),
             "seconds": float(args.seconds), "timeout_s": float(args.timeout), "best_effort": args.best_effort == "1",
             "reason": reason}
    with open(work / "stages.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start")
    p_start.add_argument("work", type=Path)
    p_start.add_argument("out", type=Path)
    p_start.add_argument("--dry-run", default="0")
    p_start.add_argument("--budget", type=int, required=True)
    p_start.add_argument("--limits", default="", help="the stage limits, 'stage=seconds ...'")
    p_record = sub.add_parser("record")
    p_record.add_argument("work", type=Path)
    p_record.add_argument("out", type=Path)
    for name in ("stage", "status", "rc", "seconds", "timeout", "best-effort", "reason"):
        p_record.add_argument(f"--{name}", default="")
    p_wheels = sub.add_parser("wheels")
    p_wheels.add_argument("folder", type=Path)
    p_wheels.add_argument("pins", type=Path)
    sub.add_parser("toolchain")
    p_env = sub.add_parser("env")
    p_env.add_argument("path", type=Path)
    p_train = sub.add_parser("train")
    p_train.add_argument("work", type=Path)
    p_train.add_argument("name")
    p_train.add_argument("--micro-batch", type=int)
    p_train.add_argument("--micro-batch-of", help="use the micro batch of this earlier run (WORK/NAME/run.json)")
    p_train.add_argument("--memory-fraction", type=float, default=0.8)
    p_summary = sub.add_parser("summary")
    p_summary.add_argument("work", type=Path)
    p_summary.add_argument("out", type=Path)
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # the trainer's Hydra overrides
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "start":
        dry = args.dry_run == "1"
        limits = dict(item.split("=") for item in args.limits.split())
        (args.work / "meta.json").write_text(json.dumps({
            "dry_run": dry, "budget_s": args.budget, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "precision": "fp32" if dry else "bf16", "work": str(args.work),
            "stage_limits_s": {k: int(v) for k, v in sorted(limits.items())}}, indent=1))
        publish(args.work, args.out)
        return 0
    if args.command == "record":
        record(args.work, args)
        publish(args.work, args.out)
        return 0
    if args.command == "wheels":
        problem = check_wheels(args.folder, args.pins)
        if problem:
            print(problem, file=sys.stderr)
        return 2 if problem else 0
    if args.command == "toolchain":
        print(toolchain())
        return 0
    if args.command == "env":
        env = environment()
        args.path.write_text(json.dumps(env, indent=1))
        print(json.dumps(env, indent=1))
        return 0
    if args.command == "train":
        micro_batch = args.micro_batch
        if args.micro_batch_of:
            micro_batch = (_json(args.work / args.micro_batch_of / "run.json") or {}).get("micro_batch") or micro_batch
        return train(args.work, args.name, overrides, micro_batch, args.memory_fraction)
    print_summary(publish(args.work, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
