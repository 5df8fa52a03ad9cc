"""Building the csrc extensions safely (megatron_lite/extensions.py): the cache key covers the
environment, concurrent first uses build once, and no lock file of a dead build can block a start.

The locking and keying are exercised on a tiny C extension (a plain CPython module: it compiles in a
second or two), the stale-lock start-up on the real trainer with the real kernel extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_lite import extensions

REPO = Path(__file__).resolve().parent.parent
TINY_SOURCE = textwrap.dedent("""\
    #include <Python.h>
    #define MLITE_CAT(a, b) a##b
    #define MLITE_INIT(name) MLITE_CAT(PyInit_, name)
    #define MLITE_STR2(x) #x
    #define MLITE_STR(x) MLITE_STR2(x)
    static PyObject* answer(PyObject* self, PyObject* args) { return PyLong_FromLong(42); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "42"}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MLITE_STR(TORCH_EXTENSION_NAME), NULL, -1, methods};
    PyMODINIT_FUNC MLITE_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
    """)
BUILDING = "megatron_lite: building"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """(source path, cache dir) of a tiny extension with an empty cache."""
    source = tmp_path / "tiny.c"
    source.write_text(TINY_SOURCE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEGATRON_LITE_CACHE", str(cache))
    return source, cache


def _env(cache: Path) -> dict:
    return {**os.environ, "MEGATRON_LITE_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def _fresh_load(name: str, source: Path):
    extensions._loaded.pop(name, None)
    return extensions.load_extension(name, [source])


RANK_SCRIPT = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    import torch  # noqa: F401  (as in the trainer: torch is imported before the extension loads)
    from megatron_lite.extensions import load_extension
    barrier, me, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    (barrier / f"ready.{me}").touch()
    while len(list(barrier.glob("ready.*"))) < n:  # all ranks call load_extension at the same moment
        time.sleep(0.01)
    module = load_extension("mlite_tiny_concurrent", [sys.argv[4]])
    print("answer", module.answer())
    """)


def test_concurrent_first_uses_build_once(tiny, tmp_path):
    """4 ranks calling the loader at the same moment on an empty cache: one builds, the others wait
    for its lock and import its library; all four run the extension."""
    source, cache = tiny
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(barrier), str(i), "4", str(source)],
                              env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and "answer 42" in out, err
    builds = sum(err.count(BUILDING) for _, err in outputs)
    assert builds == 1, [err for _, err in outputs]
    assert len(list((cache / "extensions").iterdir())) == 1


