"""One single-rank training step (forward, backward, clipped AdamW) of megatron_lite's model against a
plain PyTorch GPT of the same shape and math written here (nanoGPT style: one fused [q|k|v] linear,
SDPA attention, tanh GeLU, tied embedding, learned positions, the same init std), fp32, CPU.

megatron_lite runs through the trainer's own pieces: ``build_gpt``, the fp32 ``GradBuffer`` (weight
gradients written straight into it, a post-accumulate hook for norms and biases) and ``Optimizer``
(global-norm clipping + torch's fused AdamW). The plain model uses ``clip_grad_norm_`` + foreach
AdamW with the same weight-decay groups. Both start
from the same weights (ours copied into the plain model) and the first losses are checked to agree, so
the two really compute the same thing. Steps alternate between the two models in one process; the
ratio is the median over rounds of plain-time / ours-time (> 1: megatron_lite is faster), for the
whole step and for its two parts (forward + backward; clipping + AdamW), and for the step's CPU time
(all threads of the process), which other jobs on a shared machine disturb less than wall time.

    python benchmarks/step_overhead.py [--rounds 10] [--models gpt_tiny gpt2_124m] [--profile] [--threads N]
                                       [--kernel-backend auto|torch|csrc|te|apex]

gpt2_124m runs with micro batch 1 and sequence 256 (a 1024-token step takes ~20 s on 2 cores);
gpt_tiny with micro batch 8 and its own sequence 128. ``--profile`` prints torch.profiler's top
operators of one step of each model. megatron_lite runs with the kernel backend its config names
(``auto``: the C++ twins on a CPU, as the trainer would), or ``--kernel-backend``; ``torch`` (the
pure-PyTorch reference ops) compares the model code alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import ops
from megatron_lite.config import load_config, padded_vocab_size
from megatron_lite.model import build_gpt
from megatron_lite.model.hf import split_qkv
from megatron_lite.optim import GradBuffer, Optimizer

# model -> (overrides, micro batch, vocabulary before padding)
SETUPS = {
    "gpt_tiny": (["model=gpt_tiny"], 8, 4096),
    "gpt2_124m": (["model=gpt2_124m", "model.seq_length=256"], 1, 50257),
}


class PlainBlock(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """GPT-2 in plain PyTorch. forward(ids [b, s], labels [b, s]) -> mean loss."""

    def __init__(self, cfg, vocab: int):
        super().__init__()
        h = cfg.hidden_size
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Parameter(torch.zeros(cfg.seq_length, h))
        self.blocks = nn.ModuleList(
            PlainBlock(h, cfg.num_attention_heads, cfg.ffn_hidden_size or 4 * h, cfg.norm_epsilon)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(h, eps=cfg.norm_epsilon)
        for name, p in self.named_parameters():  # GPT-2 init: std, residual outputs std/sqrt(2L)
            if p.ndim == 1 and "wpe" not in name:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            else:
                std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if "proj" in name else cfg.init_std
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    @torch.no_grad()
    def load_from(self, ours: nn.Module, cfg) -> None:
        """Copy megatron_lite's weights (its grouped QKV layout turned into [q | k | v])."""
        state = ours.state_dict()
        self.wte.weight.copy_(state["embedding.weight"])
        self.wpe.copy_(state["position_embedding"])
        self.ln_f.weight.copy_(state["final_norm.weight"])
        self.ln_f.bias.copy_(state["final_norm.bias"])
        for i, block in enumerate(self.blocks):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                getattr(block.c_attn, kind).copy_(torch.cat(split_qkv(state[p + f"attention.qkv.{kind}"], cfg)))
                for mine, theirs in ((block.ln_1, "attention_norm"), (block.ln_2, "mlp_norm"),
                                     (block.c_proj, "attention.out"), (block.c_fc, "mlp.fc1"),
                                     (block.mlp_proj, "mlp.fc2")):
                    getattr(mine, kind).copy_(state[p + f"{theirs}.{kind}"])


def plain_optimizer(model: nn.Module, ocfg) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps, foreach=True)


