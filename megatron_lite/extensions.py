"""Build and load the C++/CUDA extensions in ``csrc/``: once per machine and environment, safely from
any number of processes at once, never blocked by a dead builder.

A build lives in ``$MEGATRON_LITE_CACHE/extensions/<name>-<key>/`` (default
``~/.cache/megatron_lite``). The key is a hash of everything the binary depends on: the sources and
headers, the compiler flags, the torch version and build, the CUDA version torch was built with, the
Python ABI, the CUDA architectures and whether CUDA kernels are in (``build_description``). Two
environments that share a home directory (a CPU venv and a GPU container) therefore never load each
other's library, and a directory's ``build.json`` (the full description, written last and atomically)
is checked again before anything in it is imported.

Concurrency: the first process to need a build takes an ``fcntl.flock`` on ``build.lock`` in that
directory and compiles; the others wait for the lock (one line after a few seconds, naming the holder
and the directory) and then import the finished library. The kernel releases the lock when its holder
exits, however it dies, so a killed build never blocks a later run; a waiter gives up after
``$MEGATRON_LITE_BUILD_TIMEOUT`` seconds (default 1800) and falls back like a failed build. Inside
the lock any ``lock`` file of torch's own ``FileBaton`` is stale (left by an interrupted build, of
this or an older version) and is removed with a line, so it cannot make ``cpp_extension`` wait
forever; on a file system without ``flock`` nothing is removed (the baton may be a live builder's). A complete build is imported directly, without the lock, ninja or the baton: a warm start
takes well under a second.

A missing compiler or a failed build never stops training: ``load_extension`` returns None after one
warning and the caller uses its pure-PyTorch path. Extensions are built at first use or ahead of time
(``python -m megatron_lite.ops``, which setup and the Dockerfile call), never at ``pip install`` time:
pip's isolated build environment would install an unpinned (CUDA) torch on a CPU machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import socket
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence

from . import package_dir
from .messages import first_line

CSRC_DIR = package_dir("csrc")
MANIFEST = "build.json"
LOCK_FILE = "build.lock"
TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
WAIT_NOTICE_S = 3.0
POLL_S = 0.2
_loaded: dict[str, Optional[ModuleType]] = {}


def cache_root() -> Path:
    """``$MEGATRON_LITE_CACHE`` or ``~/.cache/megatron_lite``."""
    return Path(os.environ.get("MEGATRON_LITE_CACHE", Path.home() / ".cache" / "megatron_lite"))


def build_timeout_s() -> float:
    """How long a process waits for another one's build: ``$MEGATRON_LITE_BUILD_TIMEOUT`` s (1800)."""
    return float(os.environ.get("MEGATRON_LITE_BUILD_TIMEOUT", "1800"))


def _say(message: str) -> None:
    print(f"megatron_lite: {message}", file=sys.stderr, flush=True)


def environment() -> dict[str, Optional[str]]:
    """What a compiled extension depends on besides its sources: torch (version and build), the CUDA
    version torch was built with, the Python ABI and the machine."""
    import torch

    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "machine": platform.machine(),
    }


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _label(path: Path) -> str:
    """A source's name in the key: relative to csrc/ (so identical checkouts share a build)."""
    try:
        return str(path.relative_to(CSRC_DIR))
    except ValueError:
        return str(path)


def build_description(
    name: str,
    sources: Sequence[Path],
    depends: Sequence[Path] = (),
    cflags: Sequence[str] = (),
    ldflags: Sequence[str] = (),
    cuda_cflags: Optional[Sequence[str]] = None,
    cuda_arch_list: Optional[str] = None,
    extra: Optional[dict] = None,
) -> dict:
    """Everything the binary depends on, as JSON-able data (its hash is the cache key)."""
    return {
        "name": name,
        "sources": {_label(p): _file_digest(p) for p in sources},
        "depends": {_label(p): _file_digest(p) for p in sorted(depends)},
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "with_cuda": cuda_cflags is not None,
        "cuda_cflags": list(cuda_cflags) if cuda_cflags is not None else None,
        "cuda_arch_list": cuda_arch_list if cuda_cflags is not None else None,
        "environment": environment(),
        "extra": extra or {},
    }