def test_stale_lock_files_are_removed_and_the_build_goes_on(tiny):
    """A build killed midway leaves torch's FileBaton ``lock`` (and our ``build.lock``, unlocked): the
    next process builds at once, saying it removed the stale lock, instead of waiting forever."""
    source, _ = tiny
    description = extensions.build_description("mlite_tiny_stale", [source])
    directory = extensions.build_directory(description)
    directory.mkdir(parents=True)
    (directory / extensions.TORCH_BATON).touch()
    (directory / extensions.LOCK_FILE).write_text("node17 pid 4242")
    script = f"from megatron_lite.extensions import load_extension; print(load_extension('mlite_tiny_stale', [{str(source)!r}]).answer())"
    done = subprocess.run([sys.executable, "-c", script], env=_env(source.parent / "cache"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    assert f"removed {directory / 'lock'}, a lock file left by an interrupted build" in done.stderr
    assert not (directory / extensions.TORCH_BATON).exists()


def test_build_from_another_environment_is_rebuilt_not_loaded(tiny, monkeypatch, capsys):
    """A cache directory written under another torch version or Python is never imported: the key
    differs, and a directory whose recorded environment differs from ours is rebuilt."""
    source, cache = tiny
    real = extensions.environment()
    monkeypatch.setattr(extensions, "environment", lambda: {**real, "torch": "2.0.0+other", "python": "cpython-39"})
    assert _fresh_load("mlite_tiny_env", source).answer() == 42
    other_dirs = set((cache / "extensions").iterdir())
    monkeypatch.setattr(extensions, "environment", lambda: real)
    ours = extensions.build_directory(extensions.build_description("mlite_tiny_env", [source]))
    assert ours not in other_dirs
    module = _fresh_load("mlite_tiny_env", source)
    assert module.answer() == 42 and Path(module.__file__).parent == ours
    assert capsys.readouterr().err.count(BUILDING) == 2

    # Same directory, but its record says another torch built it (e.g. an older loader's build): rebuilt.
    manifest = ours / extensions.MANIFEST
    manifest.write_text(manifest.read_text().replace(real["torch"], "1.13.0"))
    assert _fresh_load("mlite_tiny_env", source).answer() == 42
    assert capsys.readouterr().err.count(BUILDING) == 1
    assert _fresh_load("mlite_tiny_env", source).answer() == 42  # and now complete: imported as is
    assert BUILDING not in capsys.readouterr().err


def test_key_covers_what_the_binary_depends_on(tiny):
    """Torch version, CUDA version, Python ABI, arch list and CUDA-in each change the directory."""
    source, _ = tiny
    base = extensions.build_description("k", [source], cuda_cflags=["-O3"], cuda_arch_list="8.0;9.0")
    variants = [
        extensions.build_description("k", [source]),  # no CUDA kernels
        extensions.build_description("k", [source], cuda_cflags=["-O3"], cuda_arch_list="9.0"),
        {**base, "environment": {**base["environment"], "torch": "9.9"}},
        {**base, "environment": {**base["environment"], "torch_cuda": "11.8"}},
        {**base, "environment": {**base["environment"], "python": "cpython-39"}},
    ]
    directories = {extensions.build_directory(d) for d in [base, *variants]}
    assert len(directories) == 1 + len(variants)


def test_a_waiter_names_the_holder_and_gives_up_after_the_timeout(tmp_path, capsys):
    """A live holder: the waiter prints one line naming it and the directory, and after the timeout
    raises (load_extension turns that into its fallback warning) instead of waiting forever."""
    import fcntl

    (tmp_path / extensions.LOCK_FILE).write_text("node3 pid 77")
    holder = os.open(tmp_path / extensions.LOCK_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(TimeoutError, match="python -m megatron_lite.ops"):
            with extensions.build_lock(tmp_path, "the test extension", timeout_s=extensions.WAIT_NOTICE_S + 0.5):
                pass
    finally:
        os.close(holder)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "waiting for" in ln]
    assert len(lines) == 1 and "node3 pid 77" in lines[0] and str(tmp_path) in lines[0]
    with extensions.build_lock(tmp_path, "the test extension", timeout_s=1.0):  # released: taken at once
        pass


def test_trainer_starts_with_a_stale_lock_in_the_kernel_cache(tmp_path):
    """The failure of issue 16: a 0-byte ``lock`` left in the kernel extension's cache directory by a
    start-up killed mid-build. The trainer removes it, finishes the build (ninja finds the objects up
    to date) and trains with the csrc backend; without the stale-lock handling torch's FileBaton would
    wait for that lock forever."""
    import shutil

    from megatron_lite.ops import csrc

    if csrc.extension() is None:
        pytest.skip("the csrc extension does not build here")
    cache = tmp_path / "cache"
    built = Path(csrc.extension().__file__).parent
    directory = Path(shutil.copytree(built, cache / "extensions" / built.name))  # keeps the mtimes: no recompile
    (directory / extensions.MANIFEST).unlink()  # killed before the build finished
    (directory / extensions.TORCH_BATON).touch()
    cmd = [sys.executable, "-m", "megatron_lite.train", "model=gpt_tiny", "model.num_layers=1",
           "model.seq_length=32", "model.kernel_backend=csrc", "training.train_iters=1",
           "training.micro_batch_size=1", "training.global_batch_size=1", "training.eval_iters=0",
           f"logging.dir={tmp_path}/logs", "logging.log_interval=1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"removed {directory / extensions.TORCH_BATON}, a lock file left by an interrupted build" in done.stderr
    assert "kernel backend: csrc" in done.stdout and "iteration" in done.stdout
    assert (directory / extensions.MANIFEST).is_file() and not (directory / extensions.TORCH_BATON).exists()


def test_without_file_locks_torchs_lock_file_is_left_alone(tiny, monkeypatch, capsys):
    """On a file system without ``flock`` this process holds no lock, so torch's ``lock`` in the build
    directory may be another builder's live baton: it must not be deleted (torch's own baton then
    serialises the builds)."""
    import errno

    from torch.utils import cpp_extension

    source, _ = tiny
    description = extensions.build_description("mlite_tiny_nolock", [source])
    directory = extensions.build_directory(description)
    directory.mkdir(parents=True)
    baton = directory / extensions.TORCH_BATON
    baton.touch()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    seen = []

    def build(**kwargs):  # stands in for the compile: records what the build would find, then stops
        seen.append(baton.exists())
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr(extensions.fcntl, "flock", no_flock)
    monkeypatch.setattr(cpp_extension, "load", build)
    with pytest.raises(RuntimeError, match="stop before compiling"):
        extensions._load_or_build(description, [source], (), (), None)
    assert seen == [True] and baton.exists()
    assert "does not support file locks" in capsys.readouterr().err


def test_cuda_kernels_are_planned_from_the_torch_build_and_toolkit(monkeypatch, tmp_path):
    """No GPU needs to be visible (docker build): a CUDA torch and CUDA_HOME/bin/nvcc decide, for
    TORCH_CUDA_ARCH_LIST or 8.0;9.0 (A100, H100/H200)."""
    import torch
    from torch.utils import cpp_extension

    from megatron_lite.ops import csrc

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("MEGATRON_LITE_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert csrc.cuda_plan() == csrc.CudaPlan(False, reason="torch is a CPU build")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert not csrc.cuda_plan().with_cuda and "CUDA_HOME" in csrc.cuda_plan().reason
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    assert csrc.cuda_plan().reason.startswith(f"CUDA_HOME={tmp_path} has bin/nvcc but no include/cuda_runtime_api.h")
    (tmp_path / "include").mkdir()
    (tmp_path / csrc.TOOLKIT_HEADER).touch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert csrc.cuda_plan() == csrc.CudaPlan(True, "8.0;9.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert csrc.cuda_plan().arch_list == "9.0"
    monkeypatch.setenv("MEGATRON_LITE_CUDA", "0")
    assert not csrc.cuda_plan().with_cuda


def test_cuda_home_is_a_toolkit_not_an_nvcc_wrapper(monkeypatch, tmp_path):
    """An nvcc wrapper on PATH (/usr/bin/nvcc) makes torch guess CUDA_HOME=/usr, which has no CUDA
    headers: the plan says so in one line with the toolkit it found; find_cuda_home takes a directory
    with bin/nvcc and the headers (through a symlinked nvcc on PATH too)."""
    import torch
    from torch.utils import cpp_extension

    from megatron_lite.ops import csrc

    usr, toolkit, links = tmp_path / "usr", tmp_path / "cuda-13.0", tmp_path / "links"
    for d in (usr / "bin", toolkit / "bin", toolkit / "include", links):
        d.mkdir(parents=True)
    for f in (usr / "bin" / "nvcc", toolkit / "bin" / "nvcc", toolkit / csrc.TOOLKIT_HEADER):
        f.touch(mode=0o755)
    (links / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    for var in ("CUDA_HOME", "CUDA_PATH", "MEGATRON_LITE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(usr))
    monkeypatch.setenv("PATH", f"{usr / 'bin'}{os.pathsep}/bin")
    assert not csrc.is_cuda_toolkit(usr) and csrc.is_cuda_toolkit(toolkit)
    plan = csrc.cuda_plan()
    assert not plan.with_cuda and "\n" not in plan.reason and "no include/cuda_runtime_api.h" in plan.reason
    monkeypatch.setenv("PATH", f"{links}{os.pathsep}/bin")
    assert csrc.find_cuda_home() == str(toolkit)
    assert csrc.cuda_plan().reason.endswith(f"export CUDA_HOME={toolkit}")
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    monkeypatch.setenv("PATH", f"{usr / 'bin'}{os.pathsep}/bin")
    assert csrc.find_cuda_home() == str(toolkit)


def test_built_kernels_are_checked_against_the_gpu(monkeypatch):
    """A cubin runs on its major version with a minor at least its own, PTX on any later GPU; a GPU
    the build does not cover (Blackwell under 8.0;9.0) takes the reference ops, with one warning."""
    import warnings

    import torch

    from megatron_lite.ops import csrc

    assert csrc.covers("8.0;9.0", (9, 0)) and csrc.covers("8.0;9.0", (8, 6)) and csrc.covers("8.0 9.0", (9, 0))
    assert not csrc.covers("8.0;9.0", (10, 0)) and not csrc.covers("8.0;9.0", (7, 5))
    assert csrc.covers("8.0;9.0;10.0+PTX", (10, 3)) and csrc.covers("9.0+PTX", (12, 0))
    assert not csrc.covers("10.0+PTX", (9, 0))
    monkeypatch.setattr(csrc, "cuda_plan", lambda: csrc.CudaPlan(True, "8.0;9.0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA B200")
    csrc.covers_device.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not csrc.covers_device(0) and not csrc.covers_device(0)
        assert len(caught) == 1 and 'TORCH_CUDA_ARCH_LIST="10.0"' in str(caught[0].message), caught
        assert "NVIDIA B200, sm 10.0" in str(caught[0].message)
    finally:
        csrc.covers_device.cache_clear()


def test_gpu_machine_without_cuda_kernels_warns_once(monkeypatch):
    """A build without CUDA kernels on a machine with a GPU: one warning line naming the fix, not a
    silent fallback to the reference ops; describe() says what the build has."""
    import warnings

    import torch

    import megatron_lite.ops as ops
    from megatron_lite.ops import csrc

    if csrc.extension() is None or csrc.has_cuda_kernels():
        pytest.skip("needs a built extension without CUDA kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_warned", set())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ops.use_backend("csrc")
            ops.use_backend("csrc")
        lines = [str(w.message) for w in caught if "CUDA tensors run the PyTorch reference ops" in str(w.message)]
        assert len(lines) == 1 and "python -m megatron_lite.ops --require-cuda" in lines[0]
        assert ops.describe() == "csrc (CPU kernels only: torch is a CPU build)"
    finally:
        monkeypatch.undo()
        ops.use_backend("torch")
