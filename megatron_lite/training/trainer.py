"""The training loop: one object that owns this rank's model chunks, data, optimizer and schedule.

One iteration:
  1. this DP rank's microbatches of the global batch (the sampler; the batch grows during a
     ``training.rampup_batch_size`` ramp, ``rampup.py``; only the fields this pipeline
     stage reads; under context parallelism only this CP rank's two chunks of each sequence);
  2. the pipeline schedule runs every microbatch's forward and backward over the model chunks
     (PP = 1 is the same code with one stage), accumulating fp32 gradients;
  3. gradients finished: sequence-parallel sums over TP, tied-embedding sum over the embedding group,
     average over DP × CP (optim/grads.py; each CP rank's loss is its share of the sequence's mean,
     ``masked_mean_over_cp``);
  4. AdamW step with the scheduled learning rate after clipping by the global norm;
  5. the loss (mean over the global batch) and throughput logged by the logging rank.

``train()`` first resumes from ``checkpoint.load`` (``resume()``; the Checkpointer receives the
parameters, optimizer, generators and this object as the train state), and after every iteration
asks the stop policy (preemption.py) whether the ranks agreed to stop early. ``profiling``
(profiling.py) wraps the chosen iterations.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import ops
from ..checkpoint.manager import Checkpointer
from ..checkpoint.sharded import persistent_buffers
from ..config import Config, ParallelDims, padded_vocab_size, to_yaml
from ..data import DataError, MicrobatchSampler, build_datasets, build_tokenizer, collate, stage_fields
from ..data.builder import describe_splits
from ..data.sampler import microbatch_loader
from ..model import build_model_chunks, model_flops_per_iteration
from ..model.flops import peak_flops
from .. import moe
from ..optim import (DistributedOptimizer, GradBuffer, NormRanks, Optimizer, finalize_grads, learning_rate,
                     overlaps_reduction)
from ..optim.loss_scaler import LossScaler
from ..optim.lr_schedule import check_resumed_schedule, schedule_parameters
from ..parallel.collectives import TPGroup
from ..parallel.context import CPGroup, local_positions, masked_mean_over_cp
from ..parallel.state import ParallelState, default_timeout
from ..pipeline import schedules
from ..pipeline.executor import run_schedule, save_trace
from ..data.tokenizer import Tokenizer
from .heartbeat import Heartbeat
from .metrics import IntervalAverage, MetricsLogger, console_line
from .preemption import StopAgreement, announce
from .profiling import Profiler
from .rampup import BatchRampup
from .watchdog import Watchdog

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """The peak FLOP/s of this GPU for runs in ``precision`` (``model.flops.peak_flops``); None on CPU
    or an unknown GPU."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return peak_flops(torch.cuda.get_device_name(device), precision, tf32)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""


