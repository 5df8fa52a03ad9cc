"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU with tiny shapes (deps,
environment, build, two training runs, the CUDA test file, an FP8 training run, the kernel benchmark, torch.compile), so
the script cannot rot between the rare runs on a GPU, and its OUT obeys what the GPU machine hands
back. The compile stage (opt-in) is given a 2 s timeout: a best-effort stage out of time is
`partial` and the check still passes. Also the Python side's decisions, one by one."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ["deps", "env", "build", "mfu_gpt_csrc", "mfu_gpt_torch", "tests", "mfu_gpt_fp8", "kernels", "compile"]
# What the GPU machine's device tool hands back of OUT (its README): at most 8 files, each under
# 16 MiB, at most 2 folders down, names of letters, digits, '.', '_', '-'.
MAX_FILES, MAX_BYTES, MAX_DEPTH, NAME = 8, 16 * 2**20, 2, re.compile(r"[A-Za-z0-9._-]+")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _module("gpu_check")


def assert_returnable(out: Path) -> None:
    """``out`` would come back whole from the GPU machine."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    for path in out.rglob("*"):
        relative = path.relative_to(out)
        assert all(NAME.fullmatch(part) for part in relative.parts), relative
        assert len(relative.parts) - 1 <= MAX_DEPTH, relative
        assert not path.is_symlink(), relative
        if path.is_file():
            assert path.stat().st_size < MAX_BYTES, (relative, path.stat().st_size)


def test_dry_run_runs_every_stage_and_its_out_comes_back(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_COMPILE": "2", "GPU_CHECK_EXTRA": "compile",
           "GPU_CHECK_DEPS_DIR": str(tmp_path / "deps"), "GPU_CHECK_WORK": str(work)}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert_returnable(out)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check.tgz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES, done.stdout
    logs = {name: (work / f"{name}.log").read_text()[-3000:] for name in STAGES if (work / f"{name}.log").exists()}
    assert stages["compile"]["status"] == "partial" and stages["compile"]["timeout_s"] == 2
    for name in STAGES[1:-1]:
        assert stages[name]["status"] == "ok", (name, stages[name], logs.get(name))
    assert done.returncode == 0 and summary["ok"], done.stdout[-3000:]  # a best-effort stage out of time passes
    assert "== summary" in (out / "gpu_check.log").read_text()

    with tarfile.open(out / "gpu_check.tgz") as tar:
        archived = set(tar.getnames())
    assert {f"gpu_check/{n}.log" for n in STAGES[1:]} | {"gpu_check/stages.jsonl", "gpu_check/env.json",
                                                         "gpu_check/mfu_gpt_csrc/metrics.jsonl"} <= archived
    assert summary["archive"]["left_out"] == []
    assert summary["meta"]["stage_limits_s"]["build"] == 600 and summary["meta"]["work"] == str(work)
    assert summary["env"]["torch"] and summary["env"]["cuda_available"] is False
    assert "torch_cuda_home" in summary["env"] and "nvcc_on_path" in summary["env"]
    assert summary["tests"]["tests"] > 100 and summary["tests"]["failures"] == summary["tests"]["errors"] == 0
    for name in ("mfu_gpt_csrc", "mfu_gpt_torch", "mfu_gpt_fp8"):
        run = summary["runs"][name]
        assert run["iterations"] == 12 and run["micro_batch"] == 2 and run["tokens_per_s"] > 0
        assert run["tflops_per_device_noncausal"] > run["tflops_per_device"] > 0
    assert summary["runs"]["mfu_gpt_csrc"]["kernel_backend"].startswith("csrc (CPU kernels")
    assert summary["runs"]["mfu_gpt_torch"]["kernel_backend"] == "torch"
    assert summary["fp8_vs_bf16"] > 0
    agreement = summary["loss_agreement_csrc_vs_torch"]
    assert agreement["iterations"] == 12 and agreement["agree"], agreement
    backends = {(r["case"], r["backend"]) for r in summary["kernels"]["rows"] if r["seconds"]}
    assert ("tiny/swiglu", "torch") in backends and ("tiny/swiglu", "csrc") in backends
    assert summary["kernels"]["copy_bytes_per_s"] > 0


def test_stage_records_survive_any_reason_text_and_bad_lines(tmp_path):
    """A failing stage's last log line with a tab, quotes and a backslash: the record is valid JSON
    (written by json.dumps) and the summary keeps every stage; a damaged line is skipped, not the file."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "env.log").write_text('Traceback ...\nRuntimeError: "bad"\tvalue \\ here\n')
    args = dict(stage="env", status="failed", rc="1", seconds="1.5", timeout="20", best_effort="0", reason="")
    gpu_check.record(work, Namespace(**args))
    with open(work / "stages.jsonl", "a") as f:
        f.write('{"stage": "build", "status": "ok", "reason": "a\ttab"}\n{"truncated\n')
    gpu_check.record(work, Namespace(**{**args, "stage": "tests", "status": "partial", "rc": "124", "best_effort": "1"}))
    result = gpu_check.publish(work, out)
    assert [s["stage"] for s in result["stages"]] == ["env", "tests"]
    assert result["stages"][0]["reason"] == 'exit 1: RuntimeError: "bad"\tvalue \\ here'
    assert result["stages"][1]["reason"] == "ran past 20 s" and not result["ok"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "summary.json"]  # temporaries moved


