"""The split-backward contract between the pipeline executor and the linear layers.

    store = WeightGradStore()
    with defer_weight_grads(store):
        torch.autograd.backward(outputs, grads)   # input gradients; weight-gradient work queued
    store.run()                                   # every queued weight gradient, in posting order

Stand-in for the linear layers' implementation (another branch): no layer queues work yet, so the
backward inside ``defer_weight_grads`` still computes every gradient and ``run`` has nothing to
do. The numbers are those of a normal backward; only the split is missing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class WeightGradStore:
    """Weight-gradient work queued by a backward under ``defer_weight_grads``."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def run(self) -> None:
        """Compute every pending weight gradient in posting order, then forget them."""
        pending, self.pending = self.pending, []
        for work in pending:
            work()


@contextmanager
def defer_weight_grads(store: WeightGradStore) -> Iterator[WeightGradStore]:
    """Within the block, the layers' backwards queue their weight gradients on ``store``."""
    yield store
