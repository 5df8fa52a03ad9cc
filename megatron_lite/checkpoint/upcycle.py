"""Dense-to-MoE upcycling (Megatron-LM's ``--moe-use-upcycling``, with its granular variant).

    python -m megatron_lite.checkpoint.upcycle --load DENSE [--iteration N] --output MOE \
        [--granularity G] [--seed S] model.moe.num_experts=E [model.moe.router_topk=k ...]

Turns a dense checkpoint (any layout it was saved in) into an MoE checkpoint at iteration 0 without
optimizer state, which training loads in any layout (EP included). The overrides are Hydra keys of
the stored config (``model.moe.*``: which layers are MoE, top-k, the balancing loss, ...).

Every MoE layer's experts start as copies of that layer's dense MLP. With ``--granularity G`` the
MLP's ffn dimension is split into G parts (SwiGLU: the gate and up rows alike) and each of the E/G
copies becomes G finer experts, one part each (expert c·G + p holds part p): expert ffn = ffn / G.
The router's rows are random (``model.init_std``, ``--seed``) and equal within each group of G, so
the top k = G·k' experts are k' whole groups; with weights that sum to one over the chosen experts
(softmax over the top-k logits, or sigmoid scores normalised over them) and
``model.moe.topk_scaling_factor`` = G, the layer computes Σ_groups w · Σ_parts part(x) = MLP(x): the
upcycled model's outputs at step 0 equal the dense model's (to rounding; tested within 1e-6).
Refused in one line (exit code 2): routing whose weights do not sum to one (``pre_softmax``, sigmoid
with top-1), a capacity (dropped tokens), a shared expert, expert-bias routing, MLP biases (the
experts have none), a top-k or number of experts that G does not divide.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..config import Config, ConfigError, moe_layers, to_config, to_yaml, validate
from ..model import build_gpt
from .hf import load_model, write_or_refuse
from .manager import save_weights


def moe_config(dense: Config, overrides: Sequence[str], granularity: int) -> Config:
    """The MoE config: the dense one with ``overrides``, the expert size and top-k scaling that keep
    the dense outputs; ConfigError (one line, naming the key) for what upcycling cannot keep equal."""
    if dense.model.moe.num_experts is not None:
        raise ConfigError("model.moe.num_experts", f"the checkpoint is already an MoE model "
                          f"({dense.model.moe.num_experts} experts); upcycling takes a dense one")
    merged = OmegaConf.merge(OmegaConf.structured(dense), OmegaConf.from_dotlist(list(overrides)))
    cfg = to_config(merged)
    m, moe = cfg.model, cfg.model.moe
    if moe.num_experts is None:
        raise ConfigError("model.moe.num_experts",
                          "is required: the number of experts, e.g. model.moe.num_experts=8")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    G = f"--granularity {granularity}"
    checks = [
        ("model.moe.num_experts", moe.num_experts % granularity == 0, f"{moe.num_experts} is not a multiple of {G}"),
        ("model.moe.router_topk", moe.router_topk % granularity == 0,
         f"{moe.router_topk} is not a multiple of {G} (each token takes whole groups of G parts)"),
        ("model.ffn_hidden_size", ffn % granularity == 0, f"{ffn} is not a multiple of {G}"),
        ("model.moe.ffn_hidden_size", moe.ffn_hidden_size in (None, ffn // granularity),
         f"must be ffn_hidden_size / G = {ffn // granularity} (each expert a part of the dense MLP)"),
        ("model.moe.pre_softmax", not (moe.score_function == "softmax" and moe.pre_softmax),
         "the chosen probabilities do not sum to one, so the upcycled outputs would not equal the dense ones"),
        ("model.moe.score_function", not (moe.score_function == "sigmoid" and moe.router_topk == 1),
         "sigmoid with top-1: the weight does not sum to one"),
        ("model.moe.capacity_factor", moe.capacity_factor is None,
         "dropped tokens would change the outputs; set it when training from the upcycled checkpoint"),
        ("model.moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size is None,
         "a shared expert would be added to the dense output"),
        ("model.moe.expert_bias", not moe.expert_bias, "set it when training from the upcycled checkpoint"),
        ("model.moe.topk_scaling_factor", moe.topk_scaling_factor is None,
         "upcycling sets it (to --granularity when G > 1)"),
        ("model.add_bias_linear", not m.add_bias_linear,
         "the experts have no biases; upcycle a model without MLP biases"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(key, why)
    moe.ffn_hidden_size = ffn // granularity
    moe.topk_scaling_factor = float(granularity) if granularity > 1 else None
    m.hf_model_type = None  # the export infers the MoE family (a Llama becomes a Mixtral)
    validate(cfg, 1)
    return cfg


def upcycled_state(dense: dict[str, torch.Tensor], cfg: Config, granularity: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The MoE model's full state dict from the dense one's (module docstring): per MoE layer i,
    ``mlp.experts.fc1.weight`` [E, stride·ffn/G, h], ``fc2.weight`` [E, h, ffn/G], ``router.weight``
    [E, h]; every other tensor as it is."""
    m, G = cfg.model, granularity
    E = m.moe.num_experts
    generator = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in dense.items() if ".mlp." not in k}
    for i, is_moe in enumerate(moe_layers(m)):
        prefix = f"layers.{i}.mlp."
        fc1, fc2 = dense[prefix + "fc1.weight"], dense[prefix + "fc2.weight"]
        if not is_moe:
            out.update({prefix + "fc1.weight": fc1, prefix + "fc2.weight": fc2})
            continue
        halves = fc1.chunk(2) if m.activation == "swiglu" else (fc1,)  # [gate; up]: split alike
        parts1 = [torch.cat([h.chunk(G)[p] for h in halves]) for p in range(G)]
        parts2 = fc2.chunk(G, dim=1)
        out[prefix + "experts.fc1.weight"] = torch.stack([parts1[e % G] for e in range(E)])
        out[prefix + "experts.fc2.weight"] = torch.stack([parts2[e % G] for e in range(E)])
        router = torch.randn(E // G, m.hidden_size, generator=generator) * m.init_std
        out[prefix + "router.weight"] = router.repeat_interleave(G, dim=0).to(fc1.dtype)
    return out


def upcycle(load: str | Path, output: str | Path, overrides: Sequence[str] = (), granularity: int = 1,
            iteration: Optional[int] = None, seed: int = 0) -> Path:
    """Write the upcycled checkpoint of ``load`` to ``output``; returns its iteration directory."""
    if granularity < 1:
        raise ConfigError("--granularity", f"must be positive, got {granularity}")
    dense_cfg, dense = load_model(load, iteration)
    cfg = moe_config(dense_cfg, overrides, granularity)
    state = upcycled_state(dict(dense.state_dict()), cfg, granularity, seed)
    vocab, padded = cfg.model.vocab_size, state["embedding.weight"].shape[0]
    model = build_gpt(cfg.model, padded, unpadded_vocab_size=vocab)
    model.load_state_dict(state, strict=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return save_weights(output, 0, list(model.named_parameters()), cfg.model, vocab, padded, to_yaml(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-lite-upcycle", description="dense checkpoint -> MoE checkpoint")
    parser.add_argument("--load", required=True, help="the dense checkpoint directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    parser.add_argument("--output", required=True, help="the MoE checkpoint directory to write")
    parser.add_argument("--granularity", type=int, default=1,
                        help="split each copy of the MLP into G finer experts (Megatron's granular upcycling)")
    parser.add_argument("--seed", type=int, default=0, help="the router's random initialisation")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.moe.num_experts=8 model.moe.router_topk=2")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not re.fullmatch(r"[\w.]+=.*", o)]
    if bad:
        print(f"error: {bad[0]}: overrides are key=value", file=sys.stderr)
        return 2
    return write_or_refuse(lambda: upcycle(args.load, args.output, args.overrides, args.granularity, args.iteration,
                                           args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
