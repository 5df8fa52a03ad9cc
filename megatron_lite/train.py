"""Hydra entry point: ``python -m megatron_lite.train [overrides]`` (under torchrun for many ranks).

Order: compose config → validate against the world size (one-line error, exit 2) → create the
process groups → build → train. User errors print one line without a traceback and exit 2.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig

from megatron_lite.checkpoint.storage import CheckpointError
from megatron_lite.config import CONFIG_DIR, Config, ConfigError, register_schema, to_config, validate
from megatron_lite.data import DataError
from megatron_lite.parallel.state import ParallelState, default_timeout, init_distributed, launch_info
from megatron_lite.training.trainer import Trainer, TrainingStopped, describe_run

ERROR_KINDS = {ConfigError: "config error", DataError: "data error", CheckpointError: "checkpoint error"}
USER_ERRORS = tuple(ERROR_KINDS)


def run(cfg: Config | DictConfig) -> Trainer:
    """Validate, create the process groups, build and train; returns the trainer (its process groups
    still alive). Callable from any launcher whose environment says the rank and world size
    (torchrun, SLURM, or a plain single process)."""
    config = to_config(cfg)
    dims = validate(config, launch_info().world_size)
    timeout = default_timeout(config.parallel.distributed_timeout_minutes)
    info = init_distributed(timeout)
    start = time.perf_counter()
    state = ParallelState(tp=dims.tp, pp=dims.pp, vpp=dims.vpp, timeout=timeout)
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
    except USER_ERRORS as err:
        if launch_info().rank == 0:
            kind = next(label for cls, label in ERROR_KINDS.items() if isinstance(err, cls))
            print(f"{kind}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingStopped as err:
        if launch_info().rank == 0:
            print(f"training stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    register_schema()
    main()