def test_a_csrc_run_that_fell_back_to_torch_fails():
    asked = ["model=gpt_1p5b", "model.kernel_backend=csrc"]
    fell_back = gpu_check.csrc_fell_back
    assert fell_back(asked, "csrc (CUDA kernels for sm 9.0)", cuda=True) is None
    assert fell_back(asked, "csrc (CPU kernels only: torch is a CPU build)", cuda=False) is None
    assert "the trainer ran torch" in fell_back(asked, "torch", cuda=True)
    assert "GPU ran torch ops" in fell_back(asked, "csrc (CPU kernels only: no CUDA toolkit found)", cuda=True)
    assert "GPU ran torch ops" in fell_back(
        asked, "csrc (CUDA kernels for sm 8.0;9.0, not covering this GPU (sm 10.0): torch ops on CUDA)", cuda=True)
    assert "unknown backend" in fell_back(asked, None, cuda=True)
    assert fell_back(["model.kernel_backend=torch"], "torch", cuda=True) is None
    assert gpu_check.kernel_backend("x\nkernel backend: csrc (CUDA kernels for sm 9.0)\ny") == "csrc (CUDA kernels for sm 9.0)"


def test_toolchain_line_without_a_gpu():
    """What the script reads before the build: ``ARCH CUDA_HOME``, ``-`` for what is not there."""
    from megatron_lite.ops import csrc

    arch, home = gpu_check.toolchain().split()
    assert arch == "-" and home == (csrc.find_cuda_home() or "-")


def test_loss_agreement_is_gated_on_iteration_1_only():
    run = lambda losses: {"losses": losses}  # noqa: E731
    agreement = gpu_check.loss_agreement(run([8.0, 7.0, 6.0]), run([8.0 * (1 + 1e-3), 7.5, 6.6]), "bf16")
    assert agreement["agree"] and agreement["first_iteration_relative_difference"] == pytest.approx(1e-3, rel=1e-2)
    assert agreement["later_max_relative_difference"] == pytest.approx(0.6 / 6.6)
    assert not gpu_check.loss_agreement(run([8.0, 7.0]), run([8.4, 7.0]), "bf16")["agree"]


def test_the_wheels_folder_must_match_the_one_pins_file(tmp_path):
    pins = REPO / "benchmarks" / "gpu_check_wheels.txt"
    names = {"hydra-core==1.3.2": "hydra_core-1.3.2-py3-none-any.whl",
             "omegaconf==2.3.0": "omegaconf-2.3.0-py3-none-any.whl",
             "antlr4-python3-runtime==4.9.3": "antlr4_python3_runtime-4.9.3-py3-none-any.whl"}
    assert sorted(ln for ln in pins.read_text().splitlines() if ln and not ln.startswith("#")) == sorted(names)
    for wheel in names.values():
        (tmp_path / wheel).touch()
    assert gpu_check.check_wheels(tmp_path, pins) is None
    (tmp_path / "omegaconf-2.1.0-py3-none-any.whl").touch()
    assert "2 versions of omegaconf (2.1.0, 2.3.0)" in gpu_check.check_wheels(tmp_path, pins)
    (tmp_path / "omegaconf-2.3.0-py3-none-any.whl").unlink()
    assert "omegaconf==2.3.0 is pinned" in gpu_check.check_wheels(tmp_path, pins)
    readme = (REPO / "README.md").read_text()
    assert "pip wheel --no-deps -w .whl -r benchmarks/gpu_check_wheels.txt" in readme


def test_kernel_benchmark_shapes_are_the_models():
    """benchmarks/kernels.py hard-codes the model shapes (it runs where hydra may be missing): they
    must be the configs' own."""
    from omegaconf import OmegaConf

    bench = _module("kernels")
    for name in ("gpt_1p5b", "llama_1b"):
        cfg = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
        shapes = bench.MODELS[name]
        assert (shapes["hidden"], shapes["heads"], shapes["ffn"], shapes["seq"]) == (
            cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.seq_length)
        assert shapes["head_dim"] == cfg.hidden_size // cfg.num_attention_heads
        assert shapes["norm"] == {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}[cfg.normalization]
        assert shapes["act"] == {"gelu": "bias_gelu", "swiglu": "swiglu"}[cfg.activation]
        assert shapes["rope"] == (cfg.position_embedding == "rope")
