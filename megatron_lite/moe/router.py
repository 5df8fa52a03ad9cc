"""Token-choice routing: which experts each token goes to, with what weight, and the balancing terms.

Scores are computed in fp32 from a replicated [E, h] weight (``logits = x Wᵀ``), then, as in
Megatron-LM's ``topk_routing_with_score_function``:

- softmax, ``pre_softmax``: probabilities over all experts, the top k kept as they are;
- softmax (default): the top k logits, softmax over those k (the chosen weights sum to 1);
- sigmoid (DeepSeek-V3): sigmoid scores, the top k normalised to sum to 1 (k > 1);
- ``num_groups`` / ``group_topk``: experts in groups; a group's score is the sum of its best
  k / group_topk scores, and each token chooses only among its group_topk best groups;
- ``expert_bias`` (aux-loss-free balancing): a per-expert bias added to the scores for the choice
  only, the weights stay unbiased; ``topk_scaling_factor`` multiplies the chosen weights.

Balancing losses are not returned: they join the backward through ``_AttachLoss`` on the routing
weights (Megatron's ``MoEAuxLossAutoScaler``), scaled like the language-model loss (1 / microbatches,
the fp16 loss scale, set per step with ``set_loss_scale``), so they work on any pipeline stage and
under the zero-bubble schedules. Definitions (T = tokens of the microbatch, counted over TP × CP;
k = router_topk; p = the routing scores of ``_aux_scores`` (softmax, or sigmoid normalised per token)
over all experts; f_e = the number of tokens routed to expert e):

    aux_loss        coeff · E / (k·T²) · Σ_e f_e · Σ_t p_te          (Switch Transformer)
    seq_aux_loss    the same per sequence (T = s), averaged over the microbatch's sequences
    global_aux_loss aux_loss with f_e and T counted over TP × CP × DP (depends on DP by definition)
    z_loss          coeff · Σ_t logsumexp(logits_t)² / T

Each rank computes its tokens' share of these (its local Σ_t, the global f_e and T), so the shares
summed over TP × CP are the values above whatever the layout; each share's gradient is multiplied by
CP, as every CP rank's LM loss is (parallel/context.py), because gradients are averaged over DP × CP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.collectives import TPGroup, all_reduce
from ..tensor_parallel import ParamMeta, new_parameter
from .groups import ExpertGroups


class _AttachLoss(torch.autograd.Function):
    """Identity on ``x``; the backward also sends ``owner.loss_scale`` as the gradient of ``loss``
    (a scalar), so ``loss`` is minimised with the LM loss's weight without being added to it."""

    @staticmethod
    def forward(ctx, x, loss, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.owner.loss_scale, dtype=torch.float32, device=grad.device), None


