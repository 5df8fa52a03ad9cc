"""A checkpoint directory on disk: writing it crash-safely, finding it, and checking it before a load.

    ${checkpoint.save}/
      latest_checkpointed_iteration.txt   the newest complete iteration; rewritten last
      iter_0000100/
        .metadata                         DCP's index: each tensor's global shape, its chunks, their files
        __0_0.distcp, __1_0.distcp, ...   DCP data files, one per writing rank
        meta.json                         format version, iteration, consumed samples, model shape, layout
        config.yaml                       the resolved config of the run that saved it
      iter_0000200.tmp/                   a save in progress, or one killed mid-way: never read

torch.distributed.checkpoint (DCP) does the file I/O: every rank writes the chunks it holds, in
parallel, and a chunk held by several ranks (DP replicas, TP-replicated norms) is written once. A
tensor is handed to DCP as ``Chunks``: its global shape and the boxes of it this rank holds (a TP
shard, or the pieces of a ZeRO slice), each at its global offsets; loading reads into each box the
overlap of every saved chunk, whatever layout wrote them. A save
goes into ``iter_N.tmp/``; when every rank's file is complete, rank 0 adds meta.json and config.yaml,
renames the directory to ``iter_N/``, then rewrites the tracker (write + rename), so a reader never sees
a partial checkpoint. Loading reads DCP's index through an allow-list unpickler (DCP metadata classes,
torch sizes and dtypes only) and the tensors with ``torch.load(weights_only=True)``: no arbitrary
Python objects are unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

VERSION = 1
TRACKER = "latest_checkpointed_iteration.txt"
META = "meta.json"
CONFIG = "config.yaml"
DCP_INDEX = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or written; ``str(err)`` is one line naming the file."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _temp_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}.tmp"


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _is_coordinator(group: Optional[dist.ProcessGroup]) -> bool:
    return not dist.is_initialized() or dist.get_rank(group) == 0


def say(text: str) -> None:
    """Print once per job (global rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"checkpoint: {text}", flush=True)


def _barrier(group: Optional[dist.ProcessGroup]) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


# What DCP reads and writes ------------------------------------------------------------------------
class Chunks:
    """A tensor of global ``shape`` of which this rank holds ``boxes``: (global offsets, a tensor of the
    box's shape, usually a view into live state). Disjoint boxes; several ranks may hold the same box
    (it is written once). Implements DCP's chunk protocol (``__create_write_items__``,
    ``__create_chunk_list__``); ``_SavePlanner``/``_LoadPlanner`` resolve a box by its offsets."""

    def __init__(self, shape: Sequence[int], boxes: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.shape = torch.Size(shape)
        self.boxes = {tuple(offsets): tensor for offsets, tensor in boxes}

    def size(self) -> torch.Size:
        return self.shape

    def box(self, offsets: Sequence[int]) -> torch.Tensor:
        return self.boxes[tuple(offsets)]

    def __create_write_items__(self, fqn: str, _obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.shape),
                    properties=TensorProperties.create_from_tensor(t), size=self.shape,
                ),
            )
            for offsets, t in self.boxes.items()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape) for o, t in self.boxes.items()]

    def host_copy(self) -> "Chunks":
        """The same boxes copied to CPU memory."""
        return Chunks(self.shape, [(o, t.detach().to("cpu", copy=True)) for o, t in self.boxes.items()])


