"""A save that fails (disk full on one rank, a directory that cannot be created) is one clear error on
every rank, and the previous checkpoint stays the one the tracker names, loadable."""

import subprocess
import sys

from test_checkpoint import BASE
from test_training import REPO

from megatron_lite.checkpoint.storage import find_checkpoint, read_full


def _disk_full_on_second_save(overrides: list[str], failing_rank: int) -> str:
    """Train with saves at iterations 2 and 4; the second save's writes fail with ENOSPC on one rank."""
    import errno

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from megatron_lite.checkpoint.storage import CheckpointError
    from megatron_lite.config import load_config
    from megatron_lite.train import run

    original, calls = dcp.FileSystemWriter.write_data, []

    def write_data(self, plan, planner):
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == failing_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, plan, planner)

    dcp.FileSystemWriter.write_data = write_data
    try:
        run(load_config(overrides))
    except CheckpointError as err:
        return str(err)
    finally:
        dcp.FileSystemWriter.write_data = original
    return "no error"


def test_disk_full_during_save_keeps_previous_checkpoint(ranks, tmp_path):
    save = tmp_path / "ckpt"
    overrides = BASE + [f"checkpoint.save={save}", "checkpoint.save_interval=2", "training.train_iters=4",
                        f"logging.dir={tmp_path / 'log'}"]
    messages = ranks(2).run(_disk_full_on_second_save, overrides, 1)
    for message in messages:
        assert "saving iteration 4" in message and "\n" not in message
        assert f"the previous checkpoint {save / 'iter_0000002'} is intact" in message
    assert "No space left on device" in messages[0]  # the failing rank's own error reaches rank 0
    info = find_checkpoint(save)
    assert info.iteration == 2
    assert "embedding.weight" in read_full(info, prefix="model/") or read_full(info)


def test_unwritable_checkpoint_directory_is_one_line(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the checkpoint directory should go\n")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lite.train", *BASE, "training.train_iters=1",
         f"checkpoint.save={blocker / 'ckpt'}", f"logging.dir={tmp_path / 'log'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint error: saving iteration 1"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "a file where the checkpoint directory should go\n"
