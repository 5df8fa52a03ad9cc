"""Hydra entry point: ``python -m megatron_lite.train [overrides]`` (under torchrun for many ranks).

Order: compose config → under torchrun, watch the launcher (its death ends the rank, exit 4) →
``training/startup.py:settle`` on every rank: the resume directory (and, with
``checkpoint.use_checkpoint_model_config``, the model, sequence length and tokenizer saved there),
validation against the world size, the tokenizer, optional packages, ``logging.dir``, the data
against the tokenizer (the launcher ran the same before starting any rank) → run records in
``logging.dir`` (rank 0; an earlier run's records set aside: ``training/records.py``) → create the
process groups and the heartbeat → build → train. User errors print one line without a traceback
and exit 2 (``training/errors.py``); a hung step or a dead peer ends a rank with exit 4
(``training/watchdog.py``).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import hydra
from omegaconf import DictConfig

from megatron_lite.config import CONFIG_DIR, Config, register_schema, to_config
from megatron_lite.parallel.state import ParallelState, default_timeout, init_distributed, launch_info
from megatron_lite.training.errors import exit_on_user_error
from megatron_lite.training.heartbeat import Heartbeat
from megatron_lite.training.records import write_run_records
from megatron_lite.training.startup import print_notes, restart_count, settle, start_iteration
from megatron_lite.training.trainer import Trainer, describe_run
from megatron_lite.training.watchdog import configure_nccl, watch_launcher


def run(cfg: Config | DictConfig, overrides: Sequence[str] = ()) -> Trainer:
    """Validate, check, create the process groups, build and train; returns the trainer (its process
    groups still alive). Callable from any launcher whose environment says the rank and world size
    (torchrun, SLURM, or a plain single process). ``overrides``: the command line's, for the run
    records."""
    start = time.perf_counter()
    launch = launch_info()
    watch_launcher(launch.rank, launch.world_size, launch.local_rank)
    settled = settle(to_config(cfg), launch.world_size, overrides)
    config, dims, tokenizer, notes = settled.config, settled.dims, settled.tokenizer, settled.notes
    if launch.rank == 0:
        moved = write_run_records(config, overrides, dims.world_size, restart_count(), start_iteration(config))
        notes += [moved] if moved else []
    print_notes(notes, launch.rank)
    checks_s = time.perf_counter() - start
    timeout = default_timeout(config.parallel.distributed_timeout_minutes)
    configure_nccl(config.logging.dir)
    info = init_distributed(timeout)
    heartbeat = Heartbeat.for_world(info.rank, info.world_size)
    try:
        start = time.perf_counter()
        state = ParallelState.from_dims(dims, timeout)
        groups_s = time.perf_counter() - start
        trainer = Trainer(config, dims, state, tokenizer=tokenizer, heartbeat=heartbeat)
        if info.rank == 0:
            summary = ", ".join(f"{k} {v}" for k, v in describe_run(config, dims, trainer).items())
            print(f"world {dims.world_size}: {summary}; start-up checks in {checks_s:.2f} s, "
                  f"process groups in {groups_s:.2f} s", flush=True)
        trainer.train()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    return trainer


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, _overrides())
    except Exception as err:  # noqa: BLE001 - user errors become one line, the rest re-raised
        exit_on_user_error(err, launch_info().rank)
        raise


def cli() -> None:
    """``python -m megatron_lite.train`` and the ``megatron-lite-train`` command."""
    register_schema()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach the handler below, not its printer
    try:
        main()
    except Exception as err:  # noqa: BLE001 - composition errors (before main runs): one line
        exit_on_user_error(err, launch_info().rank)
        raise


if __name__ == "__main__":
    cli()
