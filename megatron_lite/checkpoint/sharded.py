"""This rank's training state as checkpoint tensors keyed by layout-independent names.

Keys:
  model/<name>                 a parameter, named as in the single-rank model (global layer indices),
                               or a persistent buffer (an MoE router's expert_bias)
  optimizer/<name>/<field>     its optimizer state (exp_avg, exp_avg_sq, master, step)
  rng/rank<r>/<generator>      rank r's random generators (restored only into the same layout)

Each tensor is saved at its full (unsharded) shape as the ``Chunks`` this rank holds (storage.py).
Expert weights (``meta.expert_parallel``) are saved at their full [E, ...] shape: a rank's experts are
one box at its EP offset along dim 0 (and its ETP offset along ``tp_shard_dim``), so EP and ETP
reshard on load like TP (tensor_parallel/sharding.py:shard_cuts gives every split).
A tensor-parallel parameter's local shard is one box at its TP offset; a parameter whose full tensor
stacks ``meta.tp_shard_stride`` sub-matrices along ``meta.tp_shard_dim`` (SwiGLU's fc1 = [gate; up], each split over TP) is
stored as its [stride, n/stride, ...] view: there, every rank's shard is one block along the next
dimension, whatever the TP size. Optimizer state covers a flat range of the local parameter (all of
it, or with the distributed optimizer the piece in this DP rank's slice): ``flat_boxes`` cuts the
range into boxes, so each DP rank writes only what it owns and a load in any layout reads the
overlaps it needs. Replicated tensors are boxes at offset 0 held by many ranks; DCP writes one copy.
The tied output copy on the last pipeline stage is keyed as the embedding it equals: its parameter
is written once (the same box on both stages), its optimizer state only by the first stage, and
both stages are filled on load.

Vocabulary padding depends on TP (padded to a multiple of 128 × TP); a vocabulary-sized tensor
saved with another padding is read whole and its padding rows dropped or added.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..model.gpt import canonical_name
from ..optim.optimizer import ParamState
from ..tensor_parallel import ModelRNG
from ..parallel.collectives import TPGroup
from ..tensor_parallel.sharding import shard_cuts, shard_tensor
from .storage import CheckpointInfo, Chunks

MODEL, OPTIMIZER, RNG = "model/", "optimizer/", "rng/"
VOCAB_PARAMS = ("embedding.weight", "output", "output_weight")


def flat_boxes(shape: Sequence[int], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The boxes tiling elements [start, end) of a row-major tensor of ``shape``: (offsets, sizes,
    flat index of the box's first element), in order. Each box is a contiguous run of the flattening;
    a range needs at most 2·ndim − 1 of them."""
    if start >= end:
        return []
    if len(shape) == 0:
        return [((), (), start)]
    row = math.prod(shape[1:])
    if start % row == 0 and end % row == 0:  # whole rows
        return [((start // row,) + (0,) * (len(shape) - 1), ((end - start) // row, *shape[1:]), start)]
    first, last = start // row, (end - 1) // row
    if first == last:  # inside one row
        return [((first, *o), (1, *size), first * row + f)
                for o, size, f in flat_boxes(shape[1:], start - first * row, end - first * row)]
    # A partial first row, whole rows, a partial last row (either partial row may be absent).
    head = start if start % row == 0 else (first + 1) * row
    tail = end if end % row == 0 else last * row
    return flat_boxes(shape, start, head) + flat_boxes(shape, head, tail) + flat_boxes(shape, tail, end)


def persistent_buffers(modules) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the modules' buffers that belong in a checkpoint (an MoE router's expert
    bias): their state dicts without the parameters."""
    params = {id(p) for m in modules for p in m.parameters()}
    return [(n, t) for m in modules for n, t in m.state_dict(keep_vars=True).items() if id(t) not in params]


class ShardedState:
    """Maps this rank's parameters and optimizer state to checkpoint keys, for saving and loading.

    ``named_params``: (name, parameter) of this rank's chunks, names as the optimizer knows them;
    ``tp_rank``/``tp_size``: this rank's place in its TP group (how its shards sit in the full tensors);
    ``experts``: the MoE layers' ExpertGroups (EP and ETP ranks of expert weights); ``named_buffers``:
    the chunks' persistent buffers (replicated, saved whole).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], tp_rank: int = 0, tp_size: int = 1,
                 experts=None, named_buffers: Sequence[tuple[str, torch.Tensor]] = ()):
        self.params = dict(named_params)
        self.buffers = dict(named_buffers)
        self.tp_rank, self.tp_size, self.experts = tp_rank, tp_size, experts
        self._fixups: list[tuple[torch.Tensor, torch.Size, torch.Tensor, int, int]] = []

    def _layout(self, name: str) -> tuple[list[int], list[int], list[int]]:
        """The stored view of ``name``'s local shard: its shape, the full tensor's shape, and the
        shard's offsets in it. A cut with stride > 1 views its dimension as [stride, n/stride] and
        cuts the second (every rank's piece is then one box)."""
        p = self.params[name]
        local = list(p.shape)
        full, offsets = list(local), [0] * len(local)
        cuts = shard_cuts(p.meta, TPGroup(None, self.tp_size, self.tp_rank), self.experts)
        for cut in sorted(cuts, key=lambda c: -c.dim):  # the last dimension first: indices stay valid
            dim = cut.dim
            if cut.stride > 1:
                for shape in (local, full):
                    shape[dim : dim + 1] = [cut.stride, shape[dim] // cut.stride]
                offsets[dim : dim + 1] = [0, 0]
                dim += 1
            full[dim] = local[dim] * cut.size
            offsets[dim] = cut.rank * local[dim]
        return local, full, offsets

    def _chunks(self, name: str, flat: torch.Tensor, start: int, end: int) -> Chunks:
        """``flat`` (1-D, elements [start, end) of ``name``'s flattened local shard) as Chunks of the
        full tensor: views into ``flat``."""
        local, full, shard_offsets = self._layout(name)
        boxes = []
        for offsets, sizes, first in flat_boxes(local, start, end):
            n = math.prod(sizes)
            view = flat[first - start : first - start + n].view(sizes)
            boxes.append((tuple(a + b for a, b in zip(shard_offsets, offsets)), view))
        return Chunks(full, boxes)

    # Saving ----------------------------------------------------------------------------------------
    def model_tensors(self) -> dict[str, Chunks]:
        """Every parameter as views into the live tensor, keyed ``model/<name>``."""
        out = {MODEL + canonical_name(n): self._chunks(n, p.detach().view(-1), 0, p.numel())
               for n, p in self.params.items()}
        return {**out, **{MODEL + n: b for n, b in self.buffers.items()}}

    def optimizer_tensors(self, states: dict[str, ParamState]) -> dict[str, Chunks | torch.Tensor]:
        """``NamedStateOptimizer.named_param_states()`` keyed ``optimizer/<name>/<field>``: a 1-D field
        as Chunks of its range of the parameter, the 0-d step as a replicated tensor."""
        out = {}
        for name, state in states.items():
            if canonical_name(name) != name:  # the tied output copy: the first stage writes it
                continue
            for field, t in state.fields.items():
                key = f"{OPTIMIZER}{name}/{field}"
                out[key] = t.detach() if t.ndim == 0 else self._chunks(name, t.detach(), state.start, state.end)
        return out

    # Loading ---------------------------------------------------------------------------------------
    def model_targets(self, info: CheckpointInfo) -> dict[str, Chunks | torch.Tensor]:
        """Views into the live parameters to read ``model/<name>`` into (in place)."""
        keys = {n: MODEL + canonical_name(n) for n in self.params}
        out = {keys[n]: self._target(keys[n], n, p.detach().view(-1), 0, p.numel(), info) for n, p in self.params.items()}
        return {**out, **{MODEL + n: b for n, b in self.buffers.items() if info.has(MODEL + n)}}

    def optimizer_targets(
        self, info: CheckpointInfo, ranges: dict[str, tuple[int, int]]
    ) -> tuple[dict[str, Chunks | torch.Tensor], dict[str, ParamState]]:
        """Fresh tensors for every saved optimizer field of the ranges (``state_ranges()``) of this
        rank's parameters: (read targets, the same tensors as ``ParamState``s)."""
        targets, states = {}, {}
        for name, (start, end) in ranges.items():
            prefix = f"{OPTIMIZER}{canonical_name(name)}/"
            state = states[name] = ParamState(start, end)
            device = self.params[name].device
            for key in (k for k in info.keys() if k.startswith(prefix)):
                field, dtype = key[len(prefix):], info.dtype(key)
                if len(info.shape(key)) == 0:  # the step count
                    state.fields[field] = targets[key] = torch.empty((), dtype=dtype)
                else:
                    state.fields[field] = flat = torch.empty(end - start, dtype=dtype, device=device)
                    targets[key] = self._target(key, name, flat, start, end, info)
        return targets, states

    def _target(self, key: str, name: str, flat: torch.Tensor, start: int, end: int,
                info: CheckpointInfo) -> Chunks | torch.Tensor:
        chunks = self._chunks(name, flat, start, end)
        saved = info.shape(key) if info.has(key) else None
        if name in VOCAB_PARAMS and saved is not None and saved != chunks.shape and saved[1:] == chunks.shape[1:]:
            whole = torch.empty(saved, dtype=info.dtype(key))  # other vocabulary padding
            self._fixups.append((whole, self.params[name].shape, flat, start, end))
            return whole
        return chunks

    def finish_load(self) -> None:
        """Shard the vocabulary-sized tensors that were read whole (padding rows cut or added)."""
        for whole, local_shape, flat, start, end in self._fixups:
            rows = local_shape[0] * self.tp_size
            padded = torch.zeros((rows, *whole.shape[1:]), dtype=whole.dtype)
            n = min(rows, whole.shape[0])
            padded[:n] = whole[:n]
            flat.copy_(shard_tensor(padded, 0, 1, self.tp_rank, self.tp_size).reshape(-1)[start:end])
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


def _saved_on(state: torch.Tensor) -> str:
    """Which kind of generator wrote ``state``: a CPU one (Mersenne Twister, 5056 bytes) or a GPU one."""
    return "cpu" if state.numel() == torch.default_generator.get_state().numel() else "a GPU"


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], model_rng: ModelRNG) -> list[str]:
    """Inverse of ``rng_tensors`` (the tensors read back from the checkpoint), as far as this machine
    allows: a checkpoint saved on the CPU and resumed on a GPU (or back) has model generators of the
    other device type and a CUDA generator too many or too few. Returns what was not restored (those
    generators keep their seeded state), in words."""
    s = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{RNG}rank{rank}/")}
    torch.set_rng_state(s["torch"])
    pos, has_gauss = s["numpy.pos"].tolist()
    np.random.set_state(("MT19937", s["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, s["numpy.gauss"].item()))
    has_gauss, gauss = s["python.gauss"].tolist()
    random.setstate((3, tuple(s["python.state"].tolist()), gauss if has_gauss else None))
    saved = {k[len("model."):]: v for k, v in s.items() if k.startswith("model.")}
    current = model_rng.get_state()
    if all(saved[k].numel() == current[k].numel() for k in current):
        model_rng.set_state(saved)
        skipped = []
    else:
        device = model_rng.default.device.type
        skipped = [f"the model's dropout generators (saved on {_saved_on(saved['default'])}, this run's are {device})"]
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    elif "cuda" in s:
        skipped.append("the CUDA generator (no GPU here)")
    elif torch.cuda.is_available():
        skipped.append("the CUDA generator (saved without a GPU)")
    return skipped


def rng_targets(rank: int, info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Empty tensors to read this rank's saved generators into (shapes from the checkpoint)."""
    prefix = f"{RNG}rank{rank}/"
    return {k: torch.empty(info.shape(k), dtype=info.dtype(k)) for k in info.keys() if k.startswith(prefix)}

