"""Fused-op front ends. The model calls these functions; which implementation runs behind them is
chosen once at start-up with ``use_backend(model.kernel_backend)``:

- ``torch``: the pure-PyTorch reference (``reference.py``: the math every backend must match);
- ``csrc``: our C++/CUDA kernels (``csrc/``, built on first use, see ``csrc.py``);
- ``te`` / ``apex``: NVIDIA's kernels where they cover an op and its inputs (``vendor.py``);
- ``auto``: ``te``, else ``apex``, when importable on a GPU machine; else ``csrc`` if it builds;
  else ``torch``. An explicit ``te`` or ``apex`` that does not import is an error
  (``require_backend``), not a silent fallback.

Every backend falls back per call to the next one (vendor → csrc → reference) for inputs its kernels
do not take, so any backend accepts whatever the reference accepts. Shapes are documented in
``reference``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

from . import csrc, reference, vendor

OPS = ("rms_norm", "layer_norm", "rotary", "swiglu", "bias_gelu", "causal_softmax")
BACKENDS = ("auto", "torch", "csrc", "te", "apex")
_log = logging.getLogger(__name__)

# The process-wide choice: the backend's name and the function behind each op.
_active: dict = {"backend": "torch", "ops": {op: getattr(reference, op) for op in OPS}, "sources": {}}


def _providers(name: str) -> list[tuple[str, vendor.Provider]]:
    if name == "te":
        return [("te", vendor.te_ops()), ("apex", vendor.apex_ops())]
    if name == "apex":
        return [("apex", vendor.apex_ops())]
    return []


def _resolve(name: str) -> str:
    """The backend that ``name`` amounts to on this machine (auto decided, unavailable ones replaced)."""
    if name == "auto":
        if torch.cuda.is_available():
            for vendor_name in ("te", "apex"):
                if _providers(vendor_name)[0][1]:
                    return vendor_name
        return "csrc" if csrc.available() else "torch"
    require_backend(name)
    if name == "csrc" and not csrc.available():
        warnings.warn("model.kernel_backend=csrc: the extension did not build; using torch", stacklevel=3)
        return "torch"
    return name


VENDOR_INSTALL = {
    "te": "Transformer Engine (pip install transformer_engine[pytorch], or NVIDIA's PyTorch container)",
    "apex": "apex with its CUDA extensions (NVIDIA's PyTorch container, or a source build with --cuda_ext)",
}


def require_backend(name: str) -> None:
    """ConfigError (one line) when ``name`` is an explicitly chosen vendor backend (te, apex) that does
    not import here; ``auto`` falls back instead, and ``csrc`` falls back to torch with a warning."""
    if name in VENDOR_INSTALL and not _providers(name)[0][1]:
        from ..config import ConfigError

        raise ConfigError("model.kernel_backend", f"{name} is not installed here (needs {VENDOR_INSTALL[name]}); "
                                                  "use auto (the best available), csrc or torch")


def _chain(op: str, providers: list[tuple[str, vendor.Provider]], fallback: Callable) -> tuple[Callable, str]:
    """The function for ``op``: the first provider whose kernel accepts the call, else ``fallback``."""
    candidates = [(source, ops[op]) for source, ops in providers if op in ops]
    if not candidates:
        return fallback, ""
    sources = "/".join(source for source, _ in candidates)

    def run(*args):
        for _, (accepts, fn) in candidates:
            if accepts(*args):
                return fn(*args)
        return fallback(*args)

    return run, sources


def use_backend(name: str = "auto") -> str:
    """Select the kernel backend (auto | torch | csrc | te | apex); returns the one in effect."""
    if name not in BACKENDS:
        raise ValueError(f"model.kernel_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    resolved = _resolve(name)
    base = csrc if resolved != "torch" and csrc.available() else reference
    ops, sources = {}, {}
    for op in OPS:
        ops[op], sources[op] = _chain(op, _providers(resolved), getattr(base, op))
    _active.update(backend=resolved, ops=ops, sources=sources)
    if base is csrc and torch.cuda.is_available() and not csrc.has_cuda_kernels():
        _warn_once(f"model.kernel_backend={name}: the csrc extension has {csrc.describe_build()}, so CUDA "
                   "tensors run the PyTorch reference ops; install the CUDA toolkit (nvcc, CUDA_HOME) and "
                   "rebuild with `python -m megatron_lite.ops --require-cuda`")
    _log.info("kernel backend: %s", describe())
    return resolved


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def backend() -> str:
    """The backend in effect (``torch`` until ``use_backend`` is called)."""
    return _active["backend"]


def describe() -> str:
    """One line for the start-up log: the backend, the ops a vendor library runs, and whether the
    csrc extension has its CUDA kernels, e.g. ``te (causal_softmax: te/apex, rms_norm: apex; rest
    csrc: CUDA kernels for sm 8.0;9.0)`` or ``csrc (CPU kernels only: torch is a CPU build)``."""
    uses_csrc = _active["backend"] != "torch" and csrc.available()
    build = f"csrc: {csrc.describe_build()}" if uses_csrc else ""
    vendor_ops = [f"{op}: {src}" for op, src in _active["sources"].items() if src]
    if not vendor_ops:
        return f"{_active['backend']} ({csrc.describe_build()})" if uses_csrc else _active["backend"]
    return f"{_active['backend']} ({', '.join(vendor_ops)}; rest {build or 'torch'})"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; see ``reference.rms_norm``."""
    return _active["ops"]["rms_norm"](x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; see ``reference.layer_norm``."""
    return _active["ops"]["layer_norm"](x, weight, bias, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [b, s, n, d]; see ``reference.rotary``."""
    return _active["ops"]["rotary"](x, cos, sin)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of x [..., 2f] = [gate | up]; see ``reference.swiglu``."""
    return _active["ops"]["swiglu"](x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x + bias); see ``reference.bias_gelu``."""
    return _active["ops"]["bias_gelu"](x, bias)


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled causal softmax of scores [b·n, sq, sk]; see ``reference.causal_softmax``."""
    return _active["ops"]["causal_softmax"](scores, scale)