def build(name: str, kernel_backend: str | None = None):
    """The two models of ``name`` with the same weights, and one training step of each. megatron_lite
    runs with ``kernel_backend`` (default: its config's, as the trainer would)."""
    overrides, micro_batch, vocab = SETUPS[name]
    cfg = load_config(overrides)
    m = cfg.model
    ops.use_backend(kernel_backend or m.kernel_backend)
    vocab = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1)
    ours = build_gpt(m, vocab)
    params = list(ours.parameters())
    grads = GradBuffer(params)
    optimizer = Optimizer(params, cfg.optimizer, None)
    plain = PlainGPT(m, vocab)
    plain.load_from(ours, m)
    plain_opt = plain_optimizer(plain, cfg.optimizer)
    ids = torch.randint(0, vocab, (micro_batch, m.seq_length + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels = ids[:, :-1], ids[:, 1:]

    def ours_step() -> tuple[float, float, float]:
        start = time.perf_counter()
        grads.start_step(1)
        loss = ours(tokens, labels).mean()
        loss.backward()
        grads.finish_accumulation()
        middle = time.perf_counter()
        optimizer.step(cfg.optimizer.lr)
        return loss.item(), middle - start, time.perf_counter() - middle

    def plain_step() -> tuple[float, float, float]:
        start = time.perf_counter()
        plain_opt.zero_grad(set_to_none=True)
        loss = plain(tokens, labels)
        loss.backward()
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optimizer.clip_grad, foreach=True)
        plain_opt.step()
        return loss.item(), middle - start, time.perf_counter() - middle

    return m, micro_batch, ours_step, plain_step




def profile(step, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n--- {label}: top operators by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--kernel-backend", choices=ops.BACKENDS,
                        help="megatron_lite's fused-op backend (default: the model config's kernel_backend)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        m, micro_batch, ours_step, plain_step = build(name, args.kernel_backend)
        print(f"{name}: kernel backend {ops.backend()}  torch {torch.__version__}  threads {torch.get_num_threads()}  fp32")
        loss_ours, loss_plain = ours_step()[0], plain_step()[0]  # warm-up; the same start
        if abs(loss_ours - loss_plain) > 1e-4 * abs(loss_plain):
            raise SystemExit(f"{name}: first losses differ ({loss_ours} vs {loss_plain}): not the same model")
        ours_t, plain_t = [], []  # (forward + backward, optimizer, CPU time of the step) per round
        for r in range(args.rounds):
            pair = (ours_step, plain_step) if r % 2 == 0 else (plain_step, ours_step)
            times = {}
            for step in pair:
                cpu = time.process_time()
                times[step] = (*step()[1:], time.process_time() - cpu)
            ours_t.append(times[ours_step])
            plain_t.append(times[plain_step])
        tokens = micro_batch * m.seq_length
        row = {"model": name, "kernel_backend": ops.backend(), "micro_batch": micro_batch, "seq_length": m.seq_length, "first_loss": loss_ours}
        parts = (("step", lambda t: t[0] + t[1]), ("fwd_bwd", lambda t: t[0]), ("optimizer", lambda t: t[1]),
                 ("step_cpu_time", lambda t: t[2]))
        for label, pick in parts:
            ours_s, plain_s = [pick(t) for t in ours_t], [pick(t) for t in plain_t]
            row[f"ours_{label}_ms"] = 1e3 * statistics.median(ours_s)
            row[f"plain_{label}_ms"] = 1e3 * statistics.median(plain_s)
            row[f"{label}_ratio"] = statistics.median(p / o for p, o in zip(plain_s, ours_s))
        row["ours_tokens_per_s"] = tokens / (row["ours_step_ms"] / 1e3)
        row["plain_tokens_per_s"] = tokens / (row["plain_step_ms"] / 1e3)
        rows.append(row)
        if args.profile:
            profile(ours_step, f"{name} megatron_lite")
            profile(plain_step, f"{name} plain")
    print(f"\n{'model':<10} {'b×s':>8} {'part':>10} {'ours ms':>9} {'plain ms':>9} {'plain/ours time':>16}")
    for r in rows:
        for label in ("step", "fwd_bwd", "optimizer", "step_cpu_time"):
            print(f"{r['model']:<10} {r['micro_batch']:>3}×{r['seq_length']:<4} {label:>10} "
                  f"{r[f'ours_{label}_ms']:>9.1f} "
                  f"{r[f'plain_{label}_ms']:>9.1f} {r[f'{label}_ratio']:>15.3f}×")
    print("plain/ours time > 1: megatron_lite is faster (its throughput relative to the plain model)")
    print(json.dumps({"benchmark": "step_overhead", "backend": ops.backend(), "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