def build_directory(description: dict) -> Path:
    """The cache directory of the build that ``description`` describes."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return cache_root() / "extensions" / f"{description['name']}-{digest[:16]}"


def _finished_build(directory: Path, description: dict) -> Optional[tuple[str, Path]]:
    """(module name, library) of the finished build of exactly ``description`` in ``directory``, or
    None. (The module name can differ from the extension's: torch appends ``_v1`` when one process
    builds the same name twice.)"""
    try:
        record = json.loads((directory / MANIFEST).read_text())
        module, library = record["module"], directory / record["library"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (module, library) if record.get("description") == description and library.is_file() else None


def _complete(directory: Path, description: dict) -> bool:
    """Whether ``directory`` holds a finished build of exactly ``description``."""
    return _finished_build(directory, description) is not None


def _import(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def build_lock(directory: Path, what: str, timeout_s: Optional[float] = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``directory/build.lock`` (released by the kernel if this process
    dies). Waits at most ``timeout_s`` (``build_timeout_s()``) for another holder, printing one line
    after a few seconds that names the holder and the directory; TimeoutError after that. On a file
    system without locks, says so in one line and goes on without. Yields whether the lock is held."""
    timeout_s = build_timeout_s() if timeout_s is None else timeout_s
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    locked = False
    try:
        start, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                _say(f"{directory.parent} does not support file locks; building {what} without one")
                break
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise TimeoutError(
                    f"waited {waited:.0f} s for {_holder(path)} to build {what} in {directory}; build it "
                    "ahead of time with `python -m megatron_lite.ops` or raise MEGATRON_LITE_BUILD_TIMEOUT")
            if not noticed and waited >= WAIT_NOTICE_S:
                _say(f"waiting for {_holder(path)} to finish building {what} in {directory} "
                     "(a builder that dies releases the lock)")
                noticed = True
            time.sleep(POLL_S)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield locked
    finally:
        if locked:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(lock_path: Path) -> str:
    try:
        holder = lock_path.read_text().strip()
    except OSError:
        holder = ""
    return f"another process ({holder})" if holder else "another process"


def _remove_stale_baton(directory: Path) -> None:
    """Inside the build lock nobody else builds here: a FileBaton ``lock`` is left by a dead build."""
    baton = directory / TORCH_BATON
    if baton.exists():
        baton.unlink(missing_ok=True)
        _say(f"removed {baton}, a lock file left by an interrupted build")


def _write_manifest(directory: Path, description: dict, module: ModuleType) -> None:
    """Record the finished build (written last, atomically: its presence means complete)."""
    record = {"description": description, "module": module.__name__, "library": Path(module.__file__).name}
    tmp = directory / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


def _load_or_build(description: dict, sources: Sequence[Path], cflags: Sequence[str],
                   ldflags: Sequence[str], cuda_cflags: Optional[Sequence[str]]) -> ModuleType:
    name = description["name"]
    directory = build_directory(description)
    if finished := _finished_build(directory, description):
        return _import(*finished)
    directory.mkdir(parents=True, exist_ok=True)
    what = f"the {'C++/CUDA' if cuda_cflags is not None else 'C++'} extension {name!r}"
    with build_lock(directory, what) as locked:
        if finished := _finished_build(directory, description):  # built by the process we waited for
            return _import(*finished)
        if locked:  # without a lock (no flock here) another process may be building: its baton is live
            _remove_stale_baton(directory)
        (directory / MANIFEST).unlink(missing_ok=True)
        _say(f"building {what} in {directory} (once for this environment"
             f"{'; CUDA kernels take minutes' if cuda_cflags is not None else ''})")
        from torch.utils import cpp_extension

        previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if description["cuda_arch_list"]:
            os.environ["TORCH_CUDA_ARCH_LIST"] = description["cuda_arch_list"]
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources],
                extra_cflags=list(cflags),
                extra_ldflags=list(ldflags),
                extra_cuda_cflags=list(cuda_cflags) if cuda_cflags is not None else None,
                build_directory=str(directory),
                verbose=os.environ.get("MEGATRON_LITE_BUILD_VERBOSE") == "1",
            )
        finally:
            if previous_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
        _write_manifest(directory, description, module)
        return module


def load_extension(
    name: str,
    sources: Sequence[str | Path],
    extra_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] | None = None,
    depends: Sequence[str | Path] = (),
    cuda_arch_list: Optional[str] = None,
    key_extra: Optional[dict] = None,
) -> Optional[ModuleType]:
    """Import the extension ``name`` built from ``sources``, building it first if this environment
    has no complete build; None (after one warning) if it cannot be built.

    ``sources`` and ``depends`` (headers) are paths relative to ``csrc/`` or absolute; both enter the
    cache key, as does ``key_extra`` (e.g. the CPU's instruction set for ``-march=native``). CUDA
    sources (``.cu``) are compiled only with ``extra_cuda_cflags``, for ``cuda_arch_list``
    (``TORCH_CUDA_ARCH_LIST`` syntax, e.g. ``"8.0;9.0"``).
    """
    if name in _loaded:
        return _loaded[name]

    def resolve(paths: Sequence[str | Path]) -> list[Path]:
        return [Path(p) if Path(p).is_absolute() else CSRC_DIR / p for p in paths]

    paths = resolve(sources)
    try:
        description = build_description(name, paths, resolve(depends), extra_cflags, extra_ldflags,
                                         extra_cuda_cflags, cuda_arch_list, key_extra)
        module = _load_or_build(description, paths, extra_cflags, extra_ldflags, extra_cuda_cflags)
    except Exception as err:  # noqa: BLE001 - any build failure falls back to PyTorch
        warnings.warn(
            f"could not build the C++ extension {name!r} ({first_line(err)}); using the PyTorch "
            "fallback. Set MEGATRON_LITE_BUILD_VERBOSE=1 to see the compiler output.",
            stacklevel=2,
        )
        module = None
    _loaded[name] = module
    return module
