"""One single-rank training step of an MoE layer at moe_tiny's shape (1,024 tokens of h = 128, 8
SwiGLU experts of 128, top-2, a shared expert, the switch aux loss) — megatron_lite's ``MoE`` (router,
expert-sorted assignments, one grouped GEMM per projection, weight gradients through the fp32
GradBuffer, AdamW) against a plain PyTorch MoE written here (nanoGPT style: an nn.Linear router and a
loop over nn.Linear experts with index_add, the aux loss added to the loss, clip_grad_norm_ + foreach
AdamW), fp32, CPU. Both start from the same weights and the first outputs and losses are checked to
agree. Steps alternate between the two in one process; the ratio is the median over rounds of
plain-time / ours-time (> 1: megatron_lite is faster).

    python benchmarks/moe_step.py [--rounds 10] [--tokens 1024] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import load_config
from megatron_lite.moe import ExpertGroups, MoE
from megatron_lite.model.gpt import init_weights
from megatron_lite.optim import GradBuffer, Optimizer
from megatron_lite.parallel.collectives import TPGroup


class PlainSwiGLU(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PlainMoE(nn.Module):
    """Token-choice top-k MoE the way a newcomer writes it: softmax over the k best logits, a loop
    over experts, the switch aux loss coeff · E/(k·T²) · Σ_e f_e · Σ_t p_te returned beside the output."""

    def __init__(self, h: int, experts: int, k: int, f: int, shared: int, aux_coeff: float):
        super().__init__()
        self.k, self.aux_coeff = k, aux_coeff
        self.router = nn.Linear(h, experts, bias=False)
        self.experts = nn.ModuleList(PlainSwiGLU(h, f) for _ in range(experts))
        self.shared = PlainSwiGLU(h, shared)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens).float()
        top, chosen = logits.topk(self.k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, expert(tokens[token]) * weights[token, slot, None])
        counts = torch.zeros_like(logits).scatter_(1, chosen, 1.0).sum(0)
        n, experts = logits.shape
        aux = (counts * torch.softmax(logits, -1).sum(0)).sum() * (self.aux_coeff * experts / (self.k * n * n))
        return (out + self.shared(tokens)).view_as(x), aux

    @classmethod
    @torch.no_grad()
    def copy_of(cls, ours: MoE) -> "PlainMoE":
        """The same weights as megatron_lite's layer (fc1[e] = [gate; up], fc2[e] = down)."""
        fc1, fc2 = ours.experts.fc1.weight, ours.experts.fc2.weight
        experts, h, f = fc1.shape[0], fc1.shape[2], fc2.shape[2]
        shared = ours.shared_expert
        plain = cls(h, experts, ours.router.topk, f, shared.fc2.weight.shape[1], ours.cfg.aux_loss_coeff)
        plain.router.weight.copy_(ours.router.weight)
        for e, expert in enumerate(plain.experts):
            expert.gate.weight.copy_(fc1[e, :f])
            expert.up.weight.copy_(fc1[e, f:])
            expert.down.weight.copy_(fc2[e])
        plain.shared.gate.weight.copy_(shared.fc1.weight[: shared.fc2.weight.shape[1]])
        plain.shared.up.weight.copy_(shared.fc1.weight[shared.fc2.weight.shape[1]:])
        plain.shared.down.weight.copy_(shared.fc2.weight)
        return plain


class _Holder(nn.Module):
    """Lets ``init_weights`` (which walks a chunk's parameters by name) initialise a bare layer."""

    def __init__(self, layer: MoE):
        super().__init__()
        self.mlp, self.tp, self.experts = layer, TPGroup(), ExpertGroups()


def build_layer(overrides: list[str] = (), seed: int = 1234) -> MoE:
    """megatron_lite's MoE layer of moe_tiny (single rank), initialised as the model would."""
    cfg = load_config(["model=moe_tiny", *overrides]).model
    layer = MoE(cfg, TPGroup(), ExpertGroups())
    init_weights(_Holder(layer), seed)
    return layer


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = build_layer()
    plain = PlainMoE.copy_of(ours)
    x = torch.randn(args.tokens // 128, 128, 128, generator=torch.Generator().manual_seed(0))
    cfg = load_config(["model=moe_tiny"]).optimizer
    buffer = GradBuffer(list(ours.parameters()))
    optimizer = Optimizer(list(ours.parameters()), cfg, norm_group=None)
    params = list(plain.parameters())
    decay = [p for p in params if p.ndim >= 2]
    plain_optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}], lr=cfg.lr,
                                        betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    ours.train()
    # The same computation: outputs, and the loss with its aux term, agree before any step.
    mine, theirs = ours(x), plain(x)
    assert torch.allclose(mine, theirs[0], rtol=1e-5, atol=1e-6), (mine - theirs[0]).abs().max()

    def step_ours():
        buffer.start_step(1)
        ours(x).square().mean().backward()
        buffer.finish_accumulation()
        optimizer.step(cfg.lr)
        ours.router.reset_statistics()

    def step_plain():
        out, aux = plain(x)
        (out.square().mean() + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    step_ours(), step_plain()  # warm-up
    ratios = []
    for _ in range(args.rounds):
        t_plain, t_ours = _time(step_plain), _time(step_ours)
        ratios.append(t_plain / t_ours)
    print(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "speed_ratio_plain_over_ours": statistics.median(ratios),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
