"""Process groups for one rank of the grid, created with torch.distributed.

``ParallelState`` is an object handed to the code that needs it (no module globals). It creates every
group of the rank grid on every rank, in one fixed order, because ``torch.distributed.new_group`` is
collective over the whole world; each rank keeps the groups it belongs to.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..pipeline.schedules import V_SHAPE, placement_of
from .layout import RankCoord, RankGrid

if TYPE_CHECKING:
    from ..config import ParallelDims

CPU_TIMEOUT_MINUTES = 2.0
GPU_TIMEOUT_MINUTES = 10.0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_timeout(minutes: Optional[float] = None) -> timedelta:
    """The collective timeout: ``minutes`` if given, else 10 minutes on GPU and 2 on CPU."""
    if minutes is None:
        minutes = GPU_TIMEOUT_MINUTES if torch.cuda.is_available() else CPU_TIMEOUT_MINUTES
    return timedelta(minutes=minutes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int


def launch_info() -> LaunchInfo:
    """Rank, world size and local rank from torchrun/SLURM variables (a single process otherwise)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return LaunchInfo(0, 1, 0)


def local_cuda_device(local_rank: int, device_count: int) -> torch.device:
    """The GPU of a rank: ``local_rank % device_count``. Ranks of a node share its visible GPUs in
    order; with one visible GPU per task (SLURM ``--gpus-per-task=1``) every rank uses cuda:0."""
    if device_count < 1:
        raise RuntimeError("backend nccl, but this process sees no CUDA device (check CUDA_VISIBLE_DEVICES "
                           "and the job's GPU request)")
    return torch.device("cuda", local_rank % device_count)


def process_group_options(backend: str, local_rank: int, device_count: int) -> dict:
    """Extra ``init_process_group`` arguments: with NCCL the rank's device, bound eagerly
    (``device_id``), so every communicator is created on the right GPU."""
    return {"device_id": local_cuda_device(local_rank, device_count)} if backend == "nccl" else {}


def init_distributed(timeout: timedelta, backend: Optional[str] = None) -> LaunchInfo:
    """Create the default process group (once). A plain ``python`` run becomes a world of one."""
    info = launch_info()
    if dist.is_initialized():
        return info
    backend = backend or default_backend()
    options = process_group_options(backend, info.local_rank, torch.cuda.device_count() if backend == "nccl" else 0)
    if "device_id" in options:
        torch.cuda.set_device(options["device_id"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store for every restart of the workers: keys of the previous
        # attempt (gloo's and NCCL's peer addresses) would be read by the next one, which then
        # connects to dead ports (pytorch/pytorch#135712, #167288). Each attempt gets its own prefix.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                              is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"megatron_lite/attempt_{attempt}", store),
                                rank=info.rank, world_size=info.world_size, timeout=timeout, **options)
        return info
    if "MASTER_ADDR" in os.environ:
        os.environ.setdefault("MASTER_PORT", "29500")
        init_method = "env://"
    else:
        if info.world_size > 1:
            raise RuntimeError(
                f"world size {info.world_size} but MASTER_ADDR is not set; launch with torchrun "
                "or set MASTER_ADDR and MASTER_PORT"
            )
        init_method = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
        **options,
    )
    return info


