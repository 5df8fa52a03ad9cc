"""Checkpoint throughput on CPU gloo ranks, against dd on the same disk, and the time training is
blocked by an asynchronous save versus a synchronous one.

    python benchmarks/checkpoint_io.py [--ranks 8] [--mb 512] [--dir /tmp/ckpt_bench]

Each rank holds 1/N of every tensor of a synthetic fp32 state of ``--mb`` MB (sharded like TP
parameters: one box of each ``Chunks``) and a replicated tenth more (written once by DCP). Measured:
- sync save: ``write_checkpoint`` (DCP write with fsync, rename, tracker) — what training waits for;
- async save: host copy (what training waits for), then the background write until the tracker names it;
- load: ``read_tensors`` into the same sharding (page cache warm, as for the dd read);
- dd: one sequential file of the same bytes, ``conv=fsync`` on write, read back to /dev/null.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lite.checkpoint.manager import BackgroundWriter  # noqa: E402
from megatron_lite.checkpoint.storage import (  # noqa: E402
    Chunks, find_checkpoint, host_copy, read_tensors, write_checkpoint,
)

ROWS = 8192  # per full tensor; columns set the size


def _state(rank: int, world: int, mb: int) -> dict[str, Chunks | torch.Tensor]:
    cols = 1024
    n = max(1, mb * 2**20 // (ROWS * cols * 4))
    gen = torch.Generator().manual_seed(rank)
    state = {}
    for i in range(n):
        local = torch.rand(ROWS // world, cols, generator=gen)
        state[f"model/w{i}"] = Chunks((ROWS, cols), [((rank * (ROWS // world), 0), local)])
    state["model/replicated"] = torch.ones(ROWS // 10, cols)  # the same on every rank
    return state


def _rank(rank: int, world: int, port: int, mb: int, root: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    state = _state(rank, world, mb)
    timings = {}

    dist.barrier()
    start = time.perf_counter()
    write_checkpoint(state, {}, "", root, 1, group)
    timings["sync_blocked"] = time.perf_counter() - start

    writer = BackgroundWriter()
    dist.barrier()
    start = time.perf_counter()
    copy = host_copy(state)
    writer.submit(lambda: write_checkpoint(copy, {}, "", root, 2, group))
    timings["async_blocked"] = time.perf_counter() - start
    writer.wait()
    timings["async_total"] = time.perf_counter() - start

    targets = {k: _empty_like(v) for k, v in state.items()}
    info = find_checkpoint(root, 2)
    dist.barrier()
    start = time.perf_counter()
    read_tensors(targets, info, group)
    dist.barrier()
    timings["load"] = time.perf_counter() - start
    assert all(torch.equal(_local(targets[k]), _local(v)) for k, v in state.items())
    results.put((rank, timings))
    dist.destroy_process_group()


def _empty_like(t: Chunks | torch.Tensor) -> Chunks | torch.Tensor:
    if isinstance(t, Chunks):
        return Chunks(t.shape, [(o, torch.empty_like(b)) for o, b in t.boxes.items()])
    return torch.empty_like(t)


def _local(t: Chunks | torch.Tensor) -> torch.Tensor:
    return next(iter(t.boxes.values())) if isinstance(t, Chunks) else t


def _dd(path: Path, nbytes: int) -> tuple[float, float]:
    blocks = max(1, nbytes // 2**22)
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={blocks}", "conv=fsync"],
                   check=True, capture_output=True)
    write = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    read = time.perf_counter() - start
    path.unlink()
    return write, read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--dir", default="/tmp/megatron_lite_ckpt_bench")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    from megatron_lite.parallel.state import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, args.mb, str(root), results))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    timings = dict(results.get() for _ in procs)
    for p in procs:
        p.join()

    nbytes = sum(f.stat().st_size for f in (root / "iter_0000002").glob("*.distcp"))
    dd_write, dd_read = _dd(root / "dd.bin", nbytes)
    slowest = {k: max(t[k] for t in timings.values()) for k in timings[0]}
    mb = nbytes / 2**20
    print(f"state on disk: {mb:.0f} MB over {args.ranks} ranks ({len(list((root / 'iter_0000002').glob('*.distcp')))} files)")
    print(f"dd write (fsync): {mb / dd_write:8.0f} MB/s   dd read: {mb / dd_read:8.0f} MB/s")
    print(f"sync save:        {mb / slowest['sync_blocked']:8.0f} MB/s   ({slowest['sync_blocked']:.2f} s, "
          f"{dd_write / slowest['sync_blocked']:.2f}x dd)")
    print(f"load:             {mb / slowest['load']:8.0f} MB/s   ({slowest['load']:.2f} s, {dd_read / slowest['load']:.2f}x dd)")
    print(f"training blocked: sync {slowest['sync_blocked']:.2f} s, async {slowest['async_blocked']:.2f} s "
          f"({slowest['async_blocked'] / slowest['sync_blocked']:.2f}x); async write done after "
          f"{slowest['async_total']:.2f} s")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
