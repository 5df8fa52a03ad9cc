"""The one line (and exit code) the entry point prints for an error the user can fix.

``python -m megatron_lite.train`` lets Hydra's own exceptions reach it (``HYDRA_FULL_ERROR=1``)
so that a composition error, a malformed YAML file, an unknown key or a wrong type ends like every
other user error: one line on stderr naming the key or file, no traceback, exit code 2. Under
torchrun the line also goes to torchelastic's error file; under ``megatron_lite.launch`` (what
scripts/pretrain_gpt.sh runs) only there, and the launcher prints it as its last line.
"""

from __future__ import annotations

import sys
from typing import Optional

import yaml
from omegaconf.errors import OmegaConfBaseException

from ..checkpoint.storage import CheckpointError
from ..config import ConfigError, _one_line
from ..data import DataError
from ..messages import record_for_launcher
from .trainer import TrainingStopped

USER_ERROR_EXIT_CODE = 2
STOPPED_EXIT_CODE = 3


def exit_on_user_error(err: BaseException, rank: int) -> None:
    """For a user error, print its line and exit with its code; return for anything else, whose
    traceback the caller lets through. Errors every rank meets alike (config, data) print on rank 0
    only; a file error may concern one rank's own file, so every rank meeting it prints it."""
    handled = user_error_line(err)
    if handled is None:
        return
    code, line = handled
    launcher_prints = record_for_launcher(line)  # every rank: the launcher shows the first
    if (rank == 0 or isinstance(err, OSError)) and not launcher_prints:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def user_error_line(err: BaseException) -> Optional[tuple[int, str]]:
    """(exit code, one line) for a user error; None for a bug, whose traceback must show."""
    from hydra.errors import HydraException

    if isinstance(err, ConfigError):
        return USER_ERROR_EXIT_CODE, f"config error: {err}"
    if isinstance(err, DataError):
        return USER_ERROR_EXIT_CODE, f"data error: {err}"
    if isinstance(err, CheckpointError):
        return USER_ERROR_EXIT_CODE, f"checkpoint error: {err}"
    if isinstance(err, TrainingStopped):
        return STOPPED_EXIT_CODE, f"training stopped: {err}"
    if isinstance(err, yaml.MarkedYAMLError):
        return USER_ERROR_EXIT_CODE, f"config error: {_yaml_line(err)}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return USER_ERROR_EXIT_CODE, f"config error: {_one_line(err)}"
    if isinstance(err, OSError) and err.filename is not None:
        return USER_ERROR_EXIT_CODE, f"file error: {err.filename}: {err.strerror or err}"
    return None


def _yaml_line(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    where = f"{mark.name} line {mark.line + 1} column {mark.column + 1}" if mark else "a YAML file"
    context = f" ({err.context})" if err.context else ""
    return f"{where}: malformed YAML: {err.problem}{context}"
