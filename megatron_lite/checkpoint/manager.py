"""The trainer's checkpoints: when to save, what a checkpoint holds, how a run resumes.

Saved (``save``): every parameter and its optimizer state keyed by unsharded name (sharded.py), each
rank's random generators, and in meta.json ``Trainer.state_dict()`` (the iteration, of which the
learning rate is a function, and the consumed samples, the sampler's whole state), the model's shape
and the parallel layout; config.yaml holds the resolved config. When: every
``checkpoint.save_interval`` iterations, at the end of training, and when the ranks agree to stop
early (a preemption signal or ``training.exit_duration_mins``, see preemption.py).

``checkpoint.async_save``: the state is copied to host memory, then a background thread writes it
while training continues; the next save and the end of training wait for it, and the tracker is
updated only when it is complete. DCP's collectives run on a dedicated gloo group, so the writer
thread never shares a group with training's collectives.

Loading (``load``, from the constructor): the checkpoint named by ``checkpoint.load`` (the tracker's
iteration, or ``checkpoint.load_iteration``) is checked (files, version, model shape) and read into
this rank's shards in whatever layout this run has. Random generators are restored only when the
layout is the same (they are per rank); the optimizer starts fresh when the checkpoint has no
optimizer state (an imported HF model).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch.distributed as dist

from ..config import ModelConfig, to_yaml
from .preemption import StopAgreement, announce
from .sharded import ShardedState, host_copy, restore_rng, rng_targets, rng_tensors, tp_mesh
from .storage import CheckpointError, CheckpointInfo, find_checkpoint, read_tensors, write_checkpoint

if TYPE_CHECKING:
    from ..training.trainer import Trainer

# The model config fields that decide the parameters' shapes (a checkpoint must agree on all of them).
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "normalization", "activation", "position_embedding", "add_bias_linear", "tie_embeddings",
)


def model_signature(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """What the parameter shapes depend on, with defaults resolved; ``vocab_size`` before padding."""
    sig = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    sig["num_query_groups"] = cfg.num_query_groups or cfg.num_attention_heads
    sig["ffn_hidden_size"] = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    sig["vocab_size"] = vocab_size
    if cfg.position_embedding == "learned":
        sig["seq_length"] = cfg.seq_length
    return sig


def check_model(info: CheckpointInfo, expected: dict[str, Any]) -> None:
    """One line naming the first shape field where the checkpoint and this model differ."""
    saved = info.meta.get("model", {})
    for key, value in expected.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{info.path / 'meta.json'}: model.{key} is {saved.get(key)!r} in the checkpoint but {value!r} "
                "in this config; load it with the same model shape"
            )


class BackgroundWriter:
    """At most one save in flight: ``submit`` first waits for the previous one; errors re-raise in ``wait``."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(fn,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