def host_copy(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` (Chunks or plain tensors) copied to CPU memory: what an asynchronous save writes
    while training goes on."""
    return {k: t.host_copy() if isinstance(t, Chunks) else t.detach().to("cpu", copy=True) for k, t in tensors.items()}


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict.get(index.fqn)
        return obj.box(index.offset) if isinstance(obj, Chunks) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict: dict[str, Any], metadata: Optional[Metadata] = None,
                       is_coordinator: bool = False) -> None:
        # The default set-up (materialising meta tensors) replaces values of types it does not know,
        # such as Chunks, by None: put them back.
        chunks = {k: v for k, v in state_dict.items() if isinstance(v, Chunks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(chunks)
        self.state_dict.update(chunks)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict.get(index.fqn)
        return obj.box(index.offset) if isinstance(obj, Chunks) else super().lookup_tensor(index)


# Writing ------------------------------------------------------------------------------------------
def remove_partial_saves(root: str | Path) -> list[Path]:
    """Delete ``iter_N.tmp`` directories left by a killed save; returns them (coordinator only)."""
    partial = sorted(Path(root).glob("iter_*.tmp"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def write_checkpoint(
    tensors: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    root: str | Path,
    iteration: int,
    group: Optional[dist.ProcessGroup] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Write ``tensors`` (Chunks and plain tensors, keyed by name) as ``root/iter_N``; collective
    over ``group`` (every rank of the job). Returns the published directory once it is complete on
    disk and the tracker names it."""
    root, final, temp = Path(root), iteration_dir(root, iteration), _temp_dir(root, iteration)
    coordinator = _is_coordinator(group)
    error: Optional[BaseException] = None
    if coordinator:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for path in remove_partial_saves(root):
                say(f"removed {path}, an interrupted save")
            temp.mkdir()
        except OSError as err:
            error = err
    _raise_if_any_failed(error, root, iteration, group)
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(temp), planner=_SavePlanner(), process_group=group,
                 no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP raises the same failure on every rank
        raise CheckpointError(_save_failure(root, iteration, err)) from None
    # dcp.save returns on the coordinator after every rank's files are written and synced.
    if coordinator:
        _fsync_write(temp / META, json.dumps({"version": VERSION, "iteration": iteration, **meta}, indent=1))
        _fsync_write(temp / CONFIG, config_yaml)
        if final.exists():  # the same iteration saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        temp.rename(final)
        _fsync_write(root / (TRACKER + ".tmp"), f"{iteration}\n")
        os.replace(root / (TRACKER + ".tmp"), root / TRACKER)
        if keep_last:
            prune(root, keep_last)
    _barrier(group)
    return final


def _save_failure(root: Path, iteration: int, err: BaseException) -> str:
    """One line: what failed, and that the previous checkpoint (if any) is untouched."""
    text = " ".join(str(err).split())
    for cause in (getattr(err, "failures", None) or {}).values():  # DCP's per-rank exceptions
        text = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        break
    previous = read_tracker(root) if (root / TRACKER).is_file() else None
    kept = f"the previous checkpoint {iteration_dir(root, previous)} is intact" if previous is not None else "no earlier checkpoint"
    return f"saving iteration {iteration} under {root} failed ({text[:300]}); {kept}"


def _raise_if_any_failed(error: Optional[BaseException], root: Path, iteration: int,
                         group: Optional[dist.ProcessGroup]) -> None:
    """Agree over ``group`` whether any rank failed; if so, raise the same CheckpointError everywhere."""
    failed = torch.tensor([float(error is not None)])
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item():
        raise CheckpointError(_save_failure(root, iteration, error or OSError("failed on another rank")))


def _written_at(path: Path) -> int:
    """When a complete checkpoint was published: its meta.json's mtime (written just before the rename)."""
    return (path / META).stat().st_mtime_ns


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete the checkpoints beyond the newest ``keep_last`` in write order; returns the deleted ones.

    Never deleted: the checkpoint the tracker names, anything written after it, and anything of a
    later iteration than it. The last are an abandoned later branch (a resume from an older
    iteration, e.g. ``checkpoint.load_iteration``): they are kept, outside the count, until the new
    run saves the same iteration again (which replaces it) or passes it (it is then older in write
    order than the new run's checkpoints, and pruned like them). Checkpoints without a meta.json are
    not ours to judge and are left alone."""
    root = Path(root)
    tracked = read_tracker(root)
    if tracked is None or not (iteration_dir(root, tracked) / META).is_file():
        return []
    newest = _written_at(iteration_dir(root, tracked))
    done = {int(m.group(1)): p for p in root.glob("iter_*")
            if (m := re.fullmatch(r"iter_(\d+)", p.name)) and (p / META).is_file()}
    older = sorted((p for it, p in done.items() if it < tracked and _written_at(p) <= newest),
                   key=lambda p: (_written_at(p), p.name))
    old = older[:max(len(older) - (keep_last - 1), 0)]  # the tracker's checkpoint is one of the kept
    for path in old:
        shutil.rmtree(path)
    return old


# Finding and checking ----------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """A complete checkpoint directory, checked: its meta.json and DCP index."""

    path: Path
    meta: dict[str, Any]
    index: Metadata

    @property
    def iteration(self) -> int:
        return int(self.meta["iteration"])

    def has(self, key: str) -> bool:
        return key in self.index.state_dict_metadata

    def keys(self) -> list[str]:
        return list(self.index.state_dict_metadata)

    def shape(self, key: str) -> torch.Size:
        return self.index.state_dict_metadata[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.index.state_dict_metadata[key].properties.dtype


def read_tracker(root: str | Path) -> Optional[int]:
    """The iteration named by ``root``'s tracker file; None if there is none."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def find_checkpoint(root: str | Path, iteration: Optional[int] = None) -> Optional[CheckpointInfo]:
    """The checkpoint to load from ``root``: ``iteration`` if given, else the tracker's. None when
    ``root`` holds no tracker and no iteration was asked for (a fresh start). Raises CheckpointError
    (one line naming the file) for anything missing, truncated or of an unknown version."""
    root = Path(root)
    partial = sorted(root.glob("iter_*.tmp"))
    for path in partial:
        say(f"ignoring {path}: an interrupted save (never renamed to its final name)")
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
        path = iteration_dir(root, iteration)
        if not path.is_dir():
            raise CheckpointError(f"{root / TRACKER}: names iteration {iteration} but {path} does not exist")
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        found = ", ".join(p.name for p in sorted(root.glob("iter_*")) if not p.name.endswith(".tmp")) or "none"
        raise CheckpointError(f"{path}: no such checkpoint (found: {found}); fix checkpoint.load_iteration")
    meta = _read_meta(path / META)
    index = _read_index(path / DCP_INDEX)
    _check_files(path, index)
    return CheckpointInfo(path, meta, index)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is damaged") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: unknown checkpoint version {meta.get('version')!r}; this code reads version {VERSION}"
        )
    return meta


def _classes_of(module: Any) -> frozenset[str]:
    """The names of the classes ``module`` itself defines (not what it imports: ``os``, ``torch``...)."""
    return frozenset(name for name, obj in vars(module).items()
                     if isinstance(obj, type) and obj.__module__ == module.__name__)


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: DCP's metadata classes, torch.Size, dtypes, layouts.
    A name is checked before anything is looked up, and dotted names (``os.system`` reached through
    a module's attributes) are refused."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": _classes_of(dcp.metadata),
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "WindowsPath", "Path"},
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset", "slice"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _read_index(path: Path) -> Metadata:
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except Exception as err:  # noqa: BLE001 - any decoding failure means a damaged file
        raise CheckpointError(f"{path}: unreadable DCP index ({type(err).__name__}: {err})") from None
    if not isinstance(index, Metadata) or index.storage_data is None:
        raise CheckpointError(f"{path}: not a DCP index")
    return index


def _check_files(path: Path, index: Metadata) -> None:
    """Every data file the index points to exists and is long enough for every chunk in it."""
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing shard (listed in {path / DCP_INDEX})")
        actual = file.stat().st_size
        if actual < size:
            raise CheckpointError(f"{file}: truncated: {actual} bytes, the index needs {size}")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return _read_index(Path(self.path) / DCP_INDEX)


def read_tensors(targets: dict[str, Any], info: CheckpointInfo, group: Optional[dist.ProcessGroup] = None) -> None:
    """Fill ``targets`` (Chunks and plain tensors, keyed as saved) in place from ``info``'s files,
    reading only the overlap of each saved chunk with each target chunk (resharding). Collective
    over ``group``. Checks every key exists with the same global shape first."""
    for key, target in targets.items():
        if not info.has(key):
            raise CheckpointError(f"{info.path}: has no {key!r}; the checkpoint is of another model")
        md = info.index.state_dict_metadata[key]
        if not isinstance(md, TensorStorageMetadata) or md.size != target.shape:
            saved = getattr(md, "size", "a non-tensor")
            raise CheckpointError(
                f"{info.path}: {key} has shape {tuple(saved)} in the checkpoint, {tuple(target.shape)} in this model"
            )
    dcp.load(targets, storage_reader=_SafeReader(info.path), planner=_LoadPlanner(), process_group=group,
             no_dist=not dist.is_initialized())


def read_full(info: CheckpointInfo, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with ``prefix``, whole, in this process (no process group):
    for tools (export, inspection) and tests."""
    md = info.index.state_dict_metadata
    targets = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
               if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    dcp.load(targets, storage_reader=_SafeReader(info.path), no_dist=True)
    return targets
