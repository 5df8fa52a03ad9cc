"""torchrun that checks first and answers in one line (what scripts/pretrain_gpt.sh runs).

    python -m megatron_lite.launch [--check-only] [torchrun options] -m megatron_lite.train [overrides]

The options are torchrun's own (``python -m torch.distributed.run``). Before any rank starts, the
launcher runs for the world it will start (nproc-per-node × nnodes ranks) every start-up check that
needs no process group, the same ``training/startup.py:settle`` every rank runs again (the config,
``checkpoint.load`` and the model config saved there, the tokenizer files, the data and their
tokenizer records, ``logging.dir``), and reads the files of the checkpoint it will load. A user
error is one line and exit code 2, and no rank starts; ``--check-only`` stops after the checks.

Then torchrun starts the ranks, told (``LAUNCHER_PRINTS_ERRORS``) to hand their one-line user
error to this launcher through torchelastic's error file instead of printing it. When the first
rank to fail ends with one of megatron_lite's exit codes (2 a user error, 3 training stopped, 4 the
watchdog; the other ranks stopped by torchrun's SIGTERM or their own watchdog), the ranks have
said why: the launcher prints the rank's line last (a watchdog's lines are already printed by the
ranks) and exits with that code, leaving out torchrun's report (its own traceback and a page per
failed rank). Any other failure (a crash with a traceback, a rank killed by a signal) keeps
torchrun's report. If the launcher itself is killed, its ranks notice within a second and end
(``training/watchdog.py:watch_launcher``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import Optional, Sequence

from .messages import LAUNCHER_PRINTS_ERRORS

TRAIN_MODULE = "megatron_lite.train"
OWN_EXIT_CODES = (2, 3, 4)  # a user error, training stopped, the watchdog (training/errors.py, watchdog.py)
# The torchrun logger that reports a failed rank and the SIGTERMs sent to the others.
_PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def world_size(nproc_per_node: str, nnodes: str) -> Optional[int]:
    """The ranks torchrun will start (the largest node count of an elastic ``MIN:MAX``); None when
    ``--nproc-per-node`` is not a number (``gpu``, ``auto``: torchrun decides)."""
    from torch.distributed.run import parse_min_max_nnodes

    if not nproc_per_node.isdigit():
        return None
    return int(nproc_per_node) * parse_min_max_nnodes(nnodes)[1]


def check(overrides: Sequence[str], world: int, say_ok: bool = False) -> int:
    """Run the start-up checks for ``world`` ranks; 0, or the user error's exit code after its line.
    ``say_ok``: also print an ``ok`` line (stdout) and the notes and warnings the ranks would print
    (stderr); otherwise rank 0 prints those once the ranks run."""
    from .checkpoint.storage import find_checkpoint
    from .config import load_config
    from .training.errors import user_error_line
    from .training.startup import settle

    try:
        with warnings.catch_warnings(record=True) as caught:  # rank 0 prints them again
            warnings.simplefilter("always")
            settled = settle(load_config(overrides), world, overrides)
            c = settled.config.checkpoint
            if c.load:  # its files (meta.json, the DCP index, every shard's size), once: the ranks read them at load
                find_checkpoint(c.load, c.load_iteration)
    except Exception as err:  # noqa: BLE001 - user errors become one line, the rest re-raised
        handled = user_error_line(err)
        if handled is None:
            raise
        print(handled[1], file=sys.stderr, flush=True)
        return handled[0]
    d = settled.dims
    if say_ok:
        for line in [*settled.notes, *(f"warning: {w.message}" for w in caught)]:
            print(line, file=sys.stderr)
        print(f"ok: world {d.world_size} = TP {d.tp} × CP {d.cp} × PP {d.pp} × DP {d.dp} (VPP {d.vpp}); "
              "start-up checks passed")
    return 0


class _FailureReport(logging.Filter):
    """Holds torchrun's lines about stopping the ranks until the failed rank's exit code is known:
    dropped when it is one of ours (the ranks said why), passed on otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "released", False):
            return True
        if record.msg.startswith("Sending process"):
            self.held.append(record)
            return False
        if record.msg.startswith("failed (exitcode"):
            own = record.args[0] in OWN_EXIT_CODES
            held, self.held = self.held, []
            if not own:
                self._emit(held)
            return not own
        return True

    def release(self) -> None:
        held, self.held = self.held, []
        self._emit(held)

    @staticmethod
    def _emit(records: list[logging.LogRecord]) -> None:
        for record in records:
            record.released = True
            logging.getLogger(record.name).handle(record)


def _line(failure) -> Optional[str]:
    """The one line a failed rank left in its error file (``messages.record_for_launcher``)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message")
    return message if isinstance(message, str) and message and not message.startswith("To enable traceback") else None


def verdict(failures: dict) -> Optional[tuple[int, Optional[str]]]:
    """(exit code, line to print or None) when the failure is one the ranks explained themselves:
    the first failed rank ended with one of ``OWN_EXIT_CODES``, every other failed rank with one too
    or by torchrun's SIGTERM. None: a crash or a killed rank, whose torchrun report stays."""
    ours = [f for f in failures.values() if f.exitcode in OWN_EXIT_CODES]
    if not ours or any(f.exitcode not in OWN_EXIT_CODES and f.exitcode != -signal.SIGTERM
                       for f in failures.values()):
        return None
    first = min(ours, key=lambda f: f.timestamp)
    said = [f for f in ours if f.exitcode in (2, 3) and _line(f)]
    if said:
        first = min(said, key=lambda f: f.timestamp)
        return first.exitcode, _line(first)
    return first.exitcode, None  # a watchdog exit: its line is printed by the rank


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = bool(argv) and argv[0] == "--check-only"
    args = get_args_parser().parse_args(argv[1:] if check_only else argv)
    world = world_size(args.nproc_per_node, args.nnodes)
    overrides = list(args.training_script_args)
    ours = args.module and args.training_script == TRAIN_MODULE
    # Hydra's own flags (--config-dir, ...) compose another way: the ranks check those runs.
    if ours and world is not None and not any(o.startswith("-") for o in overrides):
        code = check(overrides, world, say_ok=check_only)
        if code or check_only:
            return code
    elif check_only:
        return 0
    os.environ[LAUNCHER_PRINTS_ERRORS] = "1"  # inherited by the ranks
    report = _FailureReport()
    logging.getLogger(_PROCESS_LOGGER).addFilter(report)
    try:
        run(args)
    except ChildFailedError as err:
        known = verdict(err.failures)
        if known is None:
            report.release()
            raise
        code, line = known
        if line:
            print(line, file=sys.stderr, flush=True)
        return code
    finally:
        report.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
