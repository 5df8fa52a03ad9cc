"""Run a build step on one rank while the others wait, without races, duplicated work or hangs."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from megatron_lite.data.errors import DataError

T = TypeVar("T")


def first_rank_then_rest(build: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
    """Call ``build()`` on the first rank of ``group`` (default: world), then on every other rank.

    ``build`` must be idempotent through a shared cache: the first rank does the work and writes it
    to disk, the others find it there. If the first rank fails, the others raise its one-line error
    at once instead of waiting for a timeout. Without torch.distributed, just ``build()``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return build()
    first = dist.get_process_group_ranks(group)[0] if group is not None else 0
    result: Optional[T] = None
    status: list = [None]
    if dist.get_rank() == first:
        try:
            result = build()
        except Exception as err:  # noqa: BLE001 - forwarded to every rank, then re-raised here
            status[0] = f"{type(err).__name__}: {err}"
            dist.broadcast_object_list(status, src=first, group=group)
            raise
    dist.broadcast_object_list(status, src=first, group=group)  # the barrier the others wait at
    if status[0] is not None:
        raise DataError(f"rank {first} failed to build the data indices: {status[0]}")
    return result if dist.get_rank() == first else build()
