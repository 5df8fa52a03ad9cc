"""What the entry point settles on every rank before any process group exists.

Every check here reads only the config and files, so every rank reaches the same verdict at once
and a user error is one line (exit 2) from rank 0 while every rank exits, instead of one rank
raising while the others wait in a collective:

- optional packages the config asks for (``logging.wandb.enabled``, ``logging.tensorboard``, an
  explicit ``model.kernel_backend`` te or apex);
- the model's vocabulary against the tokenizer's, and every dataset against both (``data/record.py``);
- where the run resumes from: ``checkpoint.load`` defaults to ``checkpoint.save``, and after an
  in-job restart (torchrun's ``--max-restarts``) the job's own latest checkpoint wins;
- ``logging.dir``: a new run never overwrites another run's ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint.storage import read_tracker
from ..config import Config, ConfigError
from ..data.builder import data_cache_dir, dataset_prefixes
from ..data.record import check_data
from ..data.tokenizer import Tokenizer
from .metrics import METRICS_FILE

# Package each optional feature imports, and how to get it.
OPTIONAL_PACKAGES = {
    "logging.wandb.enabled": ("wandb", "pip install wandb (or megatron-lite[wandb])"),
    "logging.tensorboard": ("tensorboard", "pip install tensorboard (or megatron-lite[tensorboard])"),
}


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job's workers (0: first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def check_optional_packages(cfg: Config) -> None:
    """ConfigError naming the key and the install command for a feature whose package is missing."""
    wanted = {
        "logging.wandb.enabled": cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled",
        "logging.tensorboard": cfg.logging.tensorboard,
    }
    for key, on in wanted.items():
        package, install = OPTIONAL_PACKAGES[key]
        if on and importlib.util.find_spec(package) is None:
            raise ConfigError(key, f"is true but the {package} package is not installed: {install}, or set it to false")
    if cfg.model.kernel_backend in ("te", "apex"):  # an explicit vendor backend must import
        from .. import ops

        ops.require_backend(cfg.model.kernel_backend)


def check_vocabulary(cfg: Config, tokenizer: Tokenizer) -> tuple[int, Optional[str]]:
    """(the model's vocabulary before padding, a warning line or None).

    ``model.vocab_size`` smaller than the tokenizer's is a ConfigError (its ids would index past the
    embedding); larger is allowed (an imported model's padded table, a preset sized for another
    tokenizer) with one warning line."""
    ours = tokenizer.vocab_size
    size = cfg.model.vocab_size
    if size is None:
        return ours, None
    where = f"data.tokenizer {tokenizer.kind} {tokenizer.path}"
    if size < ours:
        raise ConfigError(
            "model.vocab_size", f"{size} is smaller than the {ours} ids of {where}; set model.vocab_size=null "
            f"(the tokenizer's size) or at least {ours}, or use the tokenizer the model was made for"
        )
    if size > ours:
        return size, (f"warning: model.vocab_size={size} is larger than the {ours} ids of {where}: "
                      f"{size - ours} embedding rows are never trained; model.vocab_size=null sizes the model "
                      "by the tokenizer, or use the tokenizer the preset assumes (see configs/model/)")
    return size, None


def check_data_against_tokenizer(cfg: Config, tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """DataError for a dataset made by another tokenizer, or holding ids the model cannot embed."""
    check_data(dataset_prefixes(cfg.data), tokenizer, model_vocab_size, data_cache_dir(cfg.data))


def resolve_resume(cfg: Config) -> Optional[str]:
    """Set ``checkpoint.load`` for this start; returns a line to print, or None.

    ``load`` null with ``save`` set: ``load = save`` (a directory without a tracker starts from
    scratch, so the first launch and every relaunch use the same command). After an in-job restart,
    a ``save`` directory holding a checkpoint wins over another ``load``: the job resumes its own
    progress, not its starting point."""
    c = cfg.checkpoint
    if c.save is None:
        return None
    if c.load is None:
        c.load = c.save
        return None
    if restart_count() > 0 and read_tracker(c.save) is not None and (c.load != c.save or c.finetune):
        # The job resumes its own progress, not its starting point (a fine-tuning start included).
        previous, c.load = c.load, c.save
        c.load_iteration, c.finetune = None, False
        return (f"checkpoint: restart {restart_count()}: resuming this job's own checkpoints in {c.save} "
                f"instead of checkpoint.load={previous}")
    return None


def start_iteration(cfg: Config) -> int:
    """The iteration this start resumes from (0: a new run), from the tracker alone (cheap)."""
    c = cfg.checkpoint
    if not c.load:
        return 0
    return c.load_iteration if c.load_iteration is not None else (read_tracker(c.load) or 0)


def check_logging_dir(cfg: Config, resumes_at: int) -> None:
    """ConfigError when a new run (iteration 0, not a restart) would write into a ``logging.dir``
    whose ``metrics.jsonl`` already holds another run's records; a resume appends to it."""
    metrics = Path(cfg.logging.dir) / METRICS_FILE
    if resumes_at > 0 or restart_count() > 0 or not metrics.is_file() or metrics.stat().st_size == 0:
        return
    records = sum(1 for _ in metrics.open("rb"))
    raise ConfigError(
        "logging.dir", f"{metrics} already holds {records} record{'s' * (records != 1)} of an earlier run; a new run does not "
        "overwrite them: choose another logging.dir, delete that file, or resume the run (checkpoint.load)"
    )


@dataclass
class Startup:
    """What ``prepare`` settled: the tokenizer (built once), the model's vocabulary, lines for rank 0."""

    tokenizer: Tokenizer
    model_vocab_size: int
    notes: list[str]


def prepare(cfg: Config, tokenizer: Tokenizer) -> Startup:
    """Every check above, in order; raises the first user error (ConfigError, DataError)."""
    check_optional_packages(cfg)
    notes: list[str] = []
    check_logging_dir(cfg, start_iteration(cfg))
    vocab, warning = check_vocabulary(cfg, tokenizer)
    if warning:
        notes.append(warning)
    check_data_against_tokenizer(cfg, tokenizer, vocab)
    return Startup(tokenizer, vocab, notes)


def print_notes(lines: list[str], rank: int) -> None:
    if rank == 0:
        for line in lines:
            print(line, file=sys.stderr, flush=True)
