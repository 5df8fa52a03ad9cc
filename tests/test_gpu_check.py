"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU with tiny shapes (deps,
environment, build, the CUDA test file, four training runs (one in FP8), the kernel benchmark, torch.compile), so
the script cannot rot between the rare runs on a GPU. The compile stage is given a 2 s timeout: it is
killed, recorded as a timeout, and the run still ends with its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["deps", "env", "build", "tests", "mfu_gpt_csrc", "mfu_gpt_torch", "mfu_gpt_fp8", "mfu_llama_csrc", "kernels",
          "compile"]


def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_COMPILE": "2",
           "GPU_CHECK_DEPS_DIR": str(tmp_path / "deps")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES, done.stdout
    logs = {name: (out / f"{name}.log").read_text()[-3000:] for name in STAGES if (out / f"{name}.log").exists()}
    assert stages["compile"]["status"] == "timeout" and stages["compile"]["timeout_s"] == 2
    for name in STAGES[1:-1]:
        assert stages[name]["status"] == "ok", (name, stages[name], logs.get(name))
    assert done.returncode == 1 and not summary["ok"]  # the forced timeout makes the check fail

    assert summary["env"]["torch"] and summary["env"]["cuda_available"] is False
    assert summary["tests"]["tests"] > 100 and summary["tests"]["failures"] == summary["tests"]["errors"] == 0
    for name in ("mfu_gpt_csrc", "mfu_gpt_torch", "mfu_gpt_fp8", "mfu_llama_csrc"):
        run = summary["runs"][name]
        assert run["iterations"] == 12 and run["micro_batch"] == 2 and run["tokens_per_s"] > 0
        assert run["tflops_per_device_noncausal"] > run["tflops_per_device"] > 0
    assert summary["fp8_vs_bf16"] > 0
    agreement = summary["loss_agreement_csrc_vs_torch"]
    assert agreement["iterations"] == 12 and agreement["agree"], agreement
    backends = {(r["case"], r["backend"]) for r in summary["kernels"]["rows"] if r["seconds"]}
    assert ("tiny/swiglu", "torch") in backends and ("tiny/swiglu", "csrc") in backends
    assert summary["kernels"]["copy_bytes_per_s"] > 0


def test_kernel_benchmark_shapes_are_the_models():
    """benchmarks/kernels.py hard-codes the model shapes (it runs where hydra may be missing): they
    must be the configs' own."""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("kernels_bench", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name in ("gpt_1p5b", "llama_1b"):
        cfg = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
        shapes = bench.MODELS[name]
        assert (shapes["hidden"], shapes["heads"], shapes["ffn"], shapes["seq"]) == (
            cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.seq_length)
        assert shapes["head_dim"] == cfg.hidden_size // cfg.num_attention_heads
        assert shapes["norm"] == {"layernorm": "layer_norm", "rmsnorm": "rms_norm"}[cfg.normalization]
        assert shapes["act"] == {"gelu": "bias_gelu", "swiglu": "swiglu"}[cfg.activation]
        assert shapes["rope"] == (cfg.position_embedding == "rope")
