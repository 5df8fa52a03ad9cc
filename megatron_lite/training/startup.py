"""What a start settles before any process group exists (``settle``).

Every check here reads only the config and files, so every rank reaches the same verdict at once
and a user error is one line (exit 2) from rank 0 while every rank exits, instead of one rank
raising while the others wait in a collective. The launcher (``megatron_lite/launch.py``, what
scripts/pretrain_gpt.sh runs) calls ``settle`` once before torchrun starts any rank, so these
errors come before any rank exists:

- where the run resumes from: ``checkpoint.load`` defaults to ``checkpoint.save``, after an in-job
  restart (torchrun's ``--max-restarts``) the job's own latest checkpoint wins, and a ``load``
  named explicitly that holds no checkpoint is an error, not a silent fresh start;
- with ``checkpoint.use_checkpoint_model_config``, the model, sequence length and tokenizer saved
  in that checkpoint (``config.py:with_checkpoint_model_config``);
- the config against the world size (``config.validate``) and the tokenizer files;
- optional packages the config asks for (``logging.wandb.enabled``, ``logging.tensorboard``, an
  explicit ``model.kernel_backend`` te or apex);
- ``logging.dir``: a directory this start can write;
- the model's vocabulary against the tokenizer's, and every dataset against both (``data/record.py``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint.storage import TRACKER, CheckpointError, read_tracker
from ..config import Config, ConfigError, ParallelDims, validate, with_checkpoint_model_config
from ..data.builder import data_cache_dir, dataset_prefixes
from ..data.record import check_data
from ..data.tokenizer import Tokenizer, build_tokenizer

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
    if cfg.checkpoint.use_checkpoint_model_config:  # the size is the checkpoint's: so is the tokenizer
        fix = "the model comes from checkpoint.load: leave data.tokenizer unset to use the tokenizer saved with it"
    elif size < ours:
        fix = (f"set model.vocab_size=null (the tokenizer's size) or at least {ours}, or use the tokenizer the "
               "model was made for")
    else:
        fix = ("model.vocab_size=null sizes the model by the tokenizer, or use the tokenizer the preset assumes "
               "(see configs/model/)")
    if size < ours:
        raise ConfigError("model.vocab_size", f"{size} is smaller than the {ours} ids of {where}; {fix}")
    if size > ours:
        return size, (f"warning: model.vocab_size={size} is larger than the {ours} ids of {where}: "
                      f"{size - ours} embedding rows are never trained; {fix}")
    return size, None


def check_data_against_tokenizer(cfg: Config, tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """DataError for a dataset made by another tokenizer, or holding ids the model cannot embed."""
    check_data(dataset_prefixes(cfg.data), tokenizer, model_vocab_size, data_cache_dir(cfg.data))


def resolve_resume(cfg: Config) -> Optional[str]:
    """Set ``checkpoint.load`` for this start; returns a line to print, or None.

    ``load`` null with ``save`` set: ``load = save`` (a directory without a tracker starts from
    scratch, so the first launch and every relaunch use the same command). After an in-job restart,
    a ``save`` directory holding a checkpoint wins over another ``load``: the job resumes its own
    progress, not its starting point. A ``load`` named explicitly (not ``save``) that holds no
    checkpoint is a CheckpointError: a typo must not train from scratch unnoticed."""
    c = cfg.checkpoint
    if c.load is None:
        c.load = c.save
        return None
    note = None
    if c.save is not None and restart_count() > 0 and read_tracker(c.save) is not None and (
            c.load != c.save or c.finetune):
        # The job resumes its own progress, not its starting point (a fine-tuning start included).
        previous, c.load = c.load, c.save
        c.load_iteration, c.finetune = None, False
        note = (f"checkpoint: restart {restart_count()}: resuming this job's own checkpoints in {c.save} "
                f"instead of checkpoint.load={previous}")
    if c.load != c.save and c.load_iteration is None and read_tracker(c.load) is None:
        what = "no such directory" if not Path(c.load).exists() else f"holds no checkpoint (no {TRACKER})"
        raise CheckpointError(f"checkpoint.load={c.load}: {what}; fix the path, or leave checkpoint.load unset "
                              "to start from scratch (with checkpoint.save set, a new run saves there and "
                              "resumes from it)")
    return note


def start_iteration(cfg: Config) -> int:
    """The iteration this start resumes from (0: a new run), from the tracker alone (cheap)."""
    c = cfg.checkpoint
    if not c.load or c.finetune:  # fine-tuning starts a new run at iteration 0
        return 0
    return c.load_iteration if c.load_iteration is not None else (read_tracker(c.load) or 0)


def check_logging_dir(cfg: Config) -> None:
    """ConfigError when ``logging.dir`` cannot be a directory this start writes (a path through a
    regular file, or a directory without write permission). Records of an earlier run there are kept
    apart by rank 0 at start (``records.py``), never refused or overwritten."""
    path = Path(cfg.logging.dir)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ConfigError("logging.dir", f"{cfg.logging.dir}: {existing} is a regular file, not a directory; "
                          "choose another logging.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("logging.dir", f"{cfg.logging.dir}: {existing} is not writable by this user; "
                          "choose another logging.dir")


@dataclass
class Settled:
    """What ``settle`` decided: the config this start runs (``checkpoint.load`` set, the model taken
    from the checkpoint if asked), its layout, the tokenizer (built once), the model's vocabulary
    before padding, and lines for rank 0 to print."""

    config: Config
    dims: ParallelDims
    tokenizer: Tokenizer
    model_vocab_size: int
    notes: list[str]


def settle(cfg: Config, world_size: int, overrides: Sequence[str] = ()) -> Settled:
    """Every check above, in order, for a world of ``world_size`` ranks; ``overrides``: the command
    line's (they win over a checkpoint's model config). Raises the first user error (ConfigError,
    DataError, CheckpointError); changes ``cfg.checkpoint.load`` in place."""
    notes = [line for line in [resolve_resume(cfg)] if line]
    if cfg.checkpoint.use_checkpoint_model_config and cfg.checkpoint.load:
        cfg, changed = with_checkpoint_model_config(cfg, overrides)
        if changed:
            taken = ", ".join(f"{k} {ours!r} -> {saved!r}" for k, (ours, saved) in changed.items())
            notes.append(f"checkpoint: model config from {cfg.checkpoint.load}: {taken}")
    dims = validate(cfg, world_size)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    check_optional_packages(cfg)
    check_logging_dir(cfg)
    vocab, warning = check_vocabulary(cfg, tokenizer)
    if warning:
        notes.append(warning)
    check_data_against_tokenizer(cfg, tokenizer, vocab)
    return Settled(cfg, dims, tokenizer, vocab, notes)


def print_notes(lines: list[str], rank: int) -> None:
    if rank == 0:
        for line in lines:
            print(line, file=sys.stderr, flush=True)