class Trainer:
    """Builds everything for this rank from a validated config and runs ``train()``."""

    def __init__(self, cfg: Config, dims: ParallelDims, state: ParallelState,
                 tokenizer: Optional[Tokenizer] = None, heartbeat: Optional[Heartbeat] = None):
        """``tokenizer``: the one the entry point already built (else built here); ``heartbeat``:
        this rank's beats, which the watchdog's lines report from (None: not reported)."""
        self.cfg, self.dims, self.state = cfg, dims, state
        m, t = cfg.model, cfg.training
        self.device = state.device
        self.dtype = DTYPES[t.precision]
        ops.use_backend(m.kernel_backend)
        if state.rank == 0:
            print(f"kernel backend: {ops.describe()}", flush=True)

        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.data.tokenizer)
        self.unpadded_vocab_size = m.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(self.unpadded_vocab_size, m.make_vocab_size_divisible_by, dims.tp)
        self.tp = TPGroup.from_state(state, dims.sequence_parallel)
        self.cp = CPGroup.from_state(state)
        # The token positions this CP rank reads from every sample (None: all of them).
        self.positions = local_positions(m.seq_length, dims.cp, state.cp_rank) if dims.cp > 1 else None
        self.placement = schedules.placement_of(dims.pipeline_schedule)
        self.expert_groups = moe.ExpertGroups.from_state(state)
        self.chunks = build_model_chunks(
            m, self.vocab_size, tp=self.tp, seed=t.seed, pp_rank=state.pp_rank, pp_size=dims.pp,
            vpp_size=dims.vpp, device=self.device, recompute=t.recompute, recompute_num_layers=t.recompute_num_layers,
            cp=self.cp, unpadded_vocab_size=self.unpadded_vocab_size, layer_counts=dims.chunk_layers,
            placement=self.placement, experts=self.expert_groups,
        )
        # Which ends of the model this rank holds (the V placement puts both on the first stage).
        self.has_embedding = any(chunk.spec.has_embedding for chunk in self.chunks)
        self.has_head = any(chunk.spec.has_head for chunk in self.chunks)
        for chunk in self.chunks:
            chunk.to(self.dtype)
        self.named_params = _unique_named_params(self.chunks)
        self.params = [p for _, p in self.named_params]
        names = [n for n, _ in self.named_params]
        o = cfg.optimizer
        dense = [p for p in self.params if not p.meta.expert_parallel]
        expert = [p for p in self.params if p.meta.expert_parallel]
        self.grads = GradBuffer(  # parameters are replicated over DP × CP
            dense, state.dp_cp_group, state.dp_cp_size, state.dp_cp_rank,
            reduce_scatter=o.use_distributed_optimizer,
            overlap=overlaps_reduction(o.overlap_grad_reduce, state.dp_cp_group),
            bucket_elements=o.grad_bucket_elements,
        )
        # Experts are replicated over the expert-data-parallel group (GradBuffer: grad_divisor).
        self.expert_grads = GradBuffer(
            expert, state.edp_group, state.edp_size, state.edp_rank, reduce_scatter=o.use_distributed_optimizer,
            overlap=overlaps_reduction(o.overlap_grad_reduce, state.edp_group),
            bucket_elements=o.grad_bucket_elements, grad_divisor=state.dp_cp_size,
        ) if expert else None
        buffers = [b for b in (self.grads, self.expert_grads) if b is not None]
        if o.use_distributed_optimizer:  # each rank holds a distinct gradient slice: norm over the world
            ranks = NormRanks(tp=state.tp_rank, etp=state.etp_rank if expert else 0)
            self.optimizer = DistributedOptimizer(
                params=self.params, grads=buffers, cfg=o, norm_group=None, tp_rank=ranks,
                overlap_param_gather=o.overlap_param_gather, names=names,
            )
            if o.overlap_param_gather:
                self.optimizer.install_param_gather_hooks(self.chunks)
        elif expert:  # experts differ across EP ranks, which lie in DP: the norm is over the world
            ranks = NormRanks(state.tp_rank, state.etp_rank, state.dp_cp_rank, state.edp_rank)
            self.optimizer = Optimizer(self.params, o, norm_group=None, tp_rank=ranks, names=names)
        else:
            self.optimizer = Optimizer(self.params, o, norm_group=state.mp_group, tp_rank=state.tp_rank, names=names)

        gbs = t.global_batch_size
        self.rampup = BatchRampup.from_config(t.rampup_batch_size, gbs)  # None: gbs from the start
        # The samples the train_iters iterations read (fewer than train_iters × gbs under a ramp).
        self.train_samples = self.rampup.consumed_after(t.train_iters) if self.rampup else t.train_iters * gbs
        evaluations = t.train_iters // t.eval_interval + 1
        counts = (self.train_samples, evaluations * t.eval_iters * gbs, t.eval_iters * gbs)
        splits = build_datasets(cfg.data, self.tokenizer, m.seq_length, t.seed, counts)
        self.train_data, self.valid_data, self.test_data = splits
        data_lines = describe_splits(cfg.data, splits, counts)
        if self.train_data is None:
            raise DataError(data_lines[0].removeprefix("data: "))
        if state.rank == 0:
            print("\n".join(data_lines), flush=True)
        self.fields = stage_fields(self.has_embedding, self.has_head)
        self.iteration = 0
        self.consumed_samples = 0
        self._train_batches = None  # this rank's microbatches per iteration, from consumed_samples on
        self.skipped_iterations = 0
        self.consecutive_skips = 0
        self.scaler = LossScaler.for_precision(
            t.precision, t.loss_scale, t.initial_loss_scale, t.loss_scale_window, t.hysteresis, t.min_loss_scale
        )

        seq = m.seq_length // dims.cp
        seq = seq // dims.tp if dims.sequence_parallel else seq
        self.activation_shape = (t.micro_batch_size, seq, m.hidden_size)
        self.actions = schedules.schedule(dims.pipeline_schedule, dims.pp, dims.vpp, dims.num_microbatches, state.pp_rank)
        self.eval_actions = schedules.schedule(
            dims.pipeline_schedule, dims.pp, dims.vpp, dims.num_microbatches, state.pp_rank, forward_only=True
        )
        self.flops_per_iteration = model_flops_per_iteration(m, self.vocab_size, gbs)
        # Megatron-LM's papers and logs count the full s×s attention matrix: reported beside ours.
        self.flops_per_iteration_noncausal = model_flops_per_iteration(m, self.vocab_size, gbs, causal=False)
        self.peak_flops = device_peak_flops(self.device, t.precision)
        # The logging rank holds the loss: the stage with the head (the last; the first under zbv),
        # first TP and CP rank, first DP replica.
        self.is_logging_rank = (self.has_head and state.tp_rank == 0 and state.cp_rank == 0
                                and state.dp_rank == 0)
        self.logger: Optional[MetricsLogger] = None
        self.watchdog = Watchdog(state, t.step_timeout, default_timeout(cfg.parallel.distributed_timeout_minutes),
                                 heartbeat=heartbeat)
        self._interval = IntervalAverage()
        self.profiler = Profiler(cfg.profiling, state.rank, self.device, Path(cfg.logging.dir) / "profile")
        self.checkpointer = Checkpointer(
            cfg.checkpoint, named_params=self.named_params, optimizer=self.optimizer, model_rng=self.chunks[0].rng,
            train_state=self, model_config=m, vocab_size=self.unpadded_vocab_size, padded_vocab_size=self.vocab_size,
            layout={"tp": dims.tp, "cp": dims.cp, "pp": dims.pp, "vpp": dims.vpp, "dp": dims.dp}, rank=state.rank,
            tp_rank=state.tp_rank, tp_size=state.tp_size, config_yaml=to_yaml(cfg),
            experts=self.expert_groups, named_buffers=persistent_buffers(self.chunks),
        )
        self.resumed: Optional[bool] = None  # set by resume()

    def resume(self) -> bool:
        """Load ``checkpoint.load`` if it holds a checkpoint (collective; once, before training).
        Returns whether a checkpoint was loaded."""
        if self.resumed is None:
            self.resumed = self.checkpointer.load()
        return self.resumed

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state, JSON-serialisable (the rest of a checkpoint is the model, optimizer
        and RNGs); checkpoints store it in meta.json and hand it back to ``load_state_dict``."""
        state = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "skipped_iterations": self.skipped_iterations,
                 "lr_schedule": schedule_parameters(self.cfg.optimizer, self.cfg.training.train_iters)}
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s keys; a loss scaler's state only if both runs use fp16.

        The learning-rate schedule must be the checkpoint's unless
        ``optimizer.override_opt_param_scheduler`` (ConfigError otherwise); as in Megatron, a resume
        without the optimizer state (``checkpoint.load_optimizer=false``) starts its own schedule."""
        if "lr_schedule" in state and self.cfg.checkpoint.load_optimizer:
            note = check_resumed_schedule(
                state["lr_schedule"], schedule_parameters(self.cfg.optimizer, self.cfg.training.train_iters),
                self.cfg.optimizer.override_opt_param_scheduler)
            if note and self.state.rank == 0:
                print(note, flush=True)
        self.iteration, self.consumed_samples = int(state["iteration"]), int(state["consumed_samples"])
        self.skipped_iterations = int(state.get("skipped_iterations", 0))
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])

    # One step ----------------------------------------------------------------------------------
    def _forward_step(self, chunk_index: int, x: Optional[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chunk = self.chunks[chunk_index]
        if x is None:
            x = batch["tokens"].to(self.device)
        if not chunk.spec.has_head:
            return chunk(x)
        losses = chunk(x, batch["labels"].to(self.device))
        loss = masked_mean_over_cp(losses, batch["loss_mask"].to(self.device), self.cp)
        if self.scaler is not None and chunk.training:
            loss = self.scaler.scale_loss(loss)  # reported losses are divided back in train_step
        return loss

    def _sampler(self, total_samples: int, consumed_samples: int, rampup: Optional[BatchRampup] = None) -> MicrobatchSampler:
        """This DP rank's microbatch indices of global batches from ``consumed_samples`` on."""
        t = self.cfg.training
        return MicrobatchSampler(
            total_samples=total_samples, consumed_samples=consumed_samples, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, dp_rank=self.state.dp_rank, dp_size=self.state.dp_size,
            rampup=rampup,
        )

    def global_batch_size(self) -> int:
        """The global batch size of the next iteration (smaller during a batch-size ramp-up)."""
        return self.rampup.batch_size(self.consumed_samples) if self.rampup else self.cfg.training.global_batch_size

    def _microbatches(self, dataset, consumed: int) -> list[dict[str, torch.Tensor]]:
        sampler = self._sampler(consumed + self.cfg.training.global_batch_size, consumed)
        return [collate(dataset, indices, self.fields, self.positions) for indices in next(iter(sampler))]

    def _global_mean(self, loss: Optional[torch.Tensor]) -> float:
        """The head stage's mean loss averaged over DP × CP (NaN on other stages, which have none)."""
        if not self.has_head:
            return math.nan
        loss = loss.detach().float().reshape(1).clone()
        if self.state.dp_cp_size > 1:
            dist.all_reduce(loss, group=self.state.dp_cp_group)
            loss /= self.state.dp_cp_size
        return loss.item()

    def train_step(self) -> dict[str, float]:
        """Run one iteration; returns loss (logging rank only, else NaN), grad norm and lr.

        A step with non-finite gradients anywhere is skipped on every rank (fp16 overflow, or a NaN
        in any precision): the iteration and consumed samples advance, the learning-rate schedule does
        not (it follows the applied steps, as Megatron's). ``training.max_skipped_steps`` skips in a
        row raise TrainingStopped, not counting fp16's warm-up search for a loss scale (skips before
        the first applied step while the scale can still halve).
        """
        for chunk in self.chunks:
            chunk.train()
        batch_size = self.global_batch_size()
        microbatches = batch_size // (self.cfg.training.micro_batch_size * self.state.dp_size)
        self.grads.start_step(microbatches)
        if self.expert_grads is not None:
            self.expert_grads.start_step(microbatches)
        # The MoE balancing losses' backward scale: the LM loss's (1 / microbatches × the loss scale).
        moe.set_loss_scale(self.chunks, (self.scaler.scale if self.scaler is not None else 1.0) / microbatches)
        if self._train_batches is None:  # created at the first step, so a resume sets consumed_samples first
            sampler = self._sampler(self.train_samples, self.consumed_samples, self.rampup)
            self._train_batches = microbatch_loader(
                self.train_data, sampler, self.fields, self.cfg.data.num_workers, self.positions
            )
        batches = next(self._train_batches)
        trace: Optional[list] = [] if self.cfg.parallel.pipeline_trace and self.iteration == 1 else None
        d = self.dims
        actions = self.actions if microbatches == d.num_microbatches else schedules.schedule(
            d.pipeline_schedule, d.pp, d.vpp, microbatches, self.state.pp_rank)
        loss = run_schedule(
            actions, self.chunks, self.state, batches, self._forward_step,
            self.activation_shape, self.dtype, trace=trace, on_action=self.watchdog.on_action,
            placement=self.placement,
        )
        if trace is not None:
            save_trace(self.cfg.parallel.pipeline_trace, trace, self.state, d.pipeline_schedule, d.vpp, microbatches)
        finalize_grads(self.grads, self.state, self.expert_grads)
        applied_steps = self.iteration - self.skipped_iterations
        lr = learning_rate(applied_steps, self.cfg.optimizer, self.cfg.training.train_iters)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.scaler is not None:
            self.scaler.unscale_(self.grads.data)
            if self.expert_grads is not None:
                self.scaler.unscale_(self.expert_grads.data)
        grad_norm = self.optimizer.step(lr)  # not finite: skipped on every rank (agreed in its reduction)
        # MoE: the step's routing statistics over the stage, the expert-bias update (also after a
        # skipped step: the tokens were routed).
        moe_stats = moe.after_step(self.chunks, self.expert_groups, microbatches * self.dims.dp)
        finite = math.isfinite(grad_norm)
        if finite:
            self.consecutive_skips = 0
        else:
            grad_norm = math.nan
            self.skipped_iterations += 1
            searching = applied_steps == 0 and self.scaler is not None and self.scaler.can_lower
            self.consecutive_skips += 0 if searching else 1
        if self.scaler is not None:
            self.scaler.update(found_inf=not finite)
        self.iteration += 1
        self.consumed_samples += batch_size
        limit = self.cfg.training.max_skipped_steps
        if self.consecutive_skips >= limit:
            raise TrainingStopped(
                f"{limit} consecutive iterations (up to {self.iteration}) had inf/NaN gradients and were "
                "skipped (training.max_skipped_steps); nothing was saved after the last good step: "
                "resume from the last checkpoint with a lower optimizer.lr or fp16 → bf16"
            )
        loss = self._global_mean(loss) / scale
        if self.dims.experts:
            moe_stats = moe.moe_metrics(moe_stats, self.state.pp_group, self.state.pp_size)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale,
                "skipped_iterations": self.skipped_iterations, "global_batch_size": batch_size, **moe_stats}

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float:
        """Mean loss over ``eval_iters`` global batches (forward only) of the validation split (a
        fresh slice at each evaluation) or of the test split (its first batches)."""
        t = self.cfg.training
        for chunk in self.chunks:
            chunk.eval()
        total = 0.0
        dataset = self.valid_data if split == "valid" else self.test_data
        start = (self.iteration // t.eval_interval) * t.eval_iters * t.global_batch_size if split == "valid" else 0
        for k in range(t.eval_iters):
            batches = self._microbatches(dataset, start + k * t.global_batch_size)
            loss = run_schedule(
                self.eval_actions, self.chunks, self.state, batches, self._forward_step,
                self.activation_shape, self.dtype, forward_only=True, on_action=self.watchdog.on_action,
                placement=self.placement,
            )
            total += self._global_mean(loss)
        return total / max(1, t.eval_iters)

    # The loop ----------------------------------------------------------------------------------
    def train(self) -> None:
        """Resume (if not done yet), then train to ``training.train_iters`` or an agreed early stop."""
        self.resume()
        stop = StopAgreement(self.cfg.checkpoint.save is not None, self.cfg.training.exit_duration_mins, self.device)
        try:
            self._loop(stop)
        finally:
            stop.restore()
            self.watchdog.stop()

    def _loop(self, stop: StopAgreement) -> None:
        t, log = self.cfg.training, self.cfg.logging
        if self.is_logging_rank:
            self.logger = MetricsLogger(log, self.cfg)
        run_start = time.time()
        start_iteration = self.iteration
        if self.iteration == 0:
            self._log_eval()  # the starting point, about ln(vocabulary size)
        stop_reason = None
        while self.iteration < t.train_iters and stop_reason is None:
            start = time.perf_counter()
            with self.watchdog.watch(f"iteration {self.iteration + 1}", calibrate=True), \
                    self.profiler.iteration(self.iteration + 1):
                out = self.train_step()
            elapsed = time.perf_counter() - start
            if self.logger is not None:
                self._log_train(out, elapsed, run_start, start_iteration)
            if t.eval_interval and self.iteration % t.eval_interval == 0 and self.iteration < t.train_iters:
                self._log_eval()
            stop_reason = stop.reason()  # the same on every rank
            if stop_reason is not None and self.state.rank == 0:
                announce(stop_reason, self.iteration, saving=bool(self.cfg.checkpoint.save))
            # Saves on checkpoint.save_interval, and when the ranks agree to stop early (a preemption
            # signal or training.exit_duration_mins).
            with self.watchdog.watch(f"checkpointing after iteration {self.iteration}", collective_bound=True):
                self.checkpointer.after_step(self.iteration, stopping=stop_reason is not None)
        self.profiler.finish(self.iteration)  # a run that stopped inside the traced range
        self.optimizer.finish_param_gather()
        with self.watchdog.watch(f"the final checkpoint at iteration {self.iteration}", collective_bound=True):
            self.checkpointer.finish(self.iteration)
        if stop_reason is None or not stop_reason.startswith("signal"):
            self._log_eval()
            if self.iteration >= t.train_iters:
                self._log_eval("test")
        if self.logger is not None:
            print(f"metrics: {self.logger.path}  (plot: python scripts/plot_metrics.py {self.logger.path})", flush=True)
            self.logger.close()

    def _log_train(self, out: dict, elapsed: float, run_start: float, start_iteration: int) -> None:
        t = self.cfg.training
        done = self.iteration - start_iteration
        eta = (time.time() - run_start) / done * (t.train_iters - self.iteration)
        share = out["global_batch_size"] / t.global_batch_size  # of the full batch's work (a ramp-up)
        tokens = out["global_batch_size"] * self.cfg.model.seq_length
        tflops = share * self.flops_per_iteration / elapsed / self.state.world_size / 1e12
        tflops_noncausal = share * self.flops_per_iteration_noncausal / elapsed / self.state.world_size / 1e12
        record = {
            "iteration": self.iteration, "consumed_samples": self.consumed_samples,
            "global_batch_size": out["global_batch_size"], "loss": out["loss"],
            "lr": out["lr"], "grad_norm": out["grad_norm"], "ms_per_iter": elapsed * 1e3,
            "tokens_per_s": tokens / elapsed, "tflops_per_device": tflops,
            "tflops_per_device_noncausal": tflops_noncausal,
            "mfu": tflops * 1e12 / self.peak_flops if self.peak_flops else None,
            "mfu_noncausal": tflops_noncausal * 1e12 / self.peak_flops if self.peak_flops else None,
            "peak_memory_gb": peak_memory_gb(self.device), "eta_s": eta,
            "loss_scale": out["loss_scale"], "skipped_iterations": out["skipped_iterations"],
            **{k: v for k, v in out.items() if k.startswith("moe/")},
        }
        self._interval.add(record)
        show = self.iteration % self.cfg.logging.log_interval == 0 or self.iteration == t.train_iters
        line = console_line(self._interval.take(), t.train_iters) if show else None
        if line is not None and self.dims.experts:
            line += " | " + moe.console_part(record)
        self.logger.log(record, line)

    def _log_eval(self, split: str = "valid") -> None:
        dataset = self.valid_data if split == "valid" else self.test_data
        if not self.cfg.training.eval_iters or dataset is None:
            return
        what = "validation" if split == "valid" else "test"
        with self.watchdog.watch(f"{what} at iteration {self.iteration}", scale=self.cfg.training.eval_iters):
            loss = self.evaluate(split)
        if self.logger is not None:
            self.logger.log(
                {"iteration": self.iteration, "split": split, "loss": loss},
                f"{what} at iteration {self.iteration}: loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}",
            )


def _unique_named_params(chunks) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every chunk; names are global (``layers.9.mlp.fc1.weight``)."""
    seen: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            seen.setdefault(id(p), (name, p))
    return list(seen.values())


def describe_run(cfg: Config, dims: ParallelDims, trainer: Trainer) -> dict[str, Any]:
    """What rank 0 prints at start-up."""
    n_params = sum(p.numel() for p in trainer.params)
    return {
        "layout": f"TP={dims.tp} CP={dims.cp} PP={dims.pp} VPP={dims.vpp} DP={dims.dp}"
                  + (f" experts ETP={dims.etp} EP={dims.ep} EDP={dims.edp}" if dims.experts else ""),
        "schedule": dims.pipeline_schedule, "microbatches": dims.num_microbatches,
        "sequence_parallel": dims.sequence_parallel, "vocab_size_padded": trainer.vocab_size,
        "parameters_on_rank0": n_params, "precision": cfg.training.precision,
    }
