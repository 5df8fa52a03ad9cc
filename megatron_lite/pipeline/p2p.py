"""Point-to-point messages between the stages of one pipeline group (and the ring steps of context
parallelism, through ``post_batch``), with NCCL's group semantics on every backend.

A schedule's batch of messages (the consecutive sends and receives of its action list) is posted as
ONE ``torch.distributed.batch_isend_irecv`` call, and the rank waits for every work of it, sends
included, before it goes on. That is what a batch means on NCCL: ``batch_isend_irecv`` runs the ops
as one coalesced group (``ncclGroupStart``/``ncclGroupEnd``) on one communication stream, which
completes as a unit, and a send larger than NCCL's internal buffer (a few MB: every real activation)
finishes only once the peer has posted the matching receive, while everything posted later on that
stream queues behind it. Posting sends and receives as two groups, or leaving sends in flight, lets a
rank's send wait for a receive that its peer has queued behind its own send: the 1F1B steady state,
where stage r sends an activation to r + 1 and receives a gradient from it while r + 1 does the
opposite, deadlocks that way on GPUs (Megatron-LM pairs them in one group for this reason:
``p2p_communication._batched_p2p_ops``). See NCCL's "Group Calls" and "Point-to-point
communication" documentation, and ``batch_isend_irecv``'s docstring.

gloo (CPU tests) runs the ops of a batch one by one, but its send too completes only when the peer
posts the receive (whatever the size), so waiting for all of a batch's works reproduces NCCL's
ordering exactly: a schedule whose batches do not pair up hangs on gloo as it would on NCCL (and the
watchdog names the stuck rank and batch). Each work is waited exactly once (gloo hangs on a second
wait of the same work).

Messages on one rank-to-rank channel are matched in the order posted (no tags), so both ends list
them in the same order; ``simulate.py`` checks that, and that the batches of every schedule pair up,
under exactly these semantics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def post_batch(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    group: Optional[dist.ProcessGroup],
) -> list[dist.Work]:
    """Post ``sends`` ``(tensor, global rank)`` and ``recvs`` ``(buffer, global rank)`` over ``group``
    as ONE ``batch_isend_irecv`` group and return its works: the caller waits for every one of them,
    once, before it relies on any (the group completes as a unit on NCCL). Used by the pipeline's
    exchanges and by context parallelism's ring steps, which compute while theirs is in flight."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer, group) for buf, peer in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


class PipelineLink:
    """Sends and receives over ``group``; peers are pipeline ranks, mapped to global ranks by
    ``pp_ranks`` (``ParallelState.pp_ranks``)."""

    def __init__(self, group: Optional[dist.ProcessGroup], pp_ranks: Sequence[int]):
        self.group = group
        self.pp_ranks = list(pp_ranks)

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
    ) -> None:
        """Post ``sends`` ``(tensor, peer)`` and ``recvs`` ``(buffer, peer)`` as one group and wait
        for all of it: on return every receive buffer is filled and every send is done (its tensor
        may be freed)."""
        works = post_batch([(t, self.pp_ranks[peer]) for t, peer in sends],
                           [(buf, self.pp_ranks[peer]) for buf, peer in recvs], self.group)
        for work in works:
            work.wait()
