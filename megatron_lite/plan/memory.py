"""Per-rank memory of a training layout, from the model's shapes: parameters, gradients, optimizer
state and activations, before anything is launched.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", §4): a layer stores, per token, its inputs to every operator whose backward needs them. The
paper's count for Megatron (16-bit activations, 1-byte dropout masks, explicit softmax attention) is
34·s·b·h + 5·a·s²·b bytes per layer, divided by t under tensor + sequence parallelism (the
column-parallel layers keep their input's sequence shard and all-gather it again in the backward, as
megatron_lite's do: tensor_parallel/layers.py).
``layer_activation_bytes`` sums the same terms one by one with the implementation's choices as
parameters (``Impl``), so that ``MEGATRON`` reproduces the paper's formula exactly and
``megatron_lite_impl`` what this code base saves (measured with saved-tensor hooks in
tests/test_plan.py). Where megatron_lite differs from the paper's Megatron:

- torch's SDPA (the default without dropout) keeps its output and log-sum-exp, never the s×s scores;
- dropout masks are stored in the activation dtype, not as bytes;
- norms keep fp32 statistics, and the unfused (torch backend) RMSNorm fp32 copies of its input and
  normalised output; the explicit attention's softmax keeps its fp32 output.

Recomputation (Korthikanti §5): ``selective`` recomputes the attention core (drops the s×s terms);
``full`` keeps each layer's input only and recomputes the layer in the backward, which needs one
layer's activations at a time.

Context parallelism (c ranks per sequence) divides every sequence-proportional term by c: a rank
holds s/c tokens of each sequence. Its ring attention keeps what flash attention keeps (q, k, v, the
output and the fp32 log-sum-exp, never the s×s probabilities) whatever the attention backend; the
K/V blocks in flight are freed after each layer's attention and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Sequence

from .. import ops
from ..config import ModelConfig, head_dim, moe_layers
from ..pipeline.schedules import LOOPED
from ..pipeline.stages import chunk_layers as chunk_layer_counts
from ..pipeline.stages import stage_shape

FP32 = 4
INDEX_BYTES = 8  # int64 token ids / gather indices
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Impl:
    """What an implementation stores; see the module docstring."""

    act_bytes: int  # bytes per activation element
    mask_bytes: int  # bytes per dropout-mask element
    flash_attention: bool  # attention keeps output + log-sum-exp, not the s×s probabilities
    q_copy: bool = False  # the query heads are copied out of the fused QKV output
    rmsnorm_keeps_output: bool = False  # an unfused RMSNorm also keeps x/rms for the weight's grad
    softmax_bytes: int = 0  # bytes per attention-probability element; 0: the activation dtype's


# Megatron-LM as Korthikanti et al. count it (bf16/fp16).
MEGATRON = Impl(act_bytes=2, mask_bytes=1, flash_attention=False)


def megatron_lite_impl(model: ModelConfig, precision: str) -> Impl:
    """megatron_lite's choices for ``model`` (attention backend, dropout) at ``precision``."""
    e = BYTES[precision]
    sdpa = model.attention_backend == "sdpa" or (model.attention_backend == "auto" and model.dropout == 0.0)
    grouped = (model.num_query_groups or model.num_attention_heads) != model.num_attention_heads
    return Impl(act_bytes=e, mask_bytes=e, flash_attention=sdpa, q_copy=grouped,
                rmsnorm_keeps_output=ops.backend() == "torch", softmax_bytes=FP32)


@dataclass(frozen=True)
class Shard:
    """How one rank sees the model: TP size, sequence parallelism, micro batch, CP size."""

    tp: int
    sequence_parallel: bool
    micro_batch: int
    cp: int = 1

    def tokens(self, m: ModelConfig) -> float:
        """Tokens of one microbatch on this rank: b · s / c."""
        return m.seq_length * self.micro_batch / self.cp


