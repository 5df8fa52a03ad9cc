"""This rank's training state as DCP tensors keyed by layout-independent names.

Keys:
  model/<name>                 a parameter, named as in the single-rank model (global layer indices)
  optimizer/<name>/<field>     its optimizer state (exp_avg, exp_avg_sq, master, step)
  rng/rank<r>/<generator>      rank r's random generators (restored only into the same layout)

A tensor-parallel parameter becomes a DTensor over the TP group: its local shard plus the global shape
and offsets, so DCP writes each chunk once and reads any chunk back into any other sharding. A
parameter whose full tensor stacks ``meta.tp_shard_stride`` sub-matrices along ``meta.tp_shard_dim``
(SwiGLU's fc1 = [gate; up], each split over TP) is stored as its [stride, n/stride, ...] view: there, every rank's
shard is one block along the next dimension, whatever the TP size. Replicated parameters are plain
tensors; DCP writes one copy. The tied output copy on the last pipeline stage is keyed as the
embedding it equals (one copy written, both stages filled on load).

Vocabulary padding depends on TP (padded to a multiple of 128 × TP); a vocabulary-sized tensor
saved with another padding is read whole and its padding rows dropped or added.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.gpt import canonical_name
from ..parallel.state import ParallelState
from ..tensor_parallel import ModelRNG
from ..tensor_parallel.sharding import shard_tensor
from .storage import CheckpointInfo

MODEL, OPTIMIZER, RNG = "model/", "optimizer/", "rng/"
VOCAB_PARAMS = ("embedding.weight", "output", "output_weight")


def tp_mesh(state: ParallelState) -> Optional[DeviceMesh]:
    """A one-dimensional device mesh over this rank's TP group (None without TP)."""
    if state.tp_size == 1:
        return None
    return DeviceMesh.from_group(state.tp_group, state.device.type)


