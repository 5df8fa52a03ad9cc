"""Presets and launch scripts as users take them: every model preset validates and the planner
predicts it; scripts/pretrain_gpt.sh keeps the main job's layout and schedule under extra overrides
and passes MAX_RESTARTS to torchrun; every SLURM example in the docs passes the config check."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.config import load_config, validate
from megatron_lite.plan.__main__ import main as plan

REPO = Path(__file__).resolve().parent.parent
# Each preset on a layout it is meant for: (world size, overrides).
PRESETS = {
    "gpt2_124m": (8, ["parallel.tensor_model_parallel_size=2", "training.global_batch_size=64"]),
    "gpt_1p5b": (16, ["training.global_batch_size=64"]),
    "llama_1b": (16, ["parallel.tensor_model_parallel_size=2", "training.global_batch_size=256"]),
    "llama3_8b": (64, ["parallel.tensor_model_parallel_size=8", "training.global_batch_size=512"]),
    "llama3_70b": (512, ["parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=8",
                         "training.global_batch_size=512", "training.micro_batch_size=1"]),
    "gpt3_175b": (1024, ["parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=16",
                         "training.global_batch_size=1536", "training.micro_batch_size=1"]),
}
VOCABULARIES = {"gpt2_124m": 50257, "gpt_1p5b": 50257, "llama_1b": 128256, "llama3_8b": 128256,
                "llama3_70b": 128256, "gpt3_175b": 50257}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_validates_and_the_planner_takes_it(name, capsys):
    world, overrides = PRESETS[name]
    cfg = load_config([f"model={name}", *overrides])
    assert cfg.model.vocab_size == VOCABULARIES[name]
    validate(cfg, world)
    device = "A100-80G" if name == "gpt3_175b" else "H100-80G"
    assert plan(["--world-size", str(world), "--device", device, f"model={name}", "training.precision=bf16",
                 *overrides]) == 0
    print(capsys.readouterr().out.strip().splitlines()[-1])


def _dry_run(*args: str, **env: str) -> list[str]:
    done = subprocess.run(["bash", str(REPO / "scripts/pretrain_gpt.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_pretrain_script_keeps_the_main_job_layout_under_overrides():
    """Extra overrides change keys of the main job (TP2×PP2×DP2, cpu_demo's 300 iterations), not its
    groups; naming a group replaces that default; MAX_RESTARTS reaches torchrun (0 on CPU by default)."""
    command = _dry_run("logging.dir=runs/x", "optimizer.lr=3e-4")
    assert command[command.index("--max-restarts") + 1] == "0"
    train = command[command.index("megatron_lite.train") + 1:]
    assert train == ["parallel=tp2_pp2_dp2", "training=cpu_demo", "logging.dir=runs/x", "optimizer.lr=3e-4"]
    cfg = load_config(train)
    dims = validate(cfg, 8)
    assert (dims.tp, dims.pp, dims.vpp, dims.dp, cfg.training.train_iters) == (2, 2, 2, 2, 300)
    command = _dry_run("parallel=single", "training.train_iters=5", MAX_RESTARTS="2")
    assert command[command.index("--max-restarts") + 1] == "2"
    assert command[command.index("megatron_lite.train") + 1:] == [
        "training=cpu_demo", "logging.dir=runs/main_job", "parallel=single", "training.train_iters=5"]


def _sbatch_examples() -> list[tuple[int, list[str]]]:
    """(nodes, overrides) of every ``sbatch --nodes=N scripts/pretrain_gpt.sbatch ...`` in the docs
    and in the script's own header (continuation lines joined)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "scripts/pretrain_gpt.sbatch"]:
        text = re.sub(r"\\\n#?\s*", " ", path.read_text())
        for match in re.finditer(r"sbatch --nodes=(\d+) scripts/pretrain_gpt\.sbatch([^\n`]*)", text):
            found.append((int(match.group(1)), shlex.split(match.group(2))))
    return found


def test_every_slurm_example_passes_the_config_check():
    examples = _sbatch_examples()
    assert len(examples) >= 2, examples
    for nodes, overrides in examples:
        done = subprocess.run([sys.executable, "-m", "megatron_lite.config", "--world-size", str(8 * nodes), *overrides],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, (nodes, overrides, done.stderr)
