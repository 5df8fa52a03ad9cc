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
The MoE families (``MOE_FAMILIES``) are refused until the MoE layer exists in this build; adding one is
declaring a ``Family`` whose rules map the router and the experts (HF stores experts one key per
expert, ``...experts.{e}.w1.weight``, or fused, ``...experts.gate_up_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import ModelConfig, head_dim

Tensor = torch.Tensor
# The training length an import picks when none is given (Llama 3.2 declares 131,072 positions).
DEFAULT_IMPORT_SEQ_LENGTH = 4096
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


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
    ``from_hf(tensors, cfg)`` is its inverse. Default: the same tensor under another name."""

    ours: str
    theirs: tuple[str, ...]
    to_hf: Callable[[Tensor, ModelConfig], tuple[Tensor, ...]] = lambda t, cfg: (t,)
    from_hf: Callable[[tuple[Tensor, ...], ModelConfig], Tensor] = lambda ts, cfg: ts[0]

    def at_layer(self, i: int) -> "Rule":
        return Rule(self.ours.format(i=i), tuple(t.format(i=i) for t in self.theirs), self.to_hf, self.from_hf)


def _separate_qkv(prefix: str, kind: str) -> Rule:
    """Our fused QKV weight or bias <-> q_proj, k_proj, v_proj."""
    return Rule(f"layers.{{i}}.attention.qkv.{kind}", tuple(f"{prefix}{n}_proj.{kind}" for n in "qkv"),
                split_qkv, lambda ts, cfg: merge_qkv(*ts, cfg))


def _conv1d(ours: str, theirs: str) -> Rule:
    """A GPT-2 Conv1D weight: stored [in, out]."""
    return Rule(ours, (theirs,), lambda t, cfg: (t.t(),), lambda ts, cfg: ts[0].t())


def _llama_style_rules(cfg: ModelConfig) -> list[Rule]:
    layer = "model.layers.{i}."
    attn, mlp = layer + "self_attn.", layer + "mlp."
    rules = [
        Rule("embedding.weight", ("model.embed_tokens.weight",)),
        Rule("final_norm.weight", ("model.norm.weight",)),
        Rule("layers.{i}.attention_norm.weight", (layer + "input_layernorm.weight",)),
        _separate_qkv(attn, "weight"),
        Rule("layers.{i}.attention.out.weight", (attn + "o_proj.weight",)),
        Rule("layers.{i}.mlp_norm.weight", (layer + "post_attention_layernorm.weight",)),
        Rule("layers.{i}.mlp.fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
             lambda t, cfg: tuple(t.chunk(2, dim=0)), lambda ts, cfg: torch.cat(ts)),
        Rule("layers.{i}.mlp.fc2.weight", (mlp + "down_proj.weight",)),
    ]
    if cfg.add_qkv_bias:
        rules.append(_separate_qkv(attn, "bias"))
    if cfg.qk_layernorm:
        rules += [Rule(f"layers.{{i}}.attention.{n}_norm.weight", (f"{attn}{n}_norm.weight",)) for n in "qk"]
    if not cfg.tie_embeddings:
        rules.append(Rule("output", ("lm_head.weight",)))
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


# Families -------------------------------------------------------------------------------------------
LLAMA_STYLE = {"normalization": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
               "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False, "sliding_window": None}


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
            if getattr(cfg, key) != value:
                return f"model.{key}={getattr(cfg, key)!r}, where {self.model_type} has {value!r}"
        return None if self.fits_shape(cfg) else f"the attention shape is not {self.model_type}'s"


def _without(features: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in features.items() if k not in keys}


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
)}
# The family a config without model.hf_model_type exports to: the first that fits.
INFERRED_ORDER = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


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
        "positions, biases, tied embeddings, MHA, no kv_channels) models"
    )


def hf_family(hf: dict[str, Any]) -> Family:
    """The family of a HF config dict (``AutoConfig(...).to_dict()``), or one line saying why none."""
    kind = hf.get("model_type")
    if hf.get("kv_lora_rank") is not None:
        raise UnsupportedModel(f"config.json: kv_lora_rank={hf['kv_lora_rank']} ({kind}'s multi-head latent "
                               "attention) is not implemented by megatron_lite")
    if kind in MOE_FAMILIES:
        raise UnsupportedModel(f"config.json: model_type {kind!r} is a mixture-of-experts family; the MoE layer "
                               "is not yet in this build, so its experts cannot be imported")
    if kind not in FAMILIES:
        raise UnsupportedModel(f"config.json: model_type {kind!r}: import supports {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def model_settings(hf: dict[str, Any], seq_length: Optional[int] = None) -> tuple[str, dict[str, Any]]:
    """(model preset, ``model.*`` keys) describing a HF config dict."""
    fam = hf_family(hf)
    keys = fam.read(hf, seq_length)
    keys.update(hf_model_type=fam.model_type, vocab_size=hf["vocab_size"], init_std=hf.get("initializer_range", 0.02))
    return fam.preset, keys


def _rules(cfg: ModelConfig) -> list[Rule]:
    """The family's rules, one per tensor: layer rules once per layer."""
    rules = family(cfg).rules(cfg)
    return [r for r in rules if "{i}" not in r.ours] + [
        r.at_layer(i) for i in range(cfg.num_layers) for r in rules if "{i}" in r.ours]


def to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our full state dict -> the HF model's state dict (a tied lm_head left out, as transformers saves it)."""
    out = {}
    for rule in _rules(cfg):
        out.update(zip(rule.theirs, rule.to_hf(state[rule.ours], cfg), strict=True))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The HF model's state dict -> our full state dict (inverse of ``to_hf``; KeyError names a
    missing HF tensor)."""
    return {r.ours: r.from_hf(tuple(hf_state[k] for k in r.theirs), cfg).contiguous() for r in _rules(cfg)}


def hf_config(cfg: ModelConfig, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """The transformers config of ``cfg``'s family describing the same model, ``architectures`` set."""
    import transformers

    fam = family(cfg)
    config = transformers.AutoConfig.for_model(
        fam.model_type, vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **fam.write(cfg)
    )
    config.architectures = [fam.architecture]
    return config
