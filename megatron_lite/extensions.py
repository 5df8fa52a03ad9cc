"""Build and load the C++/CUDA extensions in ``csrc/`` on first use, cached across runs.

``load_extension`` compiles with torch.utils.cpp_extension (ninja) into a cache directory keyed by a
hash of the sources and flags, so a second process or run loads the built library in well under a
second. Concurrent ranks are safe: torch's build lock makes one rank build while the others wait.
A missing compiler or a failed build never stops training: the caller gets ``None`` and one warning,
and uses its pure-PyTorch path.

Extensions are built at first use rather than at ``pip install`` time because pip's isolated build
environment would install an unpinned torch (a multi-GB CUDA build on a CPU machine).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

from .messages import first_line

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
_loaded: dict[str, Optional[ModuleType]] = {}


def cache_root() -> Path:
    """``$MEGATRON_LITE_CACHE`` or ``~/.cache/megatron_lite``."""
    return Path(os.environ.get("MEGATRON_LITE_CACHE", Path.home() / ".cache" / "megatron_lite"))


def load_extension(
    name: str,
    sources: Sequence[str | Path],
    extra_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] | None = None,
) -> Optional[ModuleType]:
    """Compile (once) and import the extension ``name`` from ``sources``; None if it cannot be built.

    ``sources`` are paths relative to ``csrc/`` or absolute. CUDA sources (``.cu``) are built only
    when ``extra_cuda_cflags`` is given and torch has CUDA.
    """
    if name in _loaded:
        return _loaded[name]
    paths = [p if Path(p).is_absolute() else CSRC_DIR / p for p in sources]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    for flag in (*extra_cflags, *extra_ldflags, *(extra_cuda_cflags or ())):
        digest.update(flag.encode())
    build_dir = cache_root() / "extensions" / f"{name}-{digest.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in paths],
            extra_cflags=list(extra_cflags),
            extra_ldflags=list(extra_ldflags),
            extra_cuda_cflags=list(extra_cuda_cflags) if extra_cuda_cflags is not None else None,
            build_directory=str(build_dir),
            verbose=os.environ.get("MEGATRON_LITE_BUILD_VERBOSE") == "1",
        )
    except Exception as err:  # noqa: BLE001 - any build failure falls back to PyTorch
        warnings.warn(
            f"could not build the C++ extension {name!r} ({first_line(err)}); using the PyTorch "
            "fallback. Set MEGATRON_LITE_BUILD_VERBOSE=1 to see the compiler output.",
            stacklevel=2,
        )
        module = None
    _loaded[name] = module
    return module
