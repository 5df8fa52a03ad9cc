"""Which samples each data-parallel rank reads, driven by one number: ``consumed_samples``.

Iteration n reads the global batch ``[c, c + global_batch_size)`` of dataset indices, where c is the
number of samples consumed before it (the dataset itself is already shuffled). The global batch is
cut into ``num_microbatches`` consecutive slices of ``micro_batch_size × dp_size`` samples, and DP
rank r takes its ``micro_batch_size`` samples from each slice: the same layout as Megatron-LM, so
the global batch's content does not depend on the DP size. TP ranks, CP ranks and pipeline stages of
one model replica share a DP rank and so see the same indices; only the stages that use a field need
to load it (``stage_fields``), and a CP rank keeps only its tokens of each sample (``positions``:
its two zigzag chunks, parallel/context.py:local_positions). Resuming with the saved
``consumed_samples`` continues with the very next sample.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import torch

from megatron_lite.data.errors import DataError
from megatron_lite.training.rampup import BatchRampup

FIELDS = ("tokens", "labels", "loss_mask")


class MicrobatchSampler:
    """Per iteration, this DP rank's microbatches: a list of index lists, one per microbatch.

    ``total_samples`` is how many samples the run reads in all (``train_iters × global_batch``);
    iteration stops before a global batch that would pass it. ``consumed_samples`` advances by the
    global batch size as each iteration's indices are handed out; it is the sampler's whole state,
    so ``MicrobatchSampler(..., consumed_samples=saved, ...)`` resumes exactly. ``rampup``
    (``training/rampup.py``): the global batch size is ``rampup.batch_size(consumed_samples)``
    instead of ``global_batch_size``, so iterations early in a ramp have fewer microbatches.
    """

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int,
        global_batch_size: int, dp_rank: int, dp_size: int, rampup: Optional[BatchRampup] = None,
    ):
        per_step = micro_batch_size * dp_size
        if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size % per_step:
            raise DataError(
                f"training.global_batch_size: {global_batch_size} is not a positive multiple of "
                f"micro_batch_size × DP = {micro_batch_size}×{dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"consumed_samples {consumed_samples} is outside [0, total_samples="
                f"{total_samples}]; was the checkpoint made with a longer run?"
            )
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.rampup = dp_rank, dp_size, rampup
        self.num_microbatches = global_batch_size // per_step  # after any ramp

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch size of the iteration that starts after ``consumed_samples``."""
        return self.rampup.batch_size(consumed_samples) if self.rampup else self.global_batch_size

    def iteration_sizes(self) -> Iterator[int]:
        """The number of microbatches of every iteration left (the sampler itself does not move)."""
        consumed = self.consumed_samples
        while consumed + self.batch_size(consumed) <= self.total_samples:
            yield self.batch_size(consumed) // (self.micro_batch_size * self.dp_size)
            consumed += self.batch_size(consumed)

    def __len__(self) -> int:
        """Iterations left."""
        if self.rampup is None:
            return (self.total_samples - self.consumed_samples) // self.global_batch_size
        return sum(1 for _ in self.iteration_sizes())

    def microbatches(self, consumed_samples: int) -> list[list[int]]:
        """This rank's microbatches of the global batch that starts after ``consumed_samples``."""
        stride = self.micro_batch_size * self.dp_size
        first = consumed_samples + self.dp_rank * self.micro_batch_size
        return [
            list(range(first + m * stride, first + m * stride + self.micro_batch_size))
            for m in range(self.batch_size(consumed_samples) // stride)
        ]

    def __iter__(self) -> Iterator[list[list[int]]]:
        while self.consumed_samples + self.batch_size(self.consumed_samples) <= self.total_samples:
            batch = self.microbatches(self.consumed_samples)
            self.consumed_samples += self.batch_size(self.consumed_samples)
            yield batch


def stage_fields(is_first_stage: bool, is_last_stage: bool) -> tuple[str, ...]:
    """The fields a pipeline stage reads: tokens on the first, labels and loss mask on the last."""
    first = ("tokens",) if is_first_stage else ()
    return first + (("labels", "loss_mask") if is_last_stage else ())


def collate(
    dataset, indices: Sequence[int], fields: Sequence[str] = FIELDS, positions: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """Stack samples ``indices`` of ``dataset`` into ``{field: [len(indices), seq_length]}``.

    ``fields`` limits what is returned (see ``stage_fields``); an empty tuple reads nothing.
    ``positions`` (int64): keep only these token positions of every sample ([len(indices), len(positions)]).
    """
    if not fields:
        return {}
    return _stack([dataset[i] for i in indices], fields, positions)


def _stack(samples: list[dict], fields: Sequence[str], positions: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = {field: torch.stack([sample[field] for sample in samples]) for field in fields}
    if positions is not None:
        batch = {field: t[:, positions] for field, t in batch.items()}
    return batch


def microbatch_loader(
    dataset, sampler: MicrobatchSampler, fields: Sequence[str] = FIELDS, num_workers: int = 0,
    positions: Optional[torch.Tensor] = None,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per iteration, this rank's ``num_microbatches`` collated microbatches (see ``collate``).

    ``num_workers`` > 0 (``data.num_workers``) loads them in DataLoader worker processes, a few
    microbatches ahead; the sampler's ``consumed_samples`` then runs ahead of training too, so
    checkpoints should record the trainer's own count (the global batches of the iterations run). A stage
    that needs no fields gets empty dicts and reads nothing. ``positions`` as in ``collate``.
    """
    if not fields or num_workers == 0:
        for microbatches in sampler:
            yield [collate(dataset, indices, fields, positions) for indices in microbatches]
        return
    sizes = list(sampler.iteration_sizes()) if sampler.rampup else [sampler.num_microbatches] * len(sampler)
    flat = (indices for microbatches in sampler for indices in microbatches)  # sizes first: workers pull
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=flat, num_workers=num_workers,
        collate_fn=lambda samples: _stack(samples, fields, positions),
        multiprocessing_context="fork" if hasattr(os, "fork") else None,
    )
    stream = iter(loader)
    for size in sizes:
        yield [next(stream) for _ in range(size)]