def in_recomputation() -> bool:
    """Whether this forward runs inside a backward (activation recomputation), so statistics that a
    forward counts are not counted twice."""
    return torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """forward(x [N, h]) -> (weights [N, k] fp32, experts [N, k] int64), N = this rank's tokens.

    Buffers: ``expert_bias`` [E] fp32 (saved in checkpoints; with ``model.moe.expert_bias``), and
    the step's statistics, summed over its microbatches on this rank (not saved): ``tokens_per_expert``
    [E], ``aux_loss`` and ``z_loss`` (this rank's shares, unscaled).
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup, groups: ExpertGroups):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.topk = moe.num_experts, moe.router_topk
        self.moe, self.groups = moe, groups
        # Replicated everywhere; under SP each TP rank routes its own tokens: partial gradients.
        self.weight = new_parameter((moe.num_experts, cfg.hidden_size),
                                    ParamMeta(init_std=cfg.init_std, grad_summed_over_tp=tp.sequence_parallel))
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts) if moe.expert_bias else None)
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("aux_loss", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("z_loss", torch.zeros((), dtype=torch.float64), persistent=False)
        self.loss_scale = 1.0  # the LM loss's backward scale (set_loss_scale)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)`` keeps the bias and the statistics in their precision."""
        keep = {n: getattr(self, n) for n in ("expert_bias", "tokens_per_expert", "aux_loss", "z_loss")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            if old is not None:
                setattr(self, name, getattr(self, name).to(dtype=old.dtype))
        return self

    def forward(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size``: sequences in x (tokens are sequence-major within each: [b, s_local])."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E] fp32
        weights, experts = self._route(logits)
        counting = self.training and torch.is_grad_enabled() and not in_recomputation()
        counts = torch.zeros(logits.shape[0], self.num_experts, device=x.device).scatter_(1, experts, 1.0)
        if self.training and torch.is_grad_enabled():
            weights = self._attach_balancing(weights, logits, counts, batch_size, counting)
        if counting:
            self.tokens_per_expert += counts.sum(0).double()
        return weights, experts

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        if moe.score_function == "softmax" and not moe.pre_softmax:
            top, experts = self._topk(logits)
            weights = torch.softmax(top, dim=-1)
        else:
            scores = torch.softmax(logits, dim=-1) if moe.score_function == "softmax" else torch.sigmoid(logits)
            _, experts = self._topk(scores if self.expert_bias is None else scores + self.expert_bias)
            weights = scores.gather(1, experts)
            if moe.score_function == "sigmoid" and self.topk > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if moe.topk_scaling_factor is not None:
            weights = weights * moe.topk_scaling_factor
        return weights, experts

    def _topk(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top k of ``scores`` [N, E] (values, indices), within the best groups if grouped."""
        moe = self.moe
        if moe.num_groups is None:
            return torch.topk(scores, self.topk, dim=-1)
        n = scores.shape[0]
        per_group = scores.view(n, moe.num_groups, -1)
        group_scores = per_group.topk(self.topk // moe.group_topk, dim=-1).values.sum(-1)  # [N, groups]
        best = group_scores.topk(moe.group_topk, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        masked = per_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, -1)
        return torch.topk(masked, self.topk, dim=-1)

    # Balancing -------------------------------------------------------------------------------
    def _aux_scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.moe.score_function == "softmax":
            return torch.softmax(logits, dim=-1)
        scores = torch.sigmoid(logits)
        return scores / (scores.sum(-1, keepdim=True) + 1e-20)

    def _attach_balancing(self, weights, logits, counts, batch_size: int, counting: bool) -> torch.Tensor:
        """The aux and z losses of this microbatch attached to ``weights`` (module docstring)."""
        moe, g = self.moe, self.groups
        n_local = logits.shape[0]
        if moe.load_balancing != "none" and moe.aux_loss_coeff > 0:
            probs = self._aux_scores(logits)
            if moe.load_balancing == "seq_aux_loss":
                # [b, s_local, E] -> per sequence: Σ_t p over local tokens, f over TP × CP.
                f = all_reduce(counts.view(batch_size, -1, self.num_experts).sum(1), g.tp_cp)[0]
                seq = n_local // batch_size * g.tp_cp.size
                p = probs.view(batch_size, -1, self.num_experts).sum(1)
                aux = (f * p).sum() * (self.num_experts / (self.topk * seq * seq * batch_size))
            else:
                group = g.stage if moe.load_balancing == "global_aux_loss" else g.tp_cp
                f = all_reduce(counts.sum(0), group)[0]
                total = n_local * group.size
                aux = (f * probs.sum(0)).sum() * (self.num_experts / (self.topk * total * total))
            aux = aux * moe.aux_loss_coeff
            weights = _AttachLoss.apply(weights, aux * g.cp_size, self)
            if counting:
                self.aux_loss += aux.detach().double()
        if moe.z_loss_coeff:
            z = torch.logsumexp(logits, dim=-1).square().sum() * (moe.z_loss_coeff / (n_local * g.tp_cp.size))
            weights = _AttachLoss.apply(weights, z * g.cp_size, self)
            if counting:
                self.z_loss += z.detach().double()
        return weights

    @torch.no_grad()
    def update_expert_bias(self, global_counts: torch.Tensor) -> None:
        """Aux-loss-free balancing after a step: bias += rate · sign(mean − count), with the step's
        counts summed over TP × CP × DP (identical on every rank of the stage)."""
        if self.expert_bias is not None:
            error = global_counts.mean() - global_counts
            self.expert_bias += self.moe.bias_update_rate * torch.sign(error).to(self.expert_bias.dtype)

    def reset_statistics(self) -> None:
        """Start a step's counts; the last step's routing of this rank stays readable as
        ``last_tokens_per_expert`` (benchmarks/comm_volume.py counts the all-to-all from it)."""
        self.last_tokens_per_expert = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        self.aux_loss.zero_()
        self.z_loss.zero_()


def set_loss_scale(modules, scale: float) -> None:
    """The backward scale of every router's balancing losses in ``modules`` (1 / microbatches ×
    the fp16 loss scale: the LM loss's)."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, Router):
                m.loss_scale = scale

