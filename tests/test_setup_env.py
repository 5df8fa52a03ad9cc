"""scripts/setup_env.sh's decisions, on a copy of the script with a stand-in python3 that records
every pip command (nothing is installed): the CPU index first on a machine without a GPU, pip's
configured index when that cannot be reached or a GPU is present, one line per step, the time taken,
and a failing step's output shown with the log's path."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# A python3 that cannot import megatron_lite; `-m venv` copies itself; pip commands are appended to
# $FAKE_LOG (and fail when they name $FAKE_FAIL); the index check succeeds when $FAKE_REACHABLE=1.
FAKE_PYTHON = r"""#!/bin/bash
case "$1" in
  --version) echo "Python 3.11.0" ;;
  -m) case "$2" in
        venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
        pip) echo "pip ${*:3}" >>"$FAKE_LOG"; echo "pip's own noise"
             if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then echo "ERROR: no matching wheel"; exit 1; fi ;;
        megatron_lite.ops) echo "built" ;;
      esac ;;
  -c) case "$2" in
        *urllib*) [ "${FAKE_REACHABLE:-0}" = 1 ] ;;
        *__version__*) echo "2.13.0+cpu" ;;
        *) exit 1 ;;
      esac ;;
esac
"""


def _setup(tmp_path: Path, gpu: bool = False, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup_env.sh", repo / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/bash\nexit {0 if gpu else 1}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "pip.log"
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log), **env}
    done = subprocess.run(["bash", "-c", f"source {repo}/scripts/setup_env.sh && echo \"PYTHON=$PYTHON\""],
                          env=environment, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


def test_cpu_machine_takes_the_cpu_index_when_reachable(tmp_path):
    done, pip = _setup(tmp_path, FAKE_REACHABLE="1")
    assert done.returncode == 0, done.stderr
    assert pip[1] == f"pip install torch==2.13.0 --index-url {CPU_INDEX}"
    assert pip[2].startswith("pip install -e ") and pip[2].endswith("[dev]")
    lines = done.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["setup"] * len(lines)  # one line per step, no pip noise
    assert f"setup: torch 2.13.0, CPU wheel from {CPU_INDEX}" in lines
    assert lines[-1].startswith("setup: done in ") and "(torch 2.13.0+cpu;" in lines[-1]
    assert done.stdout.strip() == f"PYTHON={tmp_path}/repo/.venv/bin/python"


def test_unreachable_cpu_index_or_a_gpu_falls_back_to_the_configured_index(tmp_path):
    done, pip = _setup(tmp_path / "cpu")
    assert done.returncode == 0, done.stderr
    assert pip[1] == "pip install torch==2.13.0"  # pip's own configuration decides (a local mirror here)
    assert f"setup: {CPU_INDEX} cannot be reached; torch from pip's configured index" in done.stderr
    done, pip = _setup(tmp_path / "gpu", gpu=True, FAKE_REACHABLE="1")
    assert pip[1] == "pip install torch==2.13.0" and "cannot be reached" not in done.stderr


def test_a_failing_step_shows_its_output_and_the_log(tmp_path):
    done, _ = _setup(tmp_path, FAKE_FAIL="-e ")
    assert done.returncode == 1
    assert "ERROR: no matching wheel" in done.stderr
    assert f"setup: failed: megatron_lite[dev] (editable) and its dependencies (full output: {tmp_path}/repo/.venv/setup.log)" in done.stderr


def test_an_environment_with_the_package_creates_nothing(tmp_path):
    """PYTHON set (or importable): no .venv, no pip."""
    done, pip = _setup(tmp_path, PYTHON="/usr/bin/python3")
    assert done.returncode == 0 and pip == [] and not (tmp_path / "repo" / ".venv").exists()