def layer_activation_bytes(m: ModelConfig, shard: Shard, impl: Impl, recompute: str = "none",
                           dropout: bool | None = None, moe: bool = False) -> float:
    """Bytes one transformer layer stores for the backward, for one microbatch, on one TP rank.

    ``dropout`` defaults to ``m.dropout > 0`` (Korthikanti's count assumes dropout: pass True).
    ``moe``: the layer's MLP is a mixture of experts (``moe_mlp_bytes_per_token``).
    """
    s, b, h, t = m.seq_length, shard.micro_batch, m.hidden_size, shard.tp
    n, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d, f = head_dim(m), m.ffn_hidden_size or 4 * h
    e, mask = impl.act_bytes, impl.mask_bytes
    dropout = m.dropout > 0 if dropout is None else dropout
    # Under SP the residual stream is split by sequence, and the column-parallel layers keep their
    # input's shard (gathered again in the backward).
    sp = t if shard.sequence_parallel else 1
    tokens = shard.tokens(m)
    if recompute == "full":
        return tokens * h * e / sp  # the layer's input; the rest is recomputed
    per_token = 0.0
    per_token += 2 * norm_bytes(m, impl) / sp
    # Attention: QKV input, Q K V, the core, the output projection's input, the dropout mask.
    per_token += h * e / sp
    per_token += (n + 2 * g) * d * e / t
    if impl.q_copy or (m.position_embedding == "rope" and impl is not MEGATRON):
        per_token += n * d * e / t  # rotated (or copied) queries
    if m.position_embedding == "rope" and impl is not MEGATRON:
        per_token += g * d * e / t  # rotated keys
    if impl.flash_attention or shard.cp > 1:
        per_token += n * FP32 / t  # log-sum-exp per head; the output is the projection's input below
    elif recompute != "selective":
        # softmax output, dropout mask, dropout output: a·s values each per token (a/t per rank)
        softmax = impl.softmax_bytes or e
        per_token += n * s * (softmax + (mask + e if dropout else 0)) / t
    per_token += h * e / t  # output projection input
    per_token += h * mask / sp if dropout else 0
    # MLP: input, activation input(s), output projection input, dropout mask.
    per_token += h * e / sp
    per_token += moe_mlp_bytes_per_token(m, impl, sp) if moe else mlp_bytes_per_token(m, f, impl) / t
    per_token += h * mask / sp if dropout else 0
    return tokens * per_token


def mlp_bytes_per_token(m: ModelConfig, f: int, impl: Impl) -> float:
    """An MLP of width f after its input: activation input(s) and the second linear's input."""
    e = impl.act_bytes
    return (3 * f * e if m.activation == "swiglu" else f * e) + f * e  # [gate | up], silu(gate) / GeLU input


def moe_mlp_bytes_per_token(m: ModelConfig, impl: Impl, sp: int) -> float:
    """An MoE layer per routed token of this rank (after the input it shares with the dense MLP),
    with balanced routing: fp32 router logits and scores, k dispatched rows (the grouped GEMM's
    input), k experts' activations (ETP ranks each keep their slice of ETP× the rows: the same
    bytes), k expert outputs for the weighted combine, and the shared expert (tensor-parallel)."""
    moe, e = m.moe, impl.act_bytes
    f = moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    per_token = 2 * moe.num_experts * FP32  # logits, scores
    per_token += moe.router_topk * (2 * m.hidden_size * e + mlp_bytes_per_token(m, f, impl))
    if moe.shared_expert_ffn_hidden_size:
        per_token += mlp_bytes_per_token(m, moe.shared_expert_ffn_hidden_size, impl)
    return per_token / sp  # each of the TP ranks routes its s/t tokens (MoE with TP needs SP)


def norm_bytes(m: ModelConfig, impl: Impl) -> float:
    """What a norm keeps per token: its input, plus (not in the paper's count) fp32 statistics, mean
    and 1/std for LayerNorm, 1/rms for RMSNorm, and the unfused RMSNorm's normalised output."""
    if impl is MEGATRON:
        return m.hidden_size * impl.act_bytes
    if m.normalization == "rmsnorm" and impl.rmsnorm_keeps_output:
        return 2 * m.hidden_size * FP32 + FP32  # the unfused op works on fp32 copies of x and x/rms
    if m.normalization == "rmsnorm":
        return m.hidden_size * impl.act_bytes + FP32
    return m.hidden_size * impl.act_bytes + 2 * FP32


