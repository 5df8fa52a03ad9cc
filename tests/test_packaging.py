"""``pip install .`` (not editable) gives a package that works without the source tree: configs/ and
csrc/ inside it, the console commands, a config check and a one-iteration run from another directory.

The install reuses this environment's torch and dependencies (``--no-deps --target``, no build
isolation: nothing is downloaded); the commands run with only the target directory on PYTHONPATH.
"""

import os
import subprocess
import sys
from pathlib import Path

from test_training import REPO

COMMANDS = ("train", "config", "preprocess", "plan", "generate", "hf")


def test_non_editable_install_runs_outside_the_source_tree(tmp_path):
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)], check=True, capture_output=True, timeout=300,
    )
    package = target / "megatron_lite"
    assert (package / "configs" / "config.yaml").is_file() and (package / "configs" / "model" / "llama_1b.yaml").is_file()
    assert (package / "csrc" / "bindings.cpp").is_file() and list((package / "csrc" / "cuda").glob("*.cu"))
    assert (package / "data" / "corpus" / "kjv_bpe4096.model").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import megatron_lite.config as c, megatron_lite.extensions as e; "
                "print(c.__file__, c.CONFIG_DIR, e.CSRC_DIR, sep='\\n')")
    assert where.stdout.split() == [str(package / "config.py"), str(package / "configs"), str(package / "csrc")]
    for name in COMMANDS:
        assert (target / "bin" / f"megatron-lite-{name}").is_file(), name
    bin_ = lambda name: str(target / "bin" / f"megatron-lite-{name}")  # noqa: E731
    help_ = run(bin_("train"), "--help")
    assert help_.returncode == 0 and "gpt_tiny, llama3_70b, llama3_8b, llama_1b" in help_.stdout  # the model presets, from the package
    check = run(bin_("config"), "--world-size", "8", "parallel=tp2_pp2_dp2")
    assert check.returncode == 0 and check.stdout.startswith("ok: world 8 = TP 2 ×"), check.stderr
    assert run(bin_("hf"), "--help").returncode == 0 and run(bin_("generate"), "--help").returncode == 0
    trained = run(bin_("train"), "model.num_layers=1", "model.kernel_backend=torch", "training.train_iters=1", "training.eval_iters=0",
                  "training.micro_batch_size=2", "training.global_batch_size=2", f"logging.dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "iteration      1/1" in trained.stdout and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not Path(work, "outputs").exists()  # Hydra writes nothing into the working directory