class Checkpointer:
    """Saves and loads one trainer's state; the trainer calls ``load``, ``after_step``, ``finish``."""

    def __init__(self, trainer: "Trainer"):
        self.trainer, self.cfg = trainer, trainer.cfg.checkpoint
        state, dims = trainer.state, trainer.dims
        self.rank = state.rank
        self.layout = {"tp": dims.tp, "cp": dims.cp, "pp": dims.pp, "vpp": dims.vpp, "dp": dims.dp}
        self.signature = model_signature(trainer.cfg.model, trainer.unpadded_vocab_size)
        active = bool(self.cfg.save or self.cfg.load)
        # Every rank creates it (new_group is collective); DCP's planning and barriers run on it.
        self.group = dist.new_group(backend="gloo") if active and dist.is_initialized() else None
        self.sharded = ShardedState(trainer.named_params, tp_mesh(state)) if active else None
        self.writer = BackgroundWriter()
        self.stop = StopAgreement(self.cfg.save is not None, trainer.cfg.training.exit_duration_mins, state.device)
        self.last_saved: Optional[int] = None

    def _print(self, text: str) -> None:
        if self.rank == 0:
            print(f"checkpoint: {text}", flush=True)

    # Saving ----------------------------------------------------------------------------------------
    def save(self) -> None:
        """Save this iteration (collective over every rank); asynchronous with checkpoint.async_save."""
        t = self.trainer
        self.writer.wait()
        t.optimizer.finish_param_gather()  # parameters updated by an overlapped all-gather
        start = time.perf_counter()
        tensors = {
            **self.sharded.model_tensors(),
            **self.sharded.optimizer_tensors(t.optimizer.named_param_states()),
            **rng_tensors(self.rank, t.chunks[0].rng),
        }
        meta = {
            "trainer": t.state_dict(), "model": self.signature, "padded_vocab_size": t.vocab_size,
            "layout": self.layout,
        }
        config_yaml, iteration = to_yaml(t.cfg), t.iteration
        if self.cfg.async_save:
            tensors = host_copy(tensors)
            blocked = time.perf_counter() - start
            self.writer.submit(lambda: self._write(tensors, meta, config_yaml, iteration, start, blocked))
        else:
            self._write(tensors, meta, config_yaml, iteration, start, None)
        self.last_saved = iteration

    def _write(self, tensors, meta, config_yaml: str, iteration: int, start: float, blocked: Optional[float]) -> None:
        path = write_checkpoint(tensors, meta, config_yaml, self.cfg.save, iteration, self.group, self.cfg.keep_last)
        seconds = time.perf_counter() - start
        how = f"asynchronously; training blocked {blocked:.2f} s" if blocked is not None else "synchronously"
        self._print(f"saved {path} in {seconds:.2f} s ({how})")

    def after_step(self) -> Optional[str]:
        """Save when the interval says so or the ranks agree to stop; returns the stop reason (the
        same on every rank) or None."""
        reason = self.stop.reason()
        interval, iteration = self.cfg.save_interval, self.trainer.iteration
        if reason is not None and self.rank == 0:
            announce(reason, iteration, saving=bool(self.cfg.save))
        if self.cfg.save and (reason is not None or (interval and iteration % interval == 0)):
            self.save()
        return reason

    def finish(self) -> None:
        """End of training: save unless this iteration is saved, wait for a background save, put back
        the signal handlers, release the checkpoint group."""
        if self.cfg.save and self.last_saved != self.trainer.iteration:
            self.save()
        self.writer.wait()
        self.stop.restore()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    # Loading ---------------------------------------------------------------------------------------
    def load(self) -> None:
        """Resume from ``checkpoint.load`` if it holds a checkpoint (collective over every rank)."""
        if not self.cfg.load:
            return
        info = find_checkpoint(self.cfg.load, self.cfg.load_iteration)
        if info is None:
            self._print(f"no {self.cfg.load}/latest_checkpointed_iteration.txt: starting from iteration 0")
            return
        check_model(info, self.signature)
        t = self.trainer
        model = self.sharded.model_targets(info)
        optimizer, states = self.sharded.optimizer_targets(info)
        same_layout = {"cp": 1, **info.meta.get("layout", {})} == self.layout  # saved before CP: cp 1
        rng = rng_targets(self.rank, info) if same_layout else {}
        read_tensors({**model, **optimizer, **rng}, info, self.group)
        self.sharded.finish_load()
        fields = {name: frozenset(f) for name, f in states.items()}
        if any(fields.values()):
            missing = next((n for n, f in fields.items() if f != max(fields.values(), key=len)), None)
            if missing is not None:
                raise CheckpointError(f"{info.path}: incomplete optimizer state for {missing}")
            t.optimizer.load_named_param_states(states)
        if rng:
            restore_rng(self.rank, rng, t.chunks[0].rng)
        t.load_state_dict(info.meta["trainer"])
        notes = [] if any(fields.values()) else ["no optimizer state: the optimizer starts fresh"]
        if not same_layout:
            notes.append(f"resharded from {info.meta.get('layout')} to {self.layout}; random generators not restored")
        self._print(f"loaded {info.path} (iteration {info.iteration})" + "".join(f"; {n}" for n in notes))
