"""Hydra entry point: ``python -m megatron_lite.train [overrides]`` (under torchrun for many ranks).

Order: compose config → validate against the world size (one-line error, exit 2) → create the
process groups → build → train. User errors print one line without a traceback and exit 2
(``training/errors.py``); a hung step or a dead peer ends a rank with exit 4 (``training/watchdog.py``).
"""

from __future__ import annotations

import os
import time

import hydra
from omegaconf import DictConfig

from megatron_lite.config import CONFIG_DIR, Config, register_schema, to_config, validate
from megatron_lite.parallel.state import ParallelState, default_timeout, init_distributed, launch_info
from megatron_lite.training.errors import exit_on_user_error
from megatron_lite.training.trainer import Trainer, describe_run
from megatron_lite.training.watchdog import configure_nccl


def run(cfg: Config | DictConfig) -> Trainer:
    """Validate, create the process groups, build and train; returns the trainer (its process groups
    still alive). Callable from any launcher whose environment says the rank and world size
    (torchrun, SLURM, or a plain single process)."""
    config = to_config(cfg)
    dims = validate(config, launch_info().world_size)
    timeout = default_timeout(config.parallel.distributed_timeout_minutes)
    configure_nccl(config.logging.dir)
    info = init_distributed(timeout)
    start = time.perf_counter()
    state = ParallelState.from_dims(dims, timeout)
    groups_s = time.perf_counter() - start
    trainer = Trainer(config, dims, state)
    if info.rank == 0:
        summary = ", ".join(f"{k} {v}" for k, v in describe_run(config, dims, trainer).items())
        print(f"world {dims.world_size}: {summary}; process groups in {groups_s:.2f} s", flush=True)
    trainer.train()
    return trainer


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as err:  # noqa: BLE001 - user errors become one line, the rest re-raised
        exit_on_user_error(err, launch_info().rank)
        raise


if __name__ == "__main__":
    register_schema()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach the handler below, not its printer
    try:
        main()
    except Exception as err:  # noqa: BLE001 - composition errors (before main runs): one line
        exit_on_user_error(err, launch_info().rank)
        raise
