"""One layout's prediction: per-rank memory, FLOPs, step time and MFU.

Step time, per rank (Narayanan et al. 2021 §3 for the terms; every communication term is the ring
algorithm's bytes over the link it crosses):

    compute   hardware FLOPs / world / (peak · efficiency); full recompute adds a forward (4/3 of the
              model FLOPs), selective adds the attention core's forward
    TP        per layer and microbatch 4 all-reduces (or all-gather + reduce-scatter pairs, the same
              bytes) of b·s·h activations, 6 with full recompute; 2·(t−1)/t of the bytes over NVLink
              (inter-node when t exceeds a node); not overlapped unless ``overlap``
    PP        one b·s·h/t message per microbatch, chunk and direction, across nodes
    CP        ring attention's K/V blocks, b·(s/c)·(g/t)·d each: per layer and microbatch 2·(c−1)
              forward and 4·(c−1) backward (K/V again and the fp32 dK/dV partial sums), plus the
              forward again under recomputation; the exchange runs beside the attention core, so
              only what exceeds the core's compute time is exposed
    bubble    (compute + TP + PP) × the bubble fraction that ``pipeline.simulate`` finds for the
              schedule at F = B_input = B_weight (exactly (p−1)/m for 1F1B, (p−1)/(v·m)
              interleaved, (p−1)/(3m) ZB-H1, the start-up (p−1)/(6m) for ZB-V with m ≥ 2p)
    EP        MoE layers: per layer and microbatch 4 all-to-alls (dispatch and combine, forward and
              backward; 6 with full recompute) of the k·b·s/(c·t) routed rows of h values, of which
              (EP − 1)/EP leave the rank under balanced routing (``all_to_all_bytes``); over NVLink
              while the ETP·EP ranks of an EP group share a node; not overlapped
    DP        fp32 gradients all-reduced over DP × CP (2·(n−1)/n of the bytes, n = d·c), or with the
              distributed optimizer
              reduce-scattered plus the parameters all-gathered; with ``overlap`` only what exceeds
              one microbatch's computation (Megatron reduces buckets during the last backward and
              gathers during the first forward) is exposed
    optimizer one memory-bound pass over parameters, gradients and Adam state
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from ..config import Config, ModelConfig, ParallelDims, padded_vocab_size, validate
from ..model.flops import model_flops_per_iteration
from ..pipeline import schedules, stages
from ..pipeline.simulate import simulate_schedule
from . import memory as M
from .devices import Device

RECOMPUTE = ("none", "selective", "full")
# Above this many (microbatch, chunk) pairs per rank the bubble comes from the closed form the
# simulator reproduces exactly (tests/test_plan.py), to keep --search fast.
SIMULATE_UP_TO = 4096


@dataclass(frozen=True)
class Setup:
    """Everything the prediction depends on besides the device."""

    model: ModelConfig
    vocab_size: int  # padded
    dims: ParallelDims
    micro_batch_size: int
    global_batch_size: int
    precision: str
    recompute: str = "none"
    distributed_optimizer: bool = False
    overlap: bool = False  # DP gradient/parameter and TP communication overlapped with computation
    causal_flops: bool = True  # report the attention core's causal half only (megatron_lite's MFU)
    causal_work: bool = True  # the attention kernel skips the masked half (flash/SDPA; not explicit)


def setup_from_config(cfg: Config, world_size: int, vocab_size: int, recompute: Optional[str] = None,
                      overlap: bool = False) -> Setup:
    """Validate ``cfg`` for ``world_size`` ranks and collect what the planner needs."""
    dims = validate(cfg, world_size)
    recompute = recompute or getattr(cfg.training, "recompute", "none")
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute: {recompute!r} is not one of {', '.join(RECOMPUTE)}")
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, dims.tp)
    return Setup(cfg.model, padded, dims, cfg.training.micro_batch_size, cfg.training.global_batch_size,
                 cfg.training.precision, recompute, cfg.optimizer.use_distributed_optimizer, overlap)


@lru_cache(maxsize=None)
def bubble_fraction(schedule: str, p: int, v: int, m: int) -> float:
    """Idle time / compute time of a pipeline rank, from the simulator (closed form when large)."""
    if p == 1:
        return 0.0
    if m * v > SIMULATE_UP_TO:
        return (p - 1) / m / {"interleaved": v, "zb1p": 3, "zbv": 6}.get(schedule, 1)
    return simulate_schedule(schedule, p, v, m).bubble_fraction


def _stage(setup: Setup, pp_rank: int) -> stages.StageShape:
    d = setup.dims
    counts = d.chunk_layers or stages.chunk_layers(setup.model.num_layers, d.pp, d.vpp)
    return stages.stage_shape(counts, d.pp, d.vpp, pp_rank, schedules.placement_of(d.pipeline_schedule))


def microbatch_activation_bytes(setup: Setup, pp_rank: int) -> float:
    """Activations one microbatch leaves on a rank of stage ``pp_rank`` (all its chunks)."""
    m, d = setup.model, setup.dims
    shard = M.Shard(d.tp, d.sequence_parallel, setup.micro_batch_size, d.cp)
    impl = M.megatron_lite_impl(m, setup.precision)
    stage = _stage(setup, pp_rank)
    moe = M.stage_moe_layers(m, d.pp, d.vpp, pp_rank, d.chunk_layers, schedules.placement_of(d.pipeline_schedule))
    total = (stage.layers - moe) * M.layer_activation_bytes(m, shard, impl, setup.recompute)
    if moe:
        total += moe * M.layer_activation_bytes(m, shard, impl, setup.recompute, moe=True)
    if stage.has_embedding:
        total += M.embedding_activation_bytes(m, shard, impl)
    if stage.has_head:
        total += M.head_activation_bytes(m, setup.vocab_size, shard, impl)
    return total


def activation_in_transit_bytes(setup: Setup, pp_rank: int) -> float:
    """The newest stage output, alive until its send completes (the executor frees every output's
    data once it is sent: Megatron's deallocate_output_tensor); nothing on a rank that sends none."""
    m, d = setup.model, setup.dims
    if d.pp == 1 or not _stage(setup, pp_rank).sends_activations:
        return 0.0
    seq = m.seq_length // d.tp if d.sequence_parallel else m.seq_length
    return setup.micro_batch_size * seq * m.hidden_size * M.megatron_lite_impl(m, setup.precision).act_bytes


def rank_memory(setup: Setup, pp_rank: int) -> M.Memory:
    """Bytes on a rank of pipeline stage ``pp_rank`` (any TP/DP index: they hold the same)."""
    m, d = setup.model, setup.dims
    placement = schedules.placement_of(d.pipeline_schedule)
    params = M.stage_parameters(m, setup.vocab_size, d.tp, d.pp, d.vpp, pp_rank, d.chunk_layers, placement, d.ep, d.etp)
    experts = M.stage_expert_parameters(m, d.pp, d.vpp, pp_rank, d.chunk_layers, placement, d.ep, d.etp)
    e = M.BYTES[setup.precision]
    per_param = M.optimizer_bytes_per_parameter(setup.precision)
    optimizer = (params - experts) * per_param + experts * per_param
    if setup.distributed_optimizer:  # dense state over DP × CP, expert state over expert-DP
        optimizer = (params - experts) * per_param / (d.dp * d.cp) + experts * per_param / d.edp
    in_flight = M.in_flight_microbatches(d.pipeline_schedule, d.pp, d.vpp, d.num_microbatches, pp_rank)
    activations = in_flight * microbatch_activation_bytes(setup, pp_rank) + activation_in_transit_bytes(setup, pp_rank)
    if setup.recompute == "full":  # the layer being recomputed holds its full activations
        shard = M.Shard(d.tp, d.sequence_parallel, setup.micro_batch_size, d.cp)
        activations += M.layer_activation_bytes(m, shard, M.megatron_lite_impl(m, setup.precision), "none")
    return M.Memory(params * e, params * M.FP32, optimizer, activations, in_flight)


def peak_memory(setup: Setup) -> M.Memory:
    """The fullest pipeline stage's memory."""
    return max((rank_memory(setup, r) for r in range(setup.dims.pp)), key=lambda mem: mem.total)


@dataclass(frozen=True)
class StepTime:
    """Seconds per iteration on every rank, by cause."""

    compute: float
    tp: float
    pp: float
    cp: float
    bubble: float
    dp: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.pp + self.cp + self.bubble + self.dp + self.optimizer

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def hardware_flops(setup: Setup) -> float:
    """FLOPs the GPUs execute per iteration: the model's, plus what recomputation repeats."""
    m = setup.model
    model = model_flops_per_iteration(m, setup.vocab_size, setup.global_batch_size, causal=setup.causal_work)
    if setup.recompute == "full":
        return model * 4 / 3
    if setup.recompute == "selective":
        causal = 0.5 if setup.causal_work else 1.0
        core = 2 * 2 * m.seq_length * m.hidden_size * causal  # QKᵀ and ·V, per token and layer
        return model + core * m.num_layers * m.seq_length * setup.global_batch_size
    return model


def _ring(bytes_: float, n: int, bandwidth: float, all_reduce: bool) -> float:
    if n == 1:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * bytes_ / bandwidth


def ring_send_bytes(setup: Setup) -> float:
    """Bytes one rank sends in ring attention per layer and microbatch (forward and backward)."""
    m, d = setup.model, setup.dims
    if d.cp == 1:
        return 0.0
    n = m.num_attention_heads
    g = m.num_query_groups or n
    block = setup.micro_batch_size * m.seq_length // d.cp * (g // d.tp) * (m.hidden_size // n)
    forwards = 2 if setup.recompute != "none" else 1  # recomputation runs the forward ring again
    return (d.cp - 1) * block * (2 * M.BYTES[setup.precision] * (forwards + 1) + 2 * M.FP32)


def all_to_all_bytes(setup: Setup) -> float:
    """Bytes one rank sends to other EP ranks per MoE layer and microbatch, forward and backward
    (the four exchanges of the EP line above; six under full recomputation)."""
    m, d = setup.model, setup.dims
    if d.ep == 1 or m.moe.num_experts is None:
        return 0.0
    rows = m.moe.router_topk * setup.micro_batch_size * m.seq_length / (d.cp * d.tp)
    exchanges = 6 if setup.recompute == "full" else 4
    return exchanges * rows * m.hidden_size * M.BYTES[setup.precision] * (d.ep - 1) / d.ep


def step_time(setup: Setup, dev: Device) -> StepTime:
    m, d = setup.model, setup.dims
    e = M.BYTES[setup.precision]
    compute = hardware_flops(setup) / d.world_size / (dev.peak_flops * dev.efficiency)
    node = dev.gpus_per_node
    bsh = setup.micro_batch_size * m.seq_length // d.cp * m.hidden_size * e
    tp_link = dev.nvlink_bandwidth if d.tp <= node else dev.internode_bandwidth
    per_layer = 6 if setup.recompute == "full" else 4
    tp = d.num_microbatches * (m.num_layers // d.pp) * per_layer * _ring(bsh, d.tp, tp_link, True)
    if setup.overlap:
        tp = 0.0
    pp_link = dev.internode_bandwidth if d.tp * d.dp >= node else dev.nvlink_bandwidth
    pp = 0.0 if d.pp == 1 else 2 * d.vpp * d.num_microbatches * (bsh / d.tp) / pp_link
    cp_link = dev.nvlink_bandwidth if d.tp * d.cp <= node else dev.internode_bandwidth
    layers_micro = d.num_microbatches * (m.num_layers // d.pp)
    core_flops = 3 * 2 * 2 * m.seq_length * m.hidden_size * 0.5 * m.seq_length * setup.micro_batch_size
    core = layers_micro * core_flops / d.cp / d.tp / (dev.peak_flops * dev.efficiency)
    cp = max(0.0, layers_micro * ring_send_bytes(setup) / cp_link - core)
    placement = schedules.placement_of(d.pipeline_schedule)
    moe_layers = max(M.stage_moe_layers(m, d.pp, d.vpp, r, d.chunk_layers, placement) for r in range(d.pp))
    ep_link = dev.nvlink_bandwidth if d.ep * d.etp <= node else dev.internode_bandwidth
    tp += d.num_microbatches * moe_layers * all_to_all_bytes(setup) / ep_link  # exposed, like TP's
    bubble = (compute + tp + pp + cp) * bubble_fraction(d.pipeline_schedule, d.pp, d.vpp, d.num_microbatches)

    params = max(M.stage_parameters(m, setup.vocab_size, d.tp, d.pp, d.vpp, r, d.chunk_layers, placement, d.ep, d.etp)
                 for r in range(d.pp))
    experts = max(M.stage_expert_parameters(m, d.pp, d.vpp, r, d.chunk_layers, placement, d.ep, d.etp)
                  for r in range(d.pp))
    replicas = d.dp * d.cp  # gradients are averaged (and optimizer states sharded) over DP × CP
    dp_link = dev.nvlink_bandwidth if d.tp * replicas <= node else dev.internode_bandwidth
    dp = _data_parallel_time(params - experts, replicas, dp_link, e, setup.distributed_optimizer)
    if experts:  # expert gradients over expert-DP
        edp_link = dev.nvlink_bandwidth if d.tp * replicas <= node else dev.internode_bandwidth
        dp += _data_parallel_time(experts, d.edp, edp_link, e, setup.distributed_optimizer)
    if setup.overlap:
        dp = max(0.0, dp - compute / d.num_microbatches)
    state = params * (M.optimizer_bytes_per_parameter(setup.precision) + M.FP32 + e)
    if setup.distributed_optimizer:
        state = state * ((params - experts) / replicas + experts / d.edp) / params
    optimizer = 2 * state / dev.hbm_bandwidth  # read and write once
    return StepTime(compute, tp, pp, cp, bubble, dp, optimizer)


def _data_parallel_time(params: float, replicas: int, link: float, e: int, distributed: bool) -> float:
    """fp32 gradients reduced over ``replicas`` ranks (all-reduce, or reduce-scatter plus the
    parameters' all-gather with the distributed optimizer)."""
    if distributed:
        return _ring(params * M.FP32, replicas, link, False) + _ring(params * e, replicas, link, False)
    return _ring(params * M.FP32, replicas, link, True)


@dataclass(frozen=True)
class Prediction:
    setup: Setup
    device: Device
    memory: M.Memory
    time: StepTime
    model_flops: float  # per iteration, causal or not as ``setup.causal_flops``

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device.memory_bytes

    @property
    def tflops_per_gpu(self) -> float:
        return self.model_flops / self.time.total / self.setup.dims.world_size / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu * 1e12 / self.device.peak_flops

    @property
    def tokens_per_s(self) -> float:
        return self.setup.global_batch_size * self.setup.model.seq_length / self.time.total

    def as_dict(self) -> dict:
        d = self.setup.dims
        return {
            "layout": {"tp": d.tp, "cp": d.cp, "pp": d.pp, "vpp": d.vpp, "dp": d.dp,
                       "micro_batch": self.setup.micro_batch_size,
                       "microbatches": d.num_microbatches, "schedule": d.pipeline_schedule,
                       "sequence_parallel": d.sequence_parallel, "ep": d.ep, "etp": d.etp},
            "recompute": self.setup.recompute, "distributed_optimizer": self.setup.distributed_optimizer,
            "device": self.device.name, "memory_bytes": self.memory.as_dict(), "fits": self.fits,
            "model_flops_per_iteration": self.model_flops, "step_time_s": self.time.as_dict(),
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "tokens_per_s": self.tokens_per_s,
        }


def predict(setup: Setup, dev: Device) -> Prediction:
    flops = model_flops_per_iteration(setup.model, setup.vocab_size, setup.global_batch_size,
                                      causal=setup.causal_flops)
    return Prediction(setup, dev, peak_memory(setup), step_time(setup, dev), flops)