def head_activation_bytes(m: ModelConfig, vocab_size: int, shard: Shard, impl: Impl) -> float:
    """Final norm, output layer and vocab-parallel cross-entropy (fp32 softmax) of one microbatch."""
    h, t = m.hidden_size, shard.tp
    sp = t if shard.sequence_parallel else 1
    per_token = (norm_bytes(m, impl) + h * impl.act_bytes) / sp + vocab_size / t * FP32  # norm, head input
    per_token += INDEX_BYTES + 2 + 2 * FP32  # target index, owned/ignored masks, max and Σexp
    return shard.tokens(m) * per_token


def embedding_activation_bytes(m: ModelConfig, shard: Shard, impl: Impl) -> float:
    """Token ids kept by the lookup (and, with TP, the out-of-shard mask and local ids)."""
    per_token = INDEX_BYTES + (INDEX_BYTES + 1 if shard.tp > 1 else 0)
    if m.dropout > 0:
        sp = shard.tp if shard.sequence_parallel else 1
        per_token += m.hidden_size * impl.mask_bytes / sp
    return shard.tokens(m) * per_token


def korthikanti_layer_bytes(m: ModelConfig, shard: Shard, recompute: str = "none") -> float:
    """The paper's closed form per layer: s·b·h·(34/t + 5·a·s/(h·t)) with SP, s·b·h·(10 + 24/t +
    5·a·s/(h·t)) without; selective drops the 5·a·s/h term, full keeps 2·s·b·h (/t with SP)."""
    s, b, h, a, t = m.seq_length, shard.micro_batch, m.hidden_size, m.num_attention_heads, shard.tp
    if recompute == "full":
        return 2 * s * b * h / (t if shard.sequence_parallel else 1)
    attention = 0 if recompute == "selective" else 5 * a * s / (h * t)
    linear = 34 / t if shard.sequence_parallel else 10 + 24 / t
    return s * b * h * (linear + attention)


# Parameters ---------------------------------------------------------------------------------------
def layer_parameters(m: ModelConfig, tp: int, moe: bool = False) -> int:
    """Parameters of one transformer layer on one TP rank (replicated norms and row biases whole);
    for an MoE layer (``moe``) those outside the experts: router, shared expert (and its gate)."""
    h, n = m.hidden_size, m.num_attention_heads
    g, d, f = m.num_query_groups or n, head_dim(m), m.ffn_hidden_size or 4 * h
    bias = m.add_bias_linear
    norm = 2 * h if m.normalization == "layernorm" else h
    count = 2 * norm
    count += h * (n + 2 * g) * d // tp + ((n + 2 * g) * d // tp if bias or m.add_qkv_bias else 0)  # QKV
    if m.qk_layernorm:  # per head: one weight [d] (and bias) each for q and k; projection: split over TP
        count += 2 * norm * d // h if m.qk_layernorm_mode == "head" else (n + g) * d // tp
    count += n * d * h // tp + (h if bias else 0)  # attention output (row-parallel)
    if not moe:
        return count + mlp_parameters(m, f, tp)
    count += m.moe.num_experts * h  # the router, replicated
    if m.moe.shared_expert_ffn_hidden_size:
        count += mlp_parameters(m, m.moe.shared_expert_ffn_hidden_size, tp) + (h if m.moe.shared_expert_gate else 0)
    return count


def mlp_parameters(m: ModelConfig, f: int, tp: int) -> int:
    """A tensor-parallel MLP of width f: fc1 (column-parallel), fc2 (row-parallel), their biases."""
    h, bias = m.hidden_size, m.add_bias_linear
    up = 2 * f if m.activation == "swiglu" else f
    return h * up // tp + (up // tp if bias else 0) + f * h // tp + (h if bias else 0)


def expert_parameters(m: ModelConfig, ep: int, etp: int) -> int:
    """One MoE layer's expert weights on one rank: E/EP experts, each's matrices ÷ ETP (no biases)."""
    moe = m.moe
    f = moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    up = 2 * f if m.activation == "swiglu" else f
    return moe.num_experts // ep * (m.hidden_size * up + f * m.hidden_size) // etp


