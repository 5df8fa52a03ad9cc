"""Fused-op front ends. The model calls these functions; the backend behind them is chosen once at
start-up with ``use_backend`` (``model.kernel_backend``). Shapes are documented in ``reference``."""

from __future__ import annotations

from . import reference

_backend = "torch"


def use_backend(name: str) -> str:
    """Select the kernel backend (auto | torch | csrc | te | apex); returns the one in effect."""
    global _backend
    _backend = "torch" if name == "auto" else name
    return _backend


def backend() -> str:
    return _backend


rms_norm = reference.rms_norm
layer_norm = reference.layer_norm
rotary = reference.rotary
swiglu = reference.swiglu
bias_gelu = reference.bias_gelu
causal_softmax = reference.causal_softmax
