"""Hydra entry point: ``python -m megatron_lite.train [overrides]`` (under torchrun for many ranks).

Order: compose config → validate against the world size (one-line error, exit 2) → create the
process groups → build → train. User errors print one line without a traceback and exit 2.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig

from megatron_lite.config import CONFIG_DIR, ConfigError, register_schema, to_config, validate
from megatron_lite.parallel.state import ParallelState, default_timeout, init_distributed, launch_info


def run(cfg: DictConfig) -> None:
    config = to_config(cfg)
    dims = validate(config, launch_info().world_size)
    timeout = default_timeout(config.parallel.distributed_timeout_minutes)
    info = init_distributed(timeout)
    start = time.perf_counter()
    state = ParallelState(tp=dims.tp, pp=dims.pp, vpp=dims.vpp, timeout=timeout)
    if info.rank == 0:
        print(
            f"world {dims.world_size}: TP={dims.tp} PP={dims.pp} VPP={dims.vpp} DP={dims.dp}, "
            f"{dims.num_microbatches} microbatches/iteration, schedule {dims.pipeline_schedule}; "
            f"process groups created in {time.perf_counter() - start:.2f} s",
            flush=True,
        )
    print(state.describe(), flush=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        if launch_info().rank == 0:
            print(f"config error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    register_schema()
    main()