def stage_parameters(m: ModelConfig, vocab_size: int, tp: int, pp: int, vpp: int, pp_rank: int,
                     chunk_layers: Sequence[int] = (), placement: str = LOOPED, ep: int = 1, etp: int = 1) -> int:
    """Parameters held by pipeline rank ``pp_rank`` (its v chunks) on one TP rank; ``chunk_layers``
    (layers per global chunk, ``ParallelDims.chunk_layers``; empty: equal chunks) and ``placement``
    say which layers those are. Expert weights included (``stage_expert_parameters``)."""
    shape = stage_shape(chunk_layers or chunk_layer_counts(m.num_layers, pp, vpp), pp, vpp, pp_rank, placement)
    first, last = shape.has_embedding, shape.has_head
    is_moe = moe_layers(m)
    count = sum(layer_parameters(m, tp, is_moe[i]) for i in shape.layer_ids)
    count += stage_expert_parameters(m, pp, vpp, pp_rank, chunk_layers, placement, ep, etp)
    embedding = vocab_size // tp * m.hidden_size
    if first:
        count += embedding + (m.seq_length * m.hidden_size if m.position_embedding == "learned" else 0)
    if last:
        count += 2 * m.hidden_size if m.normalization == "layernorm" else m.hidden_size
        if not m.tie_embeddings or not first:
            count += embedding  # the output layer, or the tied copy on the last stage (the V
            # placement's head on the first stage uses the embedding itself)
    return count


def stage_moe_layers(m: ModelConfig, pp: int, vpp: int, pp_rank: int, chunk_layers: Sequence[int] = (),
                     placement: str = LOOPED) -> int:
    """How many of pipeline rank ``pp_rank``'s layers are MoE layers."""
    shape = stage_shape(chunk_layers or chunk_layer_counts(m.num_layers, pp, vpp), pp, vpp, pp_rank, placement)
    is_moe = moe_layers(m)
    return sum(is_moe[i] for i in shape.layer_ids)


def stage_expert_parameters(m: ModelConfig, pp: int, vpp: int, pp_rank: int, chunk_layers: Sequence[int] = (),
                            placement: str = LOOPED, ep: int = 1, etp: int = 1) -> int:
    """Expert weights on a rank of pipeline stage ``pp_rank`` (replicated over expert-DP)."""
    layers = stage_moe_layers(m, pp, vpp, pp_rank, chunk_layers, placement)
    return layers * expert_parameters(m, ep, etp) if layers else 0


@dataclass(frozen=True)
class Memory:
    """Bytes on one rank."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: float  # microbatches' worth of activations the schedule holds at its peak

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, float]:
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total, "in_flight_microbatches": self.in_flight}


def in_flight_microbatches(schedule: str, pp: int, vpp: int, m: int, pp_rank: int = 0) -> float:
    """Microbatches of a full stage whose activations rank ``pp_rank`` holds at its peak (from the
    forward until the weight gradients are done: a pending weight pass keeps its layers' inputs and
    output gradients, about as much as the activations themselves).

    GPipe: all m. 1F1B: min(p − r, m) (stage 0 holds p). Interleaved (Megatron's warm-up): chunk
    forwards 2·(p − r − 1) + (v − 1)·p + 1, each a 1/v of the stage: for r = 0 that is
    p·(1 + (p − 1)/(p·v)), Megatron's memory factor. ZB-H1 and ZB-V: min(p, m) on every rank
    (ZB-H1's stage r holds p − r microbatches waiting for their input gradient and r for their weight
    gradient; ZB-V 2p half-stage chunk sets).
    """
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return m
    if schedule in ("zb1p", "zbv"):
        return min(pp, m)
    if schedule == "interleaved":
        return min(m * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1) / vpp
    return min(pp - pp_rank, m)


def optimizer_bytes_per_parameter(precision: str) -> int:
    """Adam's two fp32 moments, plus an fp32 master copy when the model is in 16 bits."""
    return 2 * FP32 + (FP32 if precision != "fp32" else 0)