def global_view(local: torch.Tensor, dim: Optional[int], stride: int, mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """``local`` (this rank's shard, sharded along ``dim`` over the TP mesh) as a piece of the full
    tensor: a DTensor sharing ``local``'s storage, or ``local`` (a view of it) when it is replicated."""
    if dim is not None and stride > 1:
        local = local.unflatten(dim, (stride, local.shape[dim] // stride))
        dim += 1
    if dim is None or mesh is None:
        return local
    shape = list(local.shape)
    shape[dim] *= mesh.size()
    full_stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=full_stride)


def host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors copied to CPU memory (what an asynchronous save writes while training goes on)."""
    out: dict[str, torch.Tensor] = {}
    cpu_meshes: dict[int, DeviceMesh] = {}  # a DTensor moves its local tensor to its mesh's device type
    for key, t in tensors.items():
        if isinstance(t, DTensor):
            local = t.to_local().detach().to("cpu", copy=True)
            mesh = t.device_mesh
            if mesh.device_type != "cpu":
                mesh = cpu_meshes.setdefault(id(mesh), DeviceMesh.from_group(mesh.get_group(), "cpu"))
            out[key] = DTensor.from_local(local, mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
        else:
            out[key] = t.detach().to("cpu", copy=True)
    return out


class ShardedState:
    """Maps this rank's parameters and optimizer state to checkpoint keys, for saving and loading.

    ``named_params``: (name, parameter) of this rank's chunks, names as the optimizer knows them;
    ``mesh``: the TP group's mesh (``tp_mesh``), None for an unsharded model.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], mesh: Optional[DeviceMesh] = None):
        self.params = dict(named_params)
        self.mesh = mesh
        self.tp_rank, self.tp_size = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
        self._fixups: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _sharding(self, name: str) -> tuple[Optional[int], int]:
        p = self.params[name]
        return p.meta.tp_shard_dim, p.meta.tp_shard_stride

    # Saving ----------------------------------------------------------------------------------------
    def model_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter as a view into the live tensor, keyed ``model/<name>``."""
        return {
            MODEL + canonical_name(n): global_view(p.detach(), *self._sharding(n), self.mesh)
            for n, p in self.params.items()
        }

    def optimizer_tensors(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``Optimizer.named_param_states()`` keyed ``optimizer/<name>/<field>``; a field shaped like
        its parameter is sharded like it, any other (the 0-d step) is replicated."""
        out = {}
        for name, fields in states.items():
            for field, t in fields.items():
                same = t.shape == self.params[name].shape
                sharding = self._sharding(name) if same else (None, 1)
                out[f"{OPTIMIZER}{canonical_name(name)}/{field}"] = global_view(t.detach(), *sharding, self.mesh)
        return out

    # Loading ---------------------------------------------------------------------------------------
    def model_targets(self, info: CheckpointInfo) -> dict[str, torch.Tensor]:
        """Views into the live parameters to read ``model/<name>`` into (in place)."""
        keys = {n: MODEL + canonical_name(n) for n in self.params}
        return {keys[n]: self._target(keys[n], n, p.detach(), info) for n, p in self.params.items()}

    def optimizer_targets(
        self, info: CheckpointInfo
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Fresh tensors for every saved optimizer field of this rank's parameters: (read targets,
        the same tensors as ``{name: {field: local tensor}}`` for ``load_named_param_states``)."""
        targets, states = {}, {}
        for name, p in self.params.items():
            prefix = f"{OPTIMIZER}{canonical_name(name)}/"
            fields = {}
            for key in (k for k in info.keys() if k.startswith(prefix)):
                dtype = info.dtype(key)
                if len(info.shape(key)) == 0:  # the step count
                    fields[key[len(prefix):]] = targets[key] = torch.empty((), dtype=dtype)
                else:
                    fields[key[len(prefix):]] = local = torch.empty(p.shape, dtype=dtype, device=p.device)
                    targets[key] = self._target(key, name, local, info)
            states[name] = fields
        return targets, states

    def _target(self, key: str, name: str, local: torch.Tensor, info: CheckpointInfo) -> torch.Tensor:
        view = global_view(local, *self._sharding(name), self.mesh)
        saved = info.shape(key) if info.has(key) else None
        if name in VOCAB_PARAMS and saved is not None and saved != view.shape and saved[1:] == view.shape[1:]:
            whole = torch.empty(info.shape(key), dtype=info.dtype(key))  # other vocabulary padding
            self._fixups.append((whole, local))
            return whole
        return view

    def finish_load(self) -> None:
        """Shard the vocabulary-sized tensors that were read whole (padding rows cut or added)."""
        for whole, local in self._fixups:
            rows = local.shape[0] * self.tp_size
            padded = torch.zeros((rows, *whole.shape[1:]), dtype=whole.dtype)
            n = min(rows, whole.shape[0])
            padded[:n] = whole[:n]
            local.copy_(shard_tensor(padded, 0, 1, self.tp_rank, self.tp_size))
        self._fixups.clear()


# Random generators -------------------------------------------------------------------------------
def rng_tensors(rank: int, model_rng: ModelRNG) -> dict[str, torch.Tensor]:
    """Every generator this rank draws from, as tensors keyed ``rng/rank<r>/<generator>``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy.pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.gauss": torch.tensor([gauss], dtype=torch.float64),
        "python.state": torch.tensor(py_state, dtype=torch.int64),
        "python.gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        **{f"model.{k}": v for k, v in model_rng.get_state().items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {f"{RNG}rank{rank}/{k}": v for k, v in states.items()}


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], model_rng: ModelRNG) -> None:
    """Inverse of ``rng_tensors`` (the tensors read back from the checkpoint)."""
    s = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{RNG}rank{rank}/")}
    torch.set_rng_state(s["torch"])
    pos, has_gauss = s["numpy.pos"].tolist()
    np.random.set_state(("MT19937", s["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, s["numpy.gauss"].item()))
    has_gauss, gauss = s["python.gauss"].tolist()
    random.setstate((3, tuple(s["python.state"].tolist()), gauss if has_gauss else None))
    model_rng.set_state({k[len("model."):]: v for k, v in s.items() if k.startswith("model.")})
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def rng_targets(rank: int, info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Empty tensors to read this rank's saved generators into (shapes from the checkpoint)."""
    prefix = f"{RNG}rank{rank}/"
    return {k: torch.empty(info.shape(k), dtype=info.dtype(k)) for k in info.keys() if k.startswith(prefix)}

