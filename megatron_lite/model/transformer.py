"""The transformer block: pre-norm, causal self-attention, MLP. Tensor parallelism lives inside the
layer classes (column-parallel in, row-parallel out); this file reads like a plain GPT.

Activations between blocks: [b, s, h], or [b, s/t, h] with sequence parallelism (t = TP size);
under context parallelism s is this CP rank's s/c tokens (parallel/context.py), and attention runs
as ring attention over the CP group.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..parallel.collectives import TPGroup
from ..parallel.context import CPGroup, ring_attention
from torch.utils.checkpoint import checkpoint

from ..tensor_parallel import ColumnParallelLinear, ModelRNG, RowParallelLinear, dropout
from ..tensor_parallel.random import checkpoint_rng_context
from ..tensor_parallel.sharding import mark_sharded


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension. Replicated over TP; under sequence parallelism
    each rank normalises its own sequence shard, so the weight gradients are partial
    (tagged ``sequence_parallel`` for ``allreduce_sequence_parallel_grads``)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.norm_epsilon
        self.weight = mark_sharded(nn.Parameter(torch.ones(cfg.hidden_size)), None)
        self.bias = None
        if self.kind == "layernorm":
            self.bias = mark_sharded(nn.Parameter(torch.zeros(cfg.hidden_size)), None)
        for p in self.parameters():
            p.init_value = 1.0 if p is self.weight else 0.0
            p.sequence_parallel = tp.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def rotary_tables(seq_length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_length, head_dim/2] for RoPE (Su et al. 2021), frequencies θ^(−2i/d)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads, heads split over TP.

    The fused QKV weight is laid out group by group, [q heads of group 0, k0, v0, q heads of group 1,
    k1, v1, ...], so a TP rank's rows are exactly the query groups it owns (n/t query heads, g/t KV
    heads). MHA is g = n, MQA g = 1 (validate rejects g < t). ``recompute_core``: keep only q, k, v
    for the backward and recompute the attention core (selective recomputation). With a CP group of
    more than one rank the core is ring attention over it (tokens at their global positions).
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: ModelRNG, recompute_core: bool = False,
                 cp: CPGroup = CPGroup()):
        super().__init__()
        self.recompute_core, self.cp = recompute_core, cp
        n, g = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // n
        self.heads, self.groups = n // tp.size, g // tp.size  # local to this TP rank
        self.q_per_group = n // g
        self.dropout_p, self.rng = cfg.dropout, rng
        self.use_sdpa = cfg.attention_backend == "sdpa" or (
            cfg.attention_backend == "auto" and cfg.dropout == 0.0
        )
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, (n + 2 * g) * self.head_dim, tp, bias=cfg.add_bias_linear, init_std=cfg.init_std
        )
        self.out = RowParallelLinear(n * self.head_dim, cfg.hidden_size, tp, bias=cfg.add_bias_linear, init_std=std_out)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        qkv = self.qkv(x)  # [b, s, groups·(q_per_group + 2)·d], sequence gathered under SP
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(b, s, self.heads, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, groups, d]
        if rope is not None:
            cos, sin = rope
            q, k = ops.rotary(q, cos[:s], sin[:s]), ops.rotary(k, cos[:s], sin[:s])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads or groups, s, d]
        if self.recompute_core and self.training:
            context = checkpoint(self._core, q, k, v, use_reentrant=False,
                                 context_fn=partial(checkpoint_rng_context, self.rng))
        else:
            context = self._core(q, k, v)
        context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.out(context)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [b, heads, s, d], k, v: [b, groups, s, d] -> context [b, heads, s, d]."""
        if self.cp.size > 1:
            return ring_attention(q, k, v, self.cp)
        if self.use_sdpa:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1,
                dropout_p=self.dropout_p if self.training else 0.0,
            )
        return self._explicit_attention(q, k, v)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√d, causal) V with the fused softmax op; dropout masks differ per TP rank."""
        b, heads, s, d = q.shape
        if self.q_per_group > 1:
            k = k.repeat_interleave(self.q_per_group, dim=1)
            v = v.repeat_interleave(self.q_per_group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).view(b * heads, s, s)
        probs = ops.causal_softmax(scores, 1.0 / math.sqrt(d)).view(b, heads, s, s)
        probs = dropout(probs, self.dropout_p, self.rng.tensor_parallel, self.training)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    """h → ffn → h. GeLU: fc1 with the bias-GeLU fused; SwiGLU: fc1 holds [gate; up] stacked
    (stride 2, so each TP rank gets matching gate and up rows)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.swiglu = cfg.activation == "swiglu"
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size, 2 * ffn if self.swiglu else ffn, tp, bias=cfg.add_bias_linear,
            stride=2 if self.swiglu else 1, init_std=cfg.init_std, skip_bias_add=True,
        )
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, tp, bias=cfg.add_bias_linear, init_std=std_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bias = self.fc1(x)
        if self.swiglu:
            y = ops.swiglu(y if bias is None else y + bias)
        else:
            y = ops.bias_gelu(y, bias)
        return self.fc2(y)


class TransformerBlock(nn.Module):
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: ModelRNG, recompute_core: bool = False,
                 cp: CPGroup = CPGroup()):
        super().__init__()
        self.attention_norm = Norm(cfg, tp)
        self.attention = Attention(cfg, tp, rng, recompute_core, cp)
        self.mlp_norm = Norm(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.dropout_p = cfg.dropout
        # The residual stream is split by sequence under SP, so its dropout must differ per TP rank.
        self.generator = rng.tensor_parallel if tp.sequence_parallel else rng.default

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + dropout(self.attention(self.attention_norm(x), rope), self.dropout_p, self.generator, self.training)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_p, self.generator, self.training)
        return x
