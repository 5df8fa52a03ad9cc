"""Checkpoints of a training run: what one holds, saving it, and resuming from one.

A ``Checkpointer`` receives the components it saves (as torchtitan's CheckpointManager does), not
the trainer: the parameters by name, the optimizer through its named-state protocol
(optim/optimizer.py: each DP rank's own state, nothing gathered), the model's random generators, a
train state with ``state_dict``/``load_state_dict`` (the trainer's iteration, consumed samples, loss
scale), the parallel layout and the model config. A checkpoint holds every parameter and its
optimizer state keyed by unsharded name (sharded.py), each rank's generators, and in meta.json the
train state, the model's shape signature, its full config and the layout; config.yaml holds the
run's resolved config.

When to save is the caller's: ``after_step`` saves on ``checkpoint.save_interval`` or when told the
run stops (the stop policy lives in training/preemption.py); ``finish`` saves the last iteration.
``checkpoint.async_save``: the state is copied to host memory, then a background thread writes it
while training continues; the next save and ``finish`` wait for it, and the tracker is updated only
when it is complete. DCP's collectives run on a dedicated gloo group, so the writer thread never
shares a group with training's collectives.

Loading (``load``, called by ``Trainer.resume``): the checkpoint named by ``checkpoint.load`` (the
tracker's iteration, or ``checkpoint.load_iteration``) is checked (files, version, model shape) and
read into this rank's shards in whatever layout this run has. Random generators are restored only
when the layout is the same (they are per rank). Optimizer state the checkpoint lacks starts fresh,
and fp32 master weights it lacks (a checkpoint saved in fp32, an imported HF model) are rebuilt from
the loaded parameters. Fine-tuning controls: ``checkpoint.finetune`` loads the weights only (the
iteration, optimizer, generators and data position start fresh); ``checkpoint.load_optimizer`` /
``checkpoint.load_rng`` = false skip those parts. ``checkpoint.use_checkpoint_model_config``: the run
takes its model architecture from the checkpoint (``config.py:with_checkpoint_model_config``,
before the config is validated).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import CheckpointConfig, ModelConfig, head_dim
from ..optim.optimizer import NamedStateOptimizer
from ..tensor_parallel import ModelRNG
from .sharded import ShardedState, restore_rng, rng_targets, rng_tensors
from .storage import CheckpointError, CheckpointInfo, find_checkpoint, host_copy, read_tensors, say, write_checkpoint

# The model config fields that decide the parameters' shapes (a checkpoint must agree on all of them).
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "normalization", "activation", "position_embedding", "add_bias_linear", "tie_embeddings",
    "add_qkv_bias", "qk_layernorm", "qk_layernorm_mode",
)


MOE_SHAPE_FIELDS = ("num_experts", "layer_freq", "first_dense_layers", "shared_expert_ffn_hidden_size",
                    "shared_expert_gate", "expert_bias")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def model_signature(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """What the parameter shapes depend on, with defaults resolved; ``vocab_size`` before padding."""
    sig = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    sig["num_query_groups"] = cfg.num_query_groups or cfg.num_attention_heads
    sig["ffn_hidden_size"] = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    sig["kv_channels"] = head_dim(cfg)
    sig["vocab_size"] = vocab_size
    if cfg.position_embedding == "learned":
        sig["seq_length"] = cfg.seq_length
    moe = cfg.moe
    if moe.num_experts is not None:  # which layers hold experts, how many, how wide
        sig.update({f"moe.{k}": getattr(moe, k) for k in MOE_SHAPE_FIELDS})
        sig["moe.ffn_hidden_size"] = moe.ffn_hidden_size or sig["ffn_hidden_size"]
    return sig


def model_meta(cfg: ModelConfig, vocab_size: int, padded_vocab_size: int) -> dict[str, Any]:
    """meta.json's description of the model: its shape signature, its whole config (``vocab_size``
    resolved to the unpadded vocabulary) and the padded vocabulary."""
    return {"model": model_signature(cfg, vocab_size),
            "model_config": dataclasses.asdict(dataclasses.replace(cfg, vocab_size=vocab_size)),
            "padded_vocab_size": padded_vocab_size}


def check_model(info: CheckpointInfo, expected: dict[str, Any]) -> None:
    """One line naming the first shape field where the checkpoint and this model differ."""
    saved = info.meta.get("model", {})
    for key, value in expected.items():
        if saved.get(key, value) != value:  # a key the saving version did not record is not checked
            raise CheckpointError(
                f"{info.path / 'meta.json'}: model.{key} is {saved.get(key)!r} in the checkpoint but {value!r} "
                "in this config; load it with the same model shape"
            )


def save_weights(
    root: str | Path, iteration: int, named_params: list[tuple[str, nn.Parameter]], model_config: ModelConfig,
    vocab_size: int, padded_vocab_size: int, config_yaml: str,
) -> Path:
    """A checkpoint of the parameters only (one process, TP = 1; no optimizer state, no generators),
    e.g. an imported model: training loads it in any layout, its masters rebuilt from these weights."""
    meta = {"trainer": {"iteration": iteration, "consumed_samples": 0},
            **model_meta(model_config, vocab_size, padded_vocab_size),
            "layout": {"tp": 1, "cp": 1, "pp": 1, "vpp": 1, "dp": 1}}
    return write_checkpoint(ShardedState(named_params).model_tensors(), meta, config_yaml, root, iteration)


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
    """Saves and loads one rank's training state (module docstring).

    ``named_params``: (name, parameter) of this rank's model chunks; ``optimizer``: their optimizer;
    ``model_rng``: the chunks' generators; ``train_state``: the loop's own state (JSON-serialisable);
    ``model_config``: the model, ``vocab_size`` the unpadded vocabulary; ``layout``: {tp, pp, vpp,
    dp} sizes; ``tp_rank``/``tp_size``: this rank's place in its TP group; ``config_yaml``: the
    resolved run config stored beside each checkpoint; ``experts``: the MoE layers' ExpertGroups;
    ``named_buffers``: persistent model buffers (an MoE router's expert bias), saved whole. Construction is collective (it creates the
    checkpoint group on every rank).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        named_params: list[tuple[str, nn.Parameter]],
        optimizer: NamedStateOptimizer,
        model_rng: ModelRNG,
        train_state: Stateful,
        model_config: ModelConfig,
        vocab_size: int,
        padded_vocab_size: int,
        layout: dict[str, int],
        rank: int,
        tp_rank: int,
        tp_size: int,
        config_yaml: str,
        experts=None,
        named_buffers: Sequence[tuple[str, torch.Tensor]] = (),
    ):
        self.cfg, self.optimizer, self.model_rng, self.train_state = cfg, optimizer, model_rng, train_state
        self.rank, self.layout, self.config_yaml = rank, dict(layout), config_yaml
        self.model_meta = model_meta(model_config, vocab_size, padded_vocab_size)
        active = bool(cfg.save or cfg.load)
        # Every rank creates it (new_group is collective); DCP's planning and barriers run on it.
        self.group = dist.new_group(backend="gloo") if active and dist.is_initialized() else None
        self.sharded = ShardedState(named_params, tp_rank, tp_size, experts, named_buffers)
        self.writer = BackgroundWriter()
        self.last_saved: Optional[int] = None

    # Saving ----------------------------------------------------------------------------------------
    def save(self) -> None:
        """Save the train state's iteration (collective over every rank); asynchronous with
        checkpoint.async_save."""
        self.writer.wait()
        self.optimizer.finish_param_gather()  # parameters updated by an overlapped all-gather
        start = time.perf_counter()
        tensors = {
            **self.sharded.model_tensors(),
            **self.sharded.optimizer_tensors(self.optimizer.named_param_states()),
            **rng_tensors(self.rank, self.model_rng),
        }
        train_state = self.train_state.state_dict()
        meta = {"trainer": train_state, **self.model_meta, "layout": self.layout}
        iteration = int(train_state["iteration"])
        if self.cfg.async_save:
            tensors = host_copy(tensors)
            blocked = time.perf_counter() - start
            self.writer.submit(lambda: self._write(tensors, meta, iteration, start, blocked))
        else:
            self._write(tensors, meta, iteration, start, None)
        self.last_saved = iteration

    def _write(self, tensors, meta, iteration: int, start: float, blocked: Optional[float]) -> None:
        path = write_checkpoint(tensors, meta, self.config_yaml, self.cfg.save, iteration, self.group,
                                self.cfg.keep_last)
        seconds = time.perf_counter() - start
        how = f"asynchronously; training blocked {blocked:.2f} s" if blocked is not None else "synchronously"
        say(f"saved {path} in {seconds:.2f} s ({how})")

    def after_step(self, iteration: int, stopping: bool = False) -> None:
        """Save when ``iteration`` is on the save interval or the run is ``stopping`` early."""
        interval = self.cfg.save_interval
        if self.cfg.save and (stopping or (interval and iteration % interval == 0)):
            self.save()

    def finish(self, iteration: int) -> None:
        """End of training: save ``iteration`` unless it is saved, wait for a background save, release
        the checkpoint group."""
        if self.cfg.save and self.last_saved != iteration:
            self.save()
        self.writer.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    # Loading ---------------------------------------------------------------------------------------
    def load(self) -> bool:
        """Resume from ``checkpoint.load`` if it holds a checkpoint (collective over every rank);
        returns whether one was loaded."""
        if not self.cfg.load:
            return False
        info = find_checkpoint(self.cfg.load, self.cfg.load_iteration)
        if info is None:
            say(f"no {self.cfg.load}/latest_checkpointed_iteration.txt: starting from iteration 0")
            return False
        check_model(info, self.model_meta["model"])
        cfg, notes = self.cfg, []
        if cfg.finetune:
            notes.append("fine-tuning: weights only; iteration, optimizer, generators and data position start fresh")
        model = self.sharded.model_targets(info)
        optimizer, states = {}, {}
        load_optimizer = cfg.load_optimizer and not cfg.finetune
        if load_optimizer:
            optimizer, states = self.sharded.optimizer_targets(info, self.optimizer.state_ranges())
        elif not cfg.finetune:
            notes.append("optimizer state not loaded (checkpoint.load_optimizer=false)")
        same_layout = {"cp": 1, **info.meta.get("layout", {})} == self.layout  # saved before CP: cp 1
        rng = rng_targets(self.rank, info) if same_layout and cfg.load_rng and not cfg.finetune else {}
        read_tensors({**model, **optimizer, **rng}, info, self.group)
        self.sharded.finish_load()
        fields = {name: frozenset(s.fields) for name, s in states.items()}
        complete = max(fields.values(), key=len, default=frozenset())
        missing = next((n for n, f in fields.items() if f != complete), None)
        if missing is not None:
            raise CheckpointError(f"{info.path}: incomplete optimizer state for {missing}")
        self.optimizer.load_named_param_states(states)  # masters from the loaded weights where none
        if rng and (skipped := restore_rng(self.rank, rng, self.model_rng)):
            notes.append(f"random generators restored except {' and '.join(skipped)}: those start from the seed")
        if not cfg.finetune:
            self.train_state.load_state_dict(info.meta["trainer"])
        if load_optimizer and not complete:
            notes.append("no optimizer state: the optimizer starts fresh")
        if not same_layout:
            notes.append(f"resharded from {info.meta.get('layout')} to {self.layout}; random generators not restored")
        elif not rng and not cfg.finetune:
            notes.append("random generators not restored (checkpoint.load_rng=false)")
        say(f"loaded {info.path} (iteration {info.iteration})" + "".join(f"; {n}" for n in notes))
        return True
