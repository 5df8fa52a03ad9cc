"""The transformer block: pre-norm, causal self-attention, MLP. Tensor parallelism lives inside the
layer classes (column-parallel in, row-parallel out); this file reads like a plain GPT.

Activations between blocks: [b, s, h], or [b, s/t, h] with sequence parallelism (t = TP size);
under context parallelism s is this CP rank's s/c tokens (parallel/context.py), and attention runs
as ring attention over the CP group.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import ModelConfig, head_dim, moe_layers
from ..moe import ExpertGroups, MoE
from ..parallel.collectives import TPGroup, sum_over_tp
from ..parallel.context import CPGroup, ring_attention
from ..tensor_parallel import ColumnParallelLinear, ModelRNG, ParamMeta, RowParallelLinear, dropout, new_parameter
from ..tensor_parallel.random import as_default_generator, checkpoint_rng_context


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension (``size``, default hidden_size). Replicated over
    TP; under sequence parallelism each rank normalises its own sequence shard, so the weight
    gradients are partial sums (``grad_summed_over_tp``, summed by optim/grads.py:finalize_grads).
    ``partial_over_tp`` overrides that: a per-head q/k norm sees only this rank's heads, so its
    gradients are partial whenever TP > 1."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, size: int | None = None, partial_over_tp: bool | None = None):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.norm_epsilon
        size = size or cfg.hidden_size
        partial = tp.sequence_parallel if partial_over_tp is None else partial_over_tp
        self.weight = new_parameter((size,), ParamMeta(init_value=1.0, grad_summed_over_tp=partial))
        self.bias = None
        if self.kind == "layernorm":
            self.bias = new_parameter((size,), ParamMeta(init_value=0.0, grad_summed_over_tp=partial))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class ProjectionRMSNorm(nn.Module):
    """RMSNorm over a whole q or k projection, all heads at once (OLMoE's and OLMo 2's q/k norm):
    x [b, s, heads/t, d], this TP rank's heads, normalised by the root mean square over all heads of
    all TP ranks (the sum of squares is summed over TP). The weight [heads·d] is split over TP like
    the heads; each rank's gradient is complete for its slice."""

    def __init__(self, heads: int, d: int, eps: float, tp: TPGroup):
        super().__init__()
        self.features, self.eps, self.tp = heads * d, eps, tp
        self.weight = new_parameter((heads // tp.size * d,), ParamMeta(tp_shard_dim=0, init_value=1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = sum_over_tp(x.float().pow(2).sum(dim=(-2, -1), keepdim=True), self.tp)
        y = (x.float() * torch.rsqrt(squares / self.features + self.eps)).to(x.dtype)
        return self.weight.view(x.shape[-2:]) * y


class KVCache:
    """The keys and values of one attention layer for the tokens seen so far (inference, one rank):
    k, v [b, groups, length, d]. ``append`` adds the new tokens' and returns the whole sequence's."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Causal self-attention with grouped KV heads, heads split over TP.

    The fused QKV weight is laid out group by group, [q heads of group 0, k0, v0, q heads of group 1,
    k1, v1, ...], so a TP rank's rows are exactly the query groups it owns (n/t query heads, g/t KV
    heads). MHA is g = n, MQA g = 1 (validate rejects g < t). ``model.add_qkv_bias`` puts a bias
    on QKV alone; ``model.qk_layernorm`` normalises q and k before RoPE, per head (``Norm`` over d) or
    over the whole projection (``ProjectionRMSNorm``). ``recompute_core``: keep only q, k, v
    for the backward and recompute the attention core (selective recomputation). With a CP group of
    more than one rank the core is ring attention over it (tokens at their global positions).
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: ModelRNG, recompute_core: bool = False,
                 cp: CPGroup = CPGroup()):
        super().__init__()
        self.recompute_core, self.cp = recompute_core, cp
        n, g = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = head_dim(cfg)
        self.heads, self.groups = n // tp.size, g // tp.size  # local to this TP rank
        self.q_per_group = n // g
        self.dropout_p, self.rng = cfg.dropout, rng
        self.use_sdpa = cfg.attention_backend == "sdpa" or (
            cfg.attention_backend == "auto" and cfg.dropout == 0.0
        )
        std_out = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, (n + 2 * g) * self.head_dim, tp, bias=cfg.add_bias_linear or cfg.add_qkv_bias,
            init_std=cfg.init_std,
        )
        self.out = RowParallelLinear(n * self.head_dim, cfg.hidden_size, tp, bias=cfg.add_bias_linear, init_std=std_out)
        self.q_norm = self.k_norm = None
        if cfg.qk_layernorm and cfg.qk_layernorm_mode == "head":
            self.q_norm, self.k_norm = (Norm(cfg, tp, self.head_dim, partial_over_tp=tp.size > 1) for _ in range(2))
        elif cfg.qk_layernorm:
            self.q_norm = ProjectionRMSNorm(n, self.head_dim, cfg.norm_epsilon, tp)
            self.k_norm = ProjectionRMSNorm(g, self.head_dim, cfg.norm_epsilon, tp)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """``rope``: cos, sin tables from x's first position on; ``kv_cache``: earlier tokens' keys and
        values, which x's queries attend to as well (and x's are appended)."""
        qkv = self.qkv(x)  # [b, s, groups·(q_per_group + 2)·d], sequence gathered under SP
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.groups, self.q_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)  # one split: its backward is one concat
        q = q.reshape(b, s, self.heads, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)  # [b, s, groups, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = ops.rotary(q, cos[:s], sin[:s]), ops.rotary(k, cos[:s], sin[:s])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads or groups, s, d]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [b, groups, cached + s, d]
        if self.recompute_core and self.training:
            context = checkpoint(self._core, q, k, v, use_reentrant=False,
                                 context_fn=partial(checkpoint_rng_context, self.rng))
        else:
            context = self._core(q, k, v)
        context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.out(context)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [b, heads, sq, d], k, v: [b, groups, sk, d] -> context [b, heads, sq, d]. Causal with the
        queries at the last sq of the sk positions (sk > sq: keys cached from earlier tokens)."""
        if self.cp.size > 1:
            return ring_attention(q, k, v, self.cp)
        sq, sk = q.shape[2], k.shape[2]
        if self.use_sdpa:
            dropout_p = self.dropout_p if self.training else 0.0
            # SDPA's is_causal aligns the mask to the first key; a cache needs it at the last.
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq) if 1 < sq < sk else None
            # SDPA's dropout draws from the default generator: lend it the TP-aware one (heads differ
            # per TP rank), so the masks are reproducible, checkpointed and replayed by recomputation.
            with as_default_generator(self.rng.tensor_parallel) if dropout_p else nullcontext():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=sq == sk, enable_gqa=self.q_per_group > 1,
                    dropout_p=dropout_p,
                )
        return self._explicit_attention(q, k, v)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√d, causal) V with the fused softmax op; dropout masks differ per TP rank."""
        b, heads, sq, d = q.shape
        sk = k.shape[2]
        if self.q_per_group > 1:
            k = k.repeat_interleave(self.q_per_group, dim=1)
            v = v.repeat_interleave(self.q_per_group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).view(b * heads, sq, sk)
        probs = ops.causal_softmax(scores, 1.0 / math.sqrt(d)).view(b, heads, sq, sk)
        probs = dropout(probs, self.dropout_p, self.rng.tensor_parallel, self.training)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    """h → ffn → h. GeLU: fc1 with the bias-GeLU fused; SwiGLU: fc1 holds [gate; up] stacked
    (stride 2, so each TP rank gets matching gate and up rows). Also an MoE layer's shared expert."""

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
    """x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x))); the mlp is a mixture of
    experts in the layers ``model.moe`` makes MoE (``experts``: their process groups)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rng: ModelRNG, recompute_core: bool = False,
                 cp: CPGroup = CPGroup(), layer: int = 0, experts: ExpertGroups = ExpertGroups()):
        super().__init__()
        self.attention_norm = Norm(cfg, tp)
        self.attention = Attention(cfg, tp, rng, recompute_core, cp)
        self.mlp_norm = Norm(cfg, tp)
        self.mlp = MoE(cfg, tp, experts) if moe_layers(cfg)[layer] else MLP(cfg, tp)
        self.dropout_p = cfg.dropout
        # The residual stream is split by sequence under SP, so its dropout must differ per TP rank.
        self.generator = rng.tensor_parallel if tp.sequence_parallel else rng.default

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        attention = self.attention(self.attention_norm(x), rope, kv_cache)
        x = x + dropout(attention, self.dropout_p, self.generator, self.training)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_p, self.generator, self.training)
        return x
