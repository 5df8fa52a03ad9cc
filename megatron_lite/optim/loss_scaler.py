"""Loss scaling for fp16 training (Micikevicius et al. 2018), with the semantics of Megatron's
``DynamicGradScaler``.

The loss is multiplied by ``scale`` before the backward so small fp16 gradients do not flush to zero;
the fp32 main gradients are divided by it before the optimizer step. A step whose gradients hold an
inf or NaN on any rank is skipped on every rank. Dynamic scaling: the first ``hysteresis`` − 1
overflows are tolerated; from then on every overflow halves the scale (never below ``min_scale``),
until ``window`` clean steps in a row double it and restore the hysteresis. From 2^32 a run therefore
skips (hysteresis − 1) + (32 − log2 of a workable scale) steps before its first applied one. A
constant scale never changes.
"""

from __future__ import annotations

from typing import Optional

import torch


class LossScaler:
    """The fp16 loss scale: ``scale_loss`` before the backward, ``unscale_`` on the fp32 gradients
    after it, ``update`` once per iteration (module docstring)."""

    def __init__(
        self, initial_scale: float = 2.0**32, window: int = 1000, hysteresis: int = 2,
        min_scale: float = 1.0, dynamic: bool = True,
    ):
        self.scale = float(initial_scale)
        self.window, self.hysteresis, self.min_scale, self.dynamic = window, hysteresis, min_scale, dynamic
        self._clean_steps = 0
        self._overflows_left = hysteresis

    @classmethod
    def for_precision(cls, precision: str, loss_scale: Optional[float], initial_scale: float, window: int,
                      hysteresis: int, min_scale: float) -> Optional["LossScaler"]:
        """fp16: a constant scaler when ``loss_scale`` is set, else a dynamic one; None otherwise."""
        if precision != "fp16":
            return None
        return cls(loss_scale or initial_scale, window, hysteresis, min_scale, dynamic=loss_scale is None)

    @property
    def can_lower(self) -> bool:
        """Whether a further overflow can still lower the scale."""
        return self.dynamic and self.scale > self.min_scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: torch.Tensor) -> None:
        """Divide the fp32 gradients (in place) by the scale the loss was multiplied with."""
        grads.mul_(1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Account for one step: an overflow (skipped step) or a clean one."""
        if not self.dynamic:
            return
        if found_inf:
            self._clean_steps = 0
            self._overflows_left = max(0, self._overflows_left - 1)
            if self._overflows_left == 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
            return
        self._clean_steps += 1
        if self._clean_steps == self.window:
            self.scale *= 2.0
            self._clean_steps = 0
            self._overflows_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "overflows_left": self._overflows_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._overflows_left = int(state["overflows_left"])
