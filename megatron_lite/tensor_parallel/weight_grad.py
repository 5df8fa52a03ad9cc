"""The split-backward contract between the pipeline executor and the layers.

    store = WeightGradStore()
    with defer_weight_grads(store):
        torch.autograd.backward(outputs, grads)   # input gradients; weight-gradient work queued
    store.run()                                   # every queued weight gradient, in posting order

A layer's backward hands its weight gradient to ``weight_grad(weight, work)``: inside
``defer_weight_grads`` the work is queued on the store and the layer returns no gradient; outside,
it is computed at once. ``work.compute(weight)`` returns the gradient.

Stand-in for the linear layers' implementation (another branch, which replaces this file): the
model's layers do not call ``weight_grad`` yet, so their backward inside ``defer_weight_grads``
still computes every gradient; only layers written against this interface (the pipeline bubble
benchmark's stage modules) defer theirs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Protocol

import torch
from torch import nn


class WeightGradWork(Protocol):
    """One layer's pending weight gradient for one backward."""

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """The gradient as a new tensor in ``weight``'s dtype."""


class WeightGradStore:
    """Weight-gradient work queued by a backward under ``defer_weight_grads``."""

    def __init__(self) -> None:
        self.pending: list[tuple[nn.Parameter, WeightGradWork]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def post(self, weight: nn.Parameter, work: WeightGradWork) -> None:
        self.pending.append((weight, work))

    def run(self) -> None:
        """Compute every pending weight gradient in posting order, then forget them."""
        pending, self.pending = self.pending, []
        with torch.no_grad():
            for weight, work in pending:
                grad = work.compute(weight)
                weight.grad = grad if weight.grad is None else weight.grad.add_(grad)


_active_store: Optional[WeightGradStore] = None


@contextmanager
def defer_weight_grads(store: WeightGradStore) -> Iterator[WeightGradStore]:
    """Within the block, layers' backwards queue their weight gradients on ``store``."""
    global _active_store
    if _active_store is not None:
        raise RuntimeError("defer_weight_grads is already active: weight gradients would go to two stores")
    _active_store = store
    try:
        yield store
    finally:
        _active_store = None


def weight_grad(weight: nn.Parameter, work: WeightGradWork) -> Optional[torch.Tensor]:
    """Called by a layer's backward for its weight: queue ``work`` (inside ``defer_weight_grads``)
    and return None, or return the gradient for autograd now."""
    if _active_store is not None:
        _active_store.post(weight, work)
        return None
    return work.compute(weight)
