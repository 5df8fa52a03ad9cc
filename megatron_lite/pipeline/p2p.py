"""Point-to-point messages between the stages of one pipeline group.

A pipeline schedule exchanges activations (forward) and their gradients (backward) with the
neighbouring pipeline ranks; ``PipelineLink.exchange`` posts one batch of such sends and receives
with ``torch.distributed.batch_isend_irecv`` (NCCL coalesces a batch into one kernel group; gloo,
which accepts it too in torch 2.13, runs it as individual ``isend`` / ``irecv``): the sends as one
batch, the receives as another. It waits for the receives and leaves the sends in flight: a send never holds its rank back, which is the semantics ``simulate.py`` checks schedules
under. Sent tensors are kept alive until their send completes; ``finish`` waits for the rest.
Messages on one rank-to-rank channel are matched in the order posted (no tags), so both ends must
list them in the same order: the simulator checks that for every schedule. This is the model of
torch.distributed.pipelining's schedule runtime (sends waited at the end, receives before use),
which runs its interleaved schedule on NCCL; here it is tested on gloo only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class PipelineLink:
    """Sends and receives over ``group``; peers are pipeline ranks, mapped to global ranks by
    ``pp_ranks`` (``ParallelState.pp_ranks``)."""

    def __init__(self, group: Optional[dist.ProcessGroup], pp_ranks: Sequence[int]):
        self.group = group
        self.pp_ranks = list(pp_ranks)
        # Each posted send batch with its tensors, which must outlive the sends.
        self._in_flight: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
    ) -> None:
        """Post ``sends`` ``(tensor, peer)`` and ``recvs`` ``(buffer, peer)`` as one batch.

        Returns when every receive buffer is filled; the sends may still be in flight.
        """
        send_ops = [dist.P2POp(dist.isend, t.contiguous(), self.pp_ranks[peer], self.group)
                    for t, peer in sends]
        recv_ops = [dist.P2POp(dist.irecv, buf, self.pp_ranks[peer], self.group)
                    for buf, peer in recvs]
        # Two batches: NCCL coalesces a batch into one work, and waiting for the receives must not
        # mean waiting for the sends.
        if send_ops:
            self._in_flight.append(
                (dist.batch_isend_irecv(send_ops), [op.tensor for op in send_ops])
            )
        if recv_ops:
            for work in dist.batch_isend_irecv(recv_ops):
                work.wait()
        self._in_flight = [
            (works, tensors) for works, tensors in self._in_flight
            if not all(w.is_completed() for w in works)
        ]

    def finish(self) -> None:
        """Wait for every send still in flight (end of a schedule)."""
        for works, _ in self._in_flight:
            for work in works:
                work.wait()
        self._in_flight.clear()