class ParallelState:
    """This rank's place in the TP × CP × DP × PP grid and the process groups it belongs to.

    Attributes per dimension ``x`` in (tp, cp, dp, pp, dp_cp): ``x_group`` (a ProcessGroup),
    ``x_rank`` (this rank's index inside it), ``x_size`` and ``x_ranks`` (its members' global ranks).
    ``dp_cp`` spans DP × CP (Megatron's data_parallel_group_with_cp: what gradients are averaged and
    the distributed optimizer sharded over; the DP group itself when CP = 1). ``mp_group`` spans
    TP × PP (one model replica); ``embedding_group`` holds the first and last pipeline stage of this
    rank's pipeline (None on the stages in between); with ``head_on_first_stage`` (the V placement of
    ZB-V, whose first stage holds the embedding and the output layer) the first stage alone.

    An MoE model (``experts``, or EP / ETP > 1) also gets the expert grid's groups (layout.py), with
    the same attributes: ``ep_*`` (the experts split; the all-to-all's group), ``etp_*`` (an expert's
    matrices split), ``edp_*`` (replicas of this rank's experts: expert gradients are reduced there),
    ``tp_cp_*`` (the ranks sharing one microbatch's sequences: router token counts are summed there)
    and ``stage_*`` (TP × CP × DP of this pipeline stage: the expert-bias counts).
    """

    def __init__(self, tp: int = 1, pp: int = 1, cp: int = 1, timeout: Optional[timedelta] = None,
                 head_on_first_stage: bool = False, ep: int = 1, etp: int = 1, experts: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("call init_distributed() before creating a ParallelState")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.grid = RankGrid(self.world_size, tp=tp, pp=pp, cp=cp, head_on_first_stage=head_on_first_stage,
                             ep=ep, etp=etp, experts=experts)
        self.coord: RankCoord = self.grid.coord_of(self.rank)
        self.backend = dist.get_backend()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )
        timeout = timeout or default_timeout()

        self._owned: list[dist.ProcessGroup] = []
        self.group_ranks: dict[str, list[int]] = {}
        mine: dict[str, Optional[dist.ProcessGroup]] = {}
        # Every rank walks every group in the same order: new_group is a world-wide collective.
        for kind, groups in self.grid.all_groups().items():
            if kind == "data_context" and cp == 1:
                continue  # the same ranks as the DP group: reuse it
            mine[kind] = None
            for ranks in groups:
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    mine[kind], self.group_ranks[kind] = group, ranks
                    self._owned.append(group)

        self.tp_group, self.cp_group = mine["tensor"], mine["context"]
        self.dp_group, self.pp_group = mine["data"], mine["pipeline"]
        self.mp_group, self.embedding_group = mine["model"], mine["embedding"]
        self.tp_ranks = self.group_ranks["tensor"]
        self.cp_ranks = self.group_ranks["context"]
        self.dp_ranks = self.group_ranks["data"]
        self.pp_ranks = self.group_ranks["pipeline"]
        self.embedding_ranks = self.group_ranks.get("embedding", [])
        if cp == 1:
            self.dp_cp_group, self.dp_cp_ranks = self.dp_group, self.dp_ranks
        else:
            self.dp_cp_group, self.dp_cp_ranks = mine["data_context"], self.group_ranks["data_context"]
        self.has_experts = self.grid.has_expert_grid
        if self.has_experts:
            names = {"ep": "expert", "etp": "expert_tensor", "edp": "expert_data", "tp_cp": "tensor_context",
                     "stage": "stage"}
            for attr, kind in names.items():
                setattr(self, f"{attr}_group", mine[kind])
                setattr(self, f"{attr}_ranks", self.group_ranks[kind])
                setattr(self, f"{attr}_size", len(self.group_ranks[kind]))
                setattr(self, f"{attr}_rank", self.group_ranks[kind].index(self.rank))

    @classmethod
    def from_dims(cls, dims: ParallelDims, timeout: Optional[timedelta] = None) -> ParallelState:
        """The groups of a validated layout (``config.validate``'s result) on the running world."""
        if dims.world_size != dist.get_world_size():
            raise RuntimeError(
                f"the layout was validated for {dims.world_size} ranks but the world has "
                f"{dist.get_world_size()}"
            )
        return cls(tp=dims.tp, pp=dims.pp, cp=dims.cp, timeout=timeout,
                   head_on_first_stage=placement_of(dims.pipeline_schedule) == V_SHAPE,
                   ep=dims.ep, etp=dims.etp, experts=dims.experts)

    # Sizes and coordinates -------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.grid.tp

    @property
    def pp_size(self) -> int:
        return self.grid.pp

    @property
    def dp_size(self) -> int:
        return self.grid.dp

    @property
    def cp_size(self) -> int:
        return self.grid.cp

    @property
    def dp_cp_size(self) -> int:
        return self.grid.dp * self.grid.cp

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_cp_ranks.index(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def pp_rank(self) -> int:
        return self.coord.pp

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def cp_rank(self) -> int:
        return self.coord.cp

    # Pipeline neighbours ---------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_stage_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around: interleaving needs the ring)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_stage_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def in_embedding_group(self) -> bool:
        return self.rank in self.embedding_ranks

    def describe(self) -> str:
        c = self.coord
        return (
            f"rank {self.rank}/{self.world_size} tp {c.tp}/{self.tp_size} cp {c.cp}/{self.cp_size} "
            f"pp {c.pp}/{self.pp_size} dp {c.dp}/{self.dp_size}"
        )

    def destroy(self) -> None:
        """Release the groups this object created (the default group stays)."""
        for group in self._owned:
            dist.destroy_process_group(group)
        self._owned.clear()
