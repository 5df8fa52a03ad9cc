"""HuggingFace transformers families: each declared once, with its config translation both ways and
its weight-name rules. The checkpoint import/export (``checkpoint/hf.py``) and the parity tests use
them; nothing else in megatron_lite knows HF names.

A family (``Family``) is a ``model_type`` of config.json and its ``*ForCausalLM`` class:

- ``read``: the AutoConfig dict -> ``model.*`` keys, refusing in one line (``UnsupportedModel``,
  naming the config.json key) whatever megatron_lite would only approximate;
- ``write``: our model config -> the keyword arguments of ``AutoConfig.for_model(model_type, ...)``;
- ``features``: the ``model.*`` values the architecture fixes (an export checks them);
- ``rules``: our full (unsharded) state dict <-> the HF state dict, one ``Rule`` per tensor, layer
  rules written with ``{i}``. A rule maps one of our tensors to one or more HF tensors with a pair of
  inverse functions: our fused QKV is laid out per query group ([q heads of group j, k_j, v_j] for
  each j) where HF keeps separate q/k/v projections (LLaMA-style) or one [q | k | v] matrix (GPT-2);
  SwiGLU's fc1 is [gate; up]; GPT-2's Conv1D stores weights [in, out], transposed.

The dense families are llama, mistral, qwen2 (q, k, v biases), qwen3 (per-head q/k RMSNorm) and gpt2.
The MoE families are mixtral, qwen3_moe, qwen2_moe (shared expert with a sigmoid gate) and olmoe
(q/k RMSNorm over the whole projection): their rules map the router and the experts, which
transformers saves one key per expert (``...experts.{e}.w1.weight``; that is what an export writes)
and which an import also accepts fused (``...mlp.experts.gate_up_proj`` [E, 2f, h] = our fc1, and
``down_proj`` [E, h, f] = our fc2: a rule's ``fused`` key). HF's ``router_aux_loss_coef`` and
``model.moe.aux_loss_coeff`` weigh different losses (``aux_loss_coeff_from_hf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig, head_dim, moe_layers

Tensor = torch.Tensor
# The training length an import picks when none is given (Llama 3.2 declares 131,072 positions).
DEFAULT_IMPORT_SEQ_LENGTH = 4096


class UnsupportedModel(ValueError):
    """A HF config or model config that no family represents exactly (one line, naming the key)."""


# Tensor rules --------------------------------------------------------------------------------------
def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    n = cfg.num_attention_heads
    g = cfg.num_query_groups or n
    return g, n // g, head_dim(cfg)


def split_qkv(qkv: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Our grouped QKV [g·(q+2)·d, ...] -> q [n·d, ...], k [g·d, ...], v [g·d, ...]."""
    g, q_per, d = _dims(cfg)
    rest = qkv.shape[1:]
    w = qkv.reshape(g, q_per + 2, d, *rest)
    return w[:, :q_per].reshape(-1, *rest), w[:, q_per].reshape(-1, *rest), w[:, q_per + 1].reshape(-1, *rest)


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of ``split_qkv``."""
    g, q_per, d = _dims(cfg)
    rest = q.shape[1:]
    parts = (q.reshape(g, q_per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


@dataclass(frozen=True)
class Rule:
    """Our tensor ``ours`` <-> the HF tensors ``theirs``: ``to_hf(t, cfg)`` gives them in order,
    ``from_hf(tensors, cfg)`` is its inverse. Default: the same tensor under another name.
    ``moe``: a layer rule for the MoE layers only (True) or the dense ones only (False); None: every
    layer. ``fused``: another HF key an import accepts instead of ``theirs``, holding our tensor as is
    (transformers 5's fused experts)."""

    ours: str
    theirs: tuple[str, ...]
    to_hf: Callable[[Tensor, ModelConfig], tuple[Tensor, ...]] = lambda t, cfg: (t,)
    from_hf: Callable[[tuple[Tensor, ...], ModelConfig], Tensor] = lambda ts, cfg: ts[0]
    moe: Optional[bool] = None
    fused: Optional[str] = None

    def at_layer(self, i: int) -> "Rule":
        fused = None if self.fused is None else self.fused.format(i=i)
        return Rule(self.ours.format(i=i), tuple(t.format(i=i) for t in self.theirs), self.to_hf, self.from_hf,
                    self.moe, fused)


def _separate_qkv(prefix: str, kind: str) -> Rule:
    """Our fused QKV weight or bias <-> q_proj, k_proj, v_proj."""
    return Rule(f"layers.{{i}}.attention.qkv.{kind}", tuple(f"{prefix}{n}_proj.{kind}" for n in "qkv"),
                split_qkv, lambda ts, cfg: merge_qkv(*ts, cfg))


def _conv1d(ours: str, theirs: str) -> Rule:
    """A GPT-2 Conv1D weight: stored [in, out]."""
    return Rule(ours, (theirs,), lambda t, cfg: (t.t(),), lambda ts, cfg: ts[0].t())


def _swiglu_mlp(ours: str, theirs: str, moe: Optional[bool] = None) -> list[Rule]:
    """A SwiGLU MLP ``ours`` (fc1 = [gate; up], fc2) <-> gate_proj, up_proj, down_proj under ``theirs``."""
    return [
        Rule(f"{ours}fc1.weight", (theirs + "gate_proj.weight", theirs + "up_proj.weight"),
             lambda t, cfg: tuple(t.chunk(2, dim=0)), lambda ts, cfg: torch.cat(ts), moe),
        Rule(f"{ours}fc2.weight", (theirs + "down_proj.weight",), moe=moe),
    ]


def _llama_style_rules(cfg: ModelConfig) -> list[Rule]:
    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    rules = [
        Rule("embedding.weight", ("model.embed_tokens.weight",)),
        Rule("final_norm.weight", ("model.norm.weight",)),
        Rule("layers.{i}.attention_norm.weight", (layer + "input_layernorm.weight",)),
        _separate_qkv(attn, "weight"),
        Rule("layers.{i}.attention.out.weight", (attn + "o_proj.weight",)),
        Rule("layers.{i}.mlp_norm.weight", (layer + "post_attention_layernorm.weight",)),
        *_swiglu_mlp("layers.{i}.mlp.", layer + "mlp.", False if cfg.moe.num_experts else None),
    ]
    if cfg.add_qkv_bias:
        rules.append(_separate_qkv(attn, "bias"))
    if cfg.qk_layernorm:
        rules += [Rule(f"layers.{{i}}.attention.{n}_norm.weight", (f"{attn}{n}_norm.weight",)) for n in "qk"]
    if not cfg.tie_embeddings:
        rules.append(Rule("output", ("lm_head.weight",)))
    return rules


def _moe_rules(block: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
               shared: bool = False) -> Callable[[ModelConfig], list[Rule]]:
    """The LLaMA-style rules plus the MoE layers': the router ``{block}gate.weight`` [E, h] and expert
    e's gate, up and down projections ``{block}experts.{e}.{names}.weight`` (transformers' saved
    form; fused, ``mlp.experts.gate_up_proj`` [E, 2f, h] and ``down_proj`` [E, h, f], is accepted);
    ``shared``: Qwen2-MoE's shared expert and its sigmoid gate [1, h]."""

    def rules(cfg: ModelConfig) -> list[Rule]:
        E = cfg.moe.num_experts
        ours, theirs, fused = "layers.{i}.mlp.", "model.layers.{i}." + block, "model.layers.{i}.mlp."
        experts = [f"{theirs}experts.{e}." for e in range(E)]
        moe = [
            Rule(ours + "router.weight", (theirs + "gate.weight",), moe=True, fused=fused + "gate.weight"),
            Rule(ours + "experts.fc1.weight", tuple(f"{x}{n}.weight" for x in experts for n in names[:2]),
                 lambda t, cfg: tuple(half for w in t for half in w.chunk(2)),
                 lambda ts, cfg: torch.stack([torch.cat(ts[2 * e: 2 * e + 2]) for e in range(len(ts) // 2)]),
                 moe=True, fused=fused + "experts.gate_up_proj"),
            Rule(ours + "experts.fc2.weight", tuple(f"{x}{names[2]}.weight" for x in experts),
                 lambda t, cfg: tuple(t.unbind(0)), lambda ts, cfg: torch.stack(ts),
                 moe=True, fused=fused + "experts.down_proj"),
        ]
        if shared:
            moe += _swiglu_mlp(ours + "shared_expert.", theirs + "shared_expert.", True)
            moe.append(Rule(ours + "shared_gate", (theirs + "shared_expert_gate.weight",), moe=True))
        return _llama_style_rules(cfg) + moe

    return rules


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    layer = "transformer.h.{i}."
    rules = [
        Rule("embedding.weight", ("transformer.wte.weight",)),
        Rule("position_embedding", ("transformer.wpe.weight",)),
        Rule("layers.{i}.attention.qkv.weight", (layer + "attn.c_attn.weight",),
             lambda t, cfg: (torch.cat(split_qkv(t, cfg)).t(),),
             lambda ts, cfg: merge_qkv(*ts[0].t().chunk(3), cfg)),
        Rule("layers.{i}.attention.qkv.bias", (layer + "attn.c_attn.bias",),
             lambda t, cfg: (torch.cat(split_qkv(t, cfg)),), lambda ts, cfg: merge_qkv(*ts[0].chunk(3), cfg)),
    ]
    for ours, theirs in (("attention.out", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        rules.append(_conv1d(f"layers.{{i}}.{ours}.weight", f"{layer}{theirs}.weight"))
        rules.append(Rule(f"layers.{{i}}.{ours}.bias", (f"{layer}{theirs}.bias",)))
    for ours, theirs in (("layers.{i}.attention_norm", layer + "ln_1"), ("layers.{i}.mlp_norm", layer + "ln_2"),
                         ("final_norm", "transformer.ln_f")):
        rules += [Rule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]
    return rules


# Config translation ---------------------------------------------------------------------------------
def _refuse(hf: dict[str, Any], checks: dict[str, tuple]) -> None:
    """One line for the first config.json key whose value megatron_lite does not implement."""
    for key, supported in checks.items():
        value = hf.get(key, supported[0])
        if value is None:
            value = supported[0]
        if value not in supported:
            raise UnsupportedModel(
                f"config.json: {key}={value!r} is not implemented by megatron_lite (supported: {supported})"
            )


def rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """``model.rope_theta`` and ``model.rope_scaling.*`` keys from a config dict, in either spelling:
    transformers ≥ 5's ``rope_parameters`` (θ inside) or ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    keys: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        keys["rope_scaling.type"] = "llama3"
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            keys[f"rope_scaling.{name}"] = params[name]
    elif kind != "default":
        raise UnsupportedModel(f"config.json: rope_type {kind!r}: megatron_lite implements default and llama3 RoPE")
    return keys


def _sliding_window(hf: dict[str, Any], seq_length: int, accepted: bool) -> Optional[int]:
    """The sliding window config.json gives every layer (None: full attention), accepted only when
    the family has one (``accepted``) and it spans the training sequence (then it changes nothing)."""
    window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None  # Qwen's use_sliding_window = false: the window is not used
    if window is None:
        return None
    if not accepted or (layer_types is not None and set(layer_types) != {"sliding_attention"}):
        raise UnsupportedModel(f"config.json: sliding_window={window} (use_sliding_window, layer_types) is not "
                               f"implemented by megatron_lite for {hf.get('model_type')}")
    if window < seq_length:
        raise UnsupportedModel(
            f"config.json: sliding_window={window} is shorter than the training sequence ({seq_length} tokens): "
            f"megatron_lite has no sliding-window attention; import with --seq-length {window} or less"
        )
    return window


def _llama_style_read(hf: dict[str, Any], seq_length: Optional[int], window: bool = False) -> dict[str, Any]:
    """The keys every LLaMA-style family shares (RMSNorm, SwiGLU, RoPE, GQA)."""
    _refuse(hf, {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)})
    heads = hf["num_attention_heads"]
    seq = seq_length or min(hf["max_position_embeddings"], DEFAULT_IMPORT_SEQ_LENGTH)
    return {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"], "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads, "ffn_hidden_size": hf["intermediate_size"],
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads, "seq_length": seq,
        "norm_epsilon": hf["rms_norm_eps"], "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "sliding_window": _sliding_window(hf, seq, window), **rope_settings(hf),
    }


def _llama_style_write(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE goes in as ``rope_theta`` and ``rope_scaling``, which transformers 4 keeps as they are and
    transformers 5 turns into ``rope_parameters``."""
    scaling = cfg.rope_scaling
    rope_scaling = None if scaling.type is None else {
        "rope_type": scaling.type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }
    return dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads, head_dim=head_dim(cfg),
        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_dropout=0.0, initializer_range=cfg.init_std,
    )


def _gpt2_read(hf: dict[str, Any], seq_length: Optional[int]) -> dict[str, Any]:
    _refuse(hf, {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"), "tie_word_embeddings": (True,),
        "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
    })
    if seq_length is not None and seq_length > hf["n_positions"]:
        raise UnsupportedModel(
            f"--seq-length {seq_length}: the GPT-2 model has {hf['n_positions']} learned positions (n_positions)"
        )
    return {
        "num_layers": hf["n_layer"], "hidden_size": hf["n_embd"], "num_attention_heads": hf["n_head"],
        "num_query_groups": None, "ffn_hidden_size": hf.get("n_inner") or 4 * hf["n_embd"],
        "seq_length": seq_length or hf["n_positions"], "norm_epsilon": hf["layer_norm_epsilon"],
    }


def _gpt2_write(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        n_positions=cfg.seq_length, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_hidden_size or 4 * cfg.hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, initializer_range=cfg.init_std,
    )


def aux_loss_coeff_from_hf(coef: float, topk: int, moe_layers_count: int) -> float:
    """``model.moe.aux_loss_coeff`` for HF's ``router_aux_loss_coef``. HF's load-balancing loss is
    E · Σ_e F_e · P_e with F (fraction of the top-k choices) and P (mean probability) averaged over the
    tokens of all MoE layers together, added once to the loss; Megatron's (router.py) is
    E / k · Σ_e F_e · P_e per layer, summed over the layers. Per layer HF's is k times Megatron's, and
    averaging over L layers divides by L, so the same pressure is coef · k / L (exact for one MoE
    layer, and for layers routing alike). Rounded to 12 digits so that export's inverse returns coef."""
    return float(f"{coef * topk / max(moe_layers_count, 1):.12g}")


def aux_loss_coeff_to_hf(coeff: float, topk: int, moe_layers_count: int) -> float:
    """The inverse of ``aux_loss_coeff_from_hf``."""
    return float(f"{coeff * max(moe_layers_count, 1) / topk:.12g}")


def _moe_read(hf: dict[str, Any], seq_length: Optional[int], family_keys: dict[str, Any],
              window: bool = False, normalised: Optional[bool] = None, shared: bool = False) -> dict[str, Any]:
    """The LLaMA-style keys plus ``model.moe.*``: experts, top-k, the layers that are MoE (Qwen's
    ``decoder_sparse_step`` 1 and ``mlp_only_layers`` the first layers: model.moe.first_dense_layers),
    ``norm_topk_prob`` (the top-k probabilities renormalised: our softmax over the top-k logits, else
    ``pre_softmax``; Mixtral always renormalises: ``normalised``), the aux-loss coefficient converted."""
    _refuse(hf, {"router_jitter_noise": (0.0,), "clip_qkv": (None,), "decoder_sparse_step": (1,)})
    keys = {**_llama_style_read(hf, seq_length, window), **family_keys}
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise UnsupportedModel(f"config.json: mlp_only_layers={dense}: megatron_lite makes only the first layers "
                               "dense (model.moe.first_dense_layers)")
    topk = hf["num_experts_per_tok"]
    norm = hf.get("norm_topk_prob", False) if normalised is None else normalised
    moe = {
        "num_experts": hf.get("num_local_experts") or hf["num_experts"], "router_topk": topk,
        "ffn_hidden_size": hf.get("moe_intermediate_size") or hf["intermediate_size"], "pre_softmax": not norm,
        "first_dense_layers": len(dense), "load_balancing": "aux_loss",
        "aux_loss_coeff": aux_loss_coeff_from_hf(hf.get("router_aux_loss_coef") or 0.0, topk,
                                                 hf["num_hidden_layers"] - len(dense)),
    }
    if shared:
        moe.update(shared_expert_ffn_hidden_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True)
    return {**keys, **{f"moe.{k}": v for k, v in moe.items()}}


def _moe_write(cfg: ModelConfig, experts_key: str, **extra: Any) -> dict[str, Any]:
    """The LLaMA-style keyword arguments plus the MoE ones (``experts_key``: num_local_experts for
    Mixtral, else num_experts); ``extra`` last."""
    moe = cfg.moe
    coef = moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0
    return {
        **_llama_style_write(cfg), experts_key: moe.num_experts, "num_experts_per_tok": moe.router_topk,
        "router_aux_loss_coef": aux_loss_coeff_to_hf(coef, moe.router_topk, sum(moe_layers(cfg))),
        **extra,
    }


def _expert_ffn(cfg: ModelConfig) -> int:
    return cfg.moe.ffn_hidden_size or cfg.ffn_hidden_size or 4 * cfg.hidden_size


def _qwen_moe_write(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    return _moe_write(cfg, "num_experts", moe_intermediate_size=_expert_ffn(cfg), decoder_sparse_step=1,
                      norm_topk_prob=not cfg.moe.pre_softmax,
                      mlp_only_layers=list(range(cfg.moe.first_dense_layers)), use_sliding_window=False, **extra)


# Families -------------------------------------------------------------------------------------------
LLAMA_STYLE = {"normalization": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
               "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False, "sliding_window": None,
               "moe.num_experts": None}
# What every MoE family's layer computes (model.moe.num_experts set: ``_is_moe``): softmax routing
# without groups, bias or scaling, dropless, every layer from the first MoE one on.
MOE_STYLE = {"moe.score_function": "softmax", "moe.capacity_factor": None, "moe.expert_bias": False,
             "moe.num_groups": None, "moe.topk_scaling_factor": None, "moe.layer_freq": 1,
             "moe.shared_expert_ffn_hidden_size": None, "moe.shared_expert_gate": False}


@dataclass(frozen=True)
class Family:
    """One HF architecture (module docstring). ``preset``: the configs/model file an import starts from."""

    model_type: str
    architecture: str
    preset: str
    read: Callable[[dict[str, Any], Optional[int]], dict[str, Any]]
    write: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]
    features: dict[str, Any] = field(default_factory=dict)
    fits_shape: Callable[[ModelConfig], bool] = lambda cfg: True

    def misfit(self, cfg: ModelConfig) -> Optional[str]:
        """Why ``cfg`` is not this family's architecture (None: it is)."""
        for key, value in self.features.items():
            ours = _get(cfg, key)
            if ours != value:
                return f"model.{key}={ours!r}, where {self.model_type} has {value!r}"
        return None if self.fits_shape(cfg) else f"the model's shape (attention, experts) is not {self.model_type}'s"


def _get(cfg: ModelConfig, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _without(features: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in features.items() if k not in keys}


def _moe_features(**changes: Any) -> dict[str, Any]:
    return {**_without(LLAMA_STYLE, "moe.num_experts"), **MOE_STYLE, **changes}


def _is_moe(cfg: ModelConfig) -> bool:
    return cfg.moe.num_experts is not None


def _one_expert_size(cfg: ModelConfig) -> bool:
    """Mixtral and OLMoE: every layer MoE, intermediate_size the experts'."""
    return _is_moe(cfg) and cfg.moe.first_dense_layers == 0


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama_tiny", _llama_style_read,
           lambda cfg: {**_llama_style_write(cfg), "attention_bias": False, "mlp_bias": False},
           _llama_style_rules, LLAMA_STYLE),
    Family("qwen2", "Qwen2ForCausalLM", "llama_tiny",  # q, k, v biases always (o_proj none)
           lambda hf, seq: {**_llama_style_read(hf, seq), "add_qkv_bias": True},
           lambda cfg: {**_llama_style_write(cfg), "use_sliding_window": False},
           _llama_style_rules, {**LLAMA_STYLE, "add_qkv_bias": True}),
    Family("qwen3", "Qwen3ForCausalLM", "llama_tiny",  # RMSNorm over each head's q and k before RoPE
           lambda hf, seq: {**_llama_style_read(hf, seq), "qk_layernorm": True, "qk_layernorm_mode": "head"},
           lambda cfg: {**_llama_style_write(cfg), "attention_bias": False, "use_sliding_window": False},
           _llama_style_rules, {**LLAMA_STYLE, "qk_layernorm": True, "qk_layernorm_mode": "head"}),
    Family("mistral", "MistralForCausalLM", "llama_tiny",  # a sliding window when it spans seq_length
           lambda hf, seq: _llama_style_read(hf, seq, window=True),
           lambda cfg: {**_llama_style_write(cfg), "sliding_window": cfg.sliding_window},
           _llama_style_rules, _without(LLAMA_STYLE, "sliding_window")),
    Family("gpt2", "GPT2LMHeadModel", "gpt_tiny", _gpt2_read, _gpt2_write, _gpt2_rules,
           {"normalization": "layernorm", "activation": "gelu", "position_embedding": "learned",
            "add_bias_linear": True, "tie_embeddings": True, "qk_layernorm": False, "sliding_window": None},
           lambda cfg: (cfg.num_query_groups or cfg.num_attention_heads) == cfg.num_attention_heads
           and head_dim(cfg) * cfg.num_attention_heads == cfg.hidden_size),
    Family("mixtral", "MixtralForCausalLM", "llama_tiny",  # experts w1 (gate), w3 (up), w2 (down)
           lambda hf, seq: _moe_read(hf, seq, {}, window=True, normalised=True),
           lambda cfg: _moe_write(cfg, "num_local_experts", intermediate_size=_expert_ffn(cfg), router_jitter_noise=0.0,
                                  sliding_window=cfg.sliding_window),
           _moe_rules("block_sparse_moe.", ("w1", "w3", "w2")),
           _moe_features(**{"moe.pre_softmax": False}), _one_expert_size),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "llama_tiny",
           lambda hf, seq: _moe_read(hf, seq, {"qk_layernorm": True, "qk_layernorm_mode": "head"}),
           lambda cfg: _qwen_moe_write(cfg, attention_bias=False), _moe_rules("mlp."),
           _moe_features(qk_layernorm=True, qk_layernorm_mode="head"), _is_moe),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "llama_tiny",  # q, k, v biases; a gated shared expert
           lambda hf, seq: _refuse(hf, {"qkv_bias": (True,)}) or _moe_read(hf, seq, {"add_qkv_bias": True}, shared=True),
           lambda cfg: _qwen_moe_write(cfg, qkv_bias=True,
                                       shared_expert_intermediate_size=cfg.moe.shared_expert_ffn_hidden_size),
           _moe_rules("mlp.", shared=True),
           _without(_moe_features(add_qkv_bias=True, **{"moe.shared_expert_gate": True}),
                    "moe.shared_expert_ffn_hidden_size"),
           lambda cfg: _is_moe(cfg) and cfg.moe.shared_expert_ffn_hidden_size is not None),
    Family("olmoe", "OlmoeForCausalLM", "llama_tiny",  # RMSNorm over the whole q and k projections
           lambda hf, seq: _moe_read(hf, seq, {"qk_layernorm": True, "qk_layernorm_mode": "projection"}),
           lambda cfg: _moe_write(cfg, "num_experts", intermediate_size=_expert_ffn(cfg), clip_qkv=None,
                                  attention_bias=False, norm_topk_prob=not cfg.moe.pre_softmax),
           _moe_rules("mlp."), _moe_features(qk_layernorm=True, qk_layernorm_mode="projection"), _one_expert_size),
)}
# The family a config without model.hf_model_type exports to: the first that fits.
INFERRED_ORDER = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe")


def family(cfg: ModelConfig) -> Family:
    """The family ``cfg`` maps onto: ``model.hf_model_type`` (which must fit), else the first that
    fits (UnsupportedModel, one line, if none does)."""
    if cfg.hf_model_type is not None:
        fam = FAMILIES[cfg.hf_model_type]
        reason = fam.misfit(cfg)
        if reason is not None:
            raise UnsupportedModel(f"model.hf_model_type={fam.model_type}: {reason}")
        return fam
    for name in INFERRED_ORDER:
        if FAMILIES[name].misfit(cfg) is None:
            return FAMILIES[name]
    raise UnsupportedModel(
        "model: no HF family fits this config; export supports LLaMA-style (rmsnorm, swiglu, rope, no biases; "
        "add_qkv_bias: qwen2; per-head qk_layernorm: qwen3) and GPT-2-style (layernorm, gelu, learned "
        "positions, biases, tied embeddings, MHA, no kv_channels) models, and LLaMA-style MoE models with "
        "dropless softmax routing (mixtral, qwen3_moe, qwen2_moe: a gated shared expert, olmoe)"
    )


def hf_family(hf: dict[str, Any]) -> Family:
    """The family of a HF config dict (``AutoConfig(...).to_dict()``), or one line saying why none."""
    kind = hf.get("model_type")
    if hf.get("kv_lora_rank") is not None:
        raise UnsupportedModel(f"config.json: kv_lora_rank={hf['kv_lora_rank']} ({kind}'s multi-head latent "
                               "attention) is not implemented by megatron_lite")
    if kind not in FAMILIES:
        raise UnsupportedModel(f"config.json: model_type {kind!r}: import supports {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def aux_loss_note(cfg: ModelConfig, hf_coef: float) -> str:
    """The line import and export print about the aux-loss coefficient's conversion."""
    moe = cfg.moe
    return (f"aux loss: HF router_aux_loss_coef={hf_coef:g} <-> model.moe.aux_loss_coeff={moe.aux_loss_coeff:g} "
            f"(= router_aux_loss_coef x top-k {moe.router_topk} / {sum(moe_layers(cfg))} MoE layers: HF's loss is "
            "top-k times Megatron's per layer and averaged over the layers; docs/checkpoints.md)")


def model_settings(hf: dict[str, Any], seq_length: Optional[int] = None) -> tuple[str, dict[str, Any]]:
    """(model preset, ``model.*`` keys) describing a HF config dict."""
    fam = hf_family(hf)
    keys = fam.read(hf, seq_length)
    keys.update(hf_model_type=fam.model_type, vocab_size=hf["vocab_size"], init_std=hf.get("initializer_range", 0.02))
    return fam.preset, keys


def _rules(cfg: ModelConfig) -> list[Rule]:
    """The family's rules, one per tensor: layer rules once per layer."""
    rules, moe = family(cfg).rules(cfg), moe_layers(cfg)
    return [r for r in rules if "{i}" not in r.ours] + [
        r.at_layer(i) for i in range(cfg.num_layers) for r in rules if "{i}" in r.ours and r.moe in (None, moe[i])]


def to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our full state dict -> the HF model's state dict (a tied lm_head left out, as transformers saves it)."""
    out = {}
    for rule in _rules(cfg):
        out.update(zip(rule.theirs, rule.to_hf(state[rule.ours], cfg), strict=True))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The HF model's state dict -> our full state dict (inverse of ``to_hf``, also reading a rule's
    ``fused`` key where the file has it; KeyError names a missing HF tensor)."""
    def one(r: Rule) -> Tensor:
        if r.fused is not None and r.fused in hf_state:
            return hf_state[r.fused]
        return r.from_hf(tuple(hf_state[k] for k in r.theirs), cfg)

    return {r.ours: one(r).contiguous() for r in _rules(cfg)}


def hf_keys(cfg: ModelConfig) -> set[str]:
    """Every HF tensor name an import of ``cfg`` reads (``from_hf``), in either spelling."""
    return {k for r in _rules(cfg) for k in (*r.theirs, *([r.fused] if r.fused else []))}


def hf_config(cfg: ModelConfig, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """The transformers config of ``cfg``'s family describing the same model, ``architectures`` set."""
    import transformers

    fam = family(cfg)
    config = transformers.AutoConfig.for_model(
        fam.model_type, vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **fam.write(cfg)
    )
    config.architectures = [fam.architecture]
    return config
