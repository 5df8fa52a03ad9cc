"""Batch-size ramp-up: the global batch size as a function of the samples consumed so far.

Megatron-LM's ``--rampup-batch-size <start> <increment> <ramp samples>``
(``RampupBatchsizeNumMicroBatchesCalculator``): the global batch starts at ``start`` and grows by
``increment`` each time another ``ramp_samples / n`` samples have been consumed, where
``n = (global_batch_size − start) / increment`` is the number of increments; past ``ramp_samples``
it is ``global_batch_size``. Because the size depends only on ``consumed_samples`` (which
checkpoints store), a resume mid-ramp reads exactly the batches the uninterrupted run reads.

Unlike Megatron, which allows a ramp only with sample-based training, ``training.train_iters``
still counts iterations (each reads its current batch) and the learning-rate schedule follows them.
No torch here: ``config.validate`` checks the ramp before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class BatchRampup:
    """A validated ramp (``training.rampup_batch_size`` = [start, increment, ramp_samples])."""

    start: int
    increment: int
    ramp_samples: int
    global_batch_size: int

    @classmethod
    def from_config(cls, rampup: Optional[Sequence[int]], global_batch_size: int) -> Optional["BatchRampup"]:
        """None without a ramp; ValueError (the message names the fix) for a malformed one."""
        if rampup is None:
            return None
        values = list(rampup)
        if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{values!r} is not three integers [start, increment, ramp_samples]")
        start, increment, samples = values
        if start <= 0 or increment <= 0 or samples < 0:
            raise ValueError(f"{values!r}: start and increment must be positive and ramp_samples non-negative")
        if start > global_batch_size or (global_batch_size - start) % increment:
            raise ValueError(
                f"start {start} must be at most training.global_batch_size={global_batch_size} and differ from "
                f"it by a multiple of the increment {increment}"
            )
        return cls(start, increment, samples, global_batch_size)

    @property
    def increments(self) -> int:
        return (self.global_batch_size - self.start) // self.increment

    def sizes(self) -> list[int]:
        """Every global batch size the ramp uses, smallest first."""
        return list(range(self.start, self.global_batch_size + 1, self.increment))

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch size of the iteration that starts after ``consumed_samples`` samples.

        Megatron computes ``int(consumed / (ramp_samples / n))`` in floating point; the integer form
        below is the exact value of that expression."""
        if consumed_samples > self.ramp_samples or self.increments == 0:
            return self.global_batch_size
        steps = consumed_samples * self.increments // self.ramp_samples if self.ramp_samples else self.increments
        return min(self.global_batch_size, self.start + steps * self.increment)

    def consumed_after(self, iterations: int, consumed_samples: int = 0) -> int:
        """The samples consumed after ``iterations`` more iterations from ``consumed_samples``."""
        while iterations > 0:
            size = self.batch_size(consumed_samples)
            if size == self.global_batch_size:  # the ramp is over: the rest is arithmetic
                return consumed_samples + size * iterations
            consumed_samples += size
            iterations -= 1
        return consumed_samples
