"""The shell scripts' decisions, run with stand-ins for the tools they call (nothing is installed or
launched): scripts/setup_env.sh (the CPU index first on a machine without a GPU, pip's configured
index when that cannot be reached or a GPU is present, one line per step, the time taken, a failing
step's output shown with the log's path) and scripts/pretrain_gpt.sbatch (CPUs from the allocation,
Megatron's NCCL/CUDA settings, a pyxis container, requeue at the time limit)."""

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


# scripts/pretrain_gpt.sbatch with stand-ins for srun, scontrol and scancel. The training step's srun
# records its arguments and environment and runs until scancel "signals the ranks" (then exits 0).
FAKE_SLURM = {
    "srun": r"""#!/bin/bash
echo "srun $*" >>"$FAKE_LOG"
if [[ "$*" == *"megatron_lite.launch --nnodes"* ]]; then
  env | grep -E '^(OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|NCCL_IB_TIMEOUT|PYTHONPATH)=' | sort >>"$FAKE_LOG"
  echo $$ >"$FAKE_DIR/training.pid"
  trap 'exit 0' TERM
  if [ -n "${FAKE_WAIT:-}" ]; then for _ in $(seq 300); do sleep 0.1; done; fi
fi
""",
    "scontrol": "#!/bin/bash\n[ \"$1\" = show ] && echo node1 && echo node2 || echo \"scontrol $*\" >>\"$FAKE_LOG\"\n",
    "scancel": "#!/bin/bash\necho \"scancel $*\" >>\"$FAKE_LOG\"\nkill -TERM \"$(cat \"$FAKE_DIR/training.pid\")\"\n",
    "python": "#!/bin/bash\necho \"python $*\" >>\"$FAKE_LOG\"\n",
}


def _sbatch(tmp_path: Path, time_limit: bool = False, **env: str) -> tuple[int, list[str]]:
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_DIR": str(tmp_path),
                   "PYTHON": str(bin_dir / "python"), "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
                   "SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "64", "SLURM_GPUS_ON_NODE": "8",
                   "SLURM_SUBMIT_DIR": str(REPO), **env}
    environment.update({"FAKE_WAIT": "1"} if time_limit else {})
    job = subprocess.Popen(["bash", str(REPO / "scripts" / "pretrain_gpt.sbatch"), "model=llama3_8b"],
                           env=environment, stderr=subprocess.PIPE, text=True)
    if time_limit:  # SLURM's B:USR1@300, once the training step runs
        while not (tmp_path / "training.pid").exists() and job.poll() is None:
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=60)
    assert log.exists(), stderr
    return job.returncode, log.read_text().splitlines()


def test_sbatch_takes_cpus_from_the_allocation_and_sets_megatrons_env(tmp_path):
    rc, log = _sbatch(tmp_path / "plain")
    assert rc == 0
    launch = ("--nnodes 2 --nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint node1:29500 "
              "--rdzv-id 77 -m megatron_lite.train model=llama3_8b")
    assert log[0] == f"python -m megatron_lite.launch --check-only {launch}"  # checked before any step
    assert log[1].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=64 bash -c")
    assert log[1].endswith(f"python -m megatron_lite.launch {launch}")
    assert log[2:] == ["CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_IB_TIMEOUT=19", "OMP_NUM_THREADS=8"]  # 64 CPUs / 8
    rc, log = _sbatch(tmp_path / "container", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3")
    container = (f"--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-name=megatron_lite_77 "
                 f"--container-mounts={REPO}:{REPO} --container-workdir={REPO}")
    assert rc == 0 and container in log[0] and log[0].endswith(f"python -m megatron_lite.launch --check-only {launch}")
    assert container in log[1] and f"PYTHONPATH={REPO}" in log


def test_sbatch_requeues_at_the_time_limit(tmp_path):
    """USR1 to the batch shell: forwarded to the steps' processes (the ranks checkpoint and exit 0),
    then the job is requeued."""
    rc, log = _sbatch(tmp_path, time_limit=True)
    assert rc == 0
    assert log[-2:] == ["scancel --signal=USR1 77", "scontrol requeue 77"]
