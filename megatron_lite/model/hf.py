"""Weight-name mapping between megatron_lite's full (unsharded) state dict and HuggingFace
transformers' LlamaForCausalLM / GPT2LMHeadModel. Written once; the model parity tests and the
checkpoint import/export both use it.

Our fused QKV weight is laid out per query group ([q heads of group j, k_j, v_j] for each j); HF keeps
separate q/k/v projections (LLaMA) or one [q | k | v] matrix (GPT-2). GPT-2's Conv1D stores weights
as [in, out], transposed relative to nn.Linear. SwiGLU's fc1 is [gate; up].
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, head_dim

Tensor = torch.Tensor


def family(cfg: ModelConfig) -> str:
    """``llama`` or ``gpt2``: the HF architecture this config maps onto (ValueError if neither)."""
    if (cfg.normalization, cfg.activation, cfg.position_embedding) == ("rmsnorm", "swiglu", "rope") and (
        not cfg.add_bias_linear
    ):
        return "llama"
    if (cfg.normalization, cfg.activation, cfg.position_embedding) == ("layernorm", "gelu", "learned") and (
        cfg.add_bias_linear and cfg.tie_embeddings and (cfg.num_query_groups or cfg.num_attention_heads) == cfg.num_attention_heads
        and head_dim(cfg) * cfg.num_attention_heads == cfg.hidden_size
    ):
        return "gpt2"
    raise ValueError(
        "model: HF interop supports LLaMA-style (rmsnorm, swiglu, rope, no biases) and GPT-2-style (layernorm, gelu, "
        "learned positions, biases, tied embeddings, MHA, no kv_channels) configs"
    )


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


def _llama_layer_names(i: int) -> dict[str, str]:
    return {
        f"layers.{i}.attention_norm.weight": f"model.layers.{i}.input_layernorm.weight",
        f"layers.{i}.attention.out.weight": f"model.layers.{i}.self_attn.o_proj.weight",
        f"layers.{i}.mlp_norm.weight": f"model.layers.{i}.post_attention_layernorm.weight",
        f"layers.{i}.mlp.fc2.weight": f"model.layers.{i}.mlp.down_proj.weight",
    }


def _gpt2_layer_names(i: int) -> dict[str, str]:
    names = {}
    for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
        for kind in ("weight", "bias"):
            names[f"layers.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    return names


# Our Linear weights that GPT-2 stores as Conv1D ([in, out]); biases need no transpose.
_GPT2_CONV1D = {"attention.out": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our full state dict -> the HF model's state dict."""
    fam, out = family(cfg), {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if fam == "llama":
            out.update({theirs: state[ours] for ours, theirs in _llama_layer_names(i).items()})
            hf = f"model.layers.{i}."
            for name, t in zip(("q_proj", "k_proj", "v_proj"), split_qkv(state[p + "attention.qkv.weight"], cfg)):
                out[hf + f"self_attn.{name}.weight"] = t
            gate, up = state[p + "mlp.fc1.weight"].chunk(2, dim=0)
            out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        else:
            out.update({theirs: state[ours] for ours, theirs in _gpt2_layer_names(i).items()})
            hf = f"transformer.h.{i}."
            for kind in ("weight", "bias"):
                q, k, v = split_qkv(state[p + f"attention.qkv.{kind}"], cfg)
                qkv = torch.cat((q, k, v), dim=0)
                out[hf + f"attn.c_attn.{kind}"] = qkv.t() if kind == "weight" else qkv
            for ours, theirs in _GPT2_CONV1D.items():
                out[hf + f"{theirs}.weight"] = state[p + f"{ours}.weight"].t()
                out[hf + f"{theirs}.bias"] = state[p + f"{ours}.bias"]
    if fam == "llama":
        out["model.embed_tokens.weight"] = state["embedding.weight"]
        out["model.norm.weight"] = state["final_norm.weight"]
        out["lm_head.weight"] = state["embedding.weight" if cfg.tie_embeddings else "output"]
    else:
        out["transformer.wte.weight"] = state["embedding.weight"]
        out["transformer.wpe.weight"] = state["position_embedding"]
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = state["final_norm.bias"]
        out["lm_head.weight"] = state["embedding.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The HF model's state dict -> our full state dict (inverse of ``to_hf``)."""
    fam, out = family(cfg), {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        if fam == "llama":
            out.update({ours: hf_state[theirs] for ours, theirs in _llama_layer_names(i).items()})
            hf = f"model.layers.{i}."
            q, k, v = (hf_state[hf + f"self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj"))
            out[p + "attention.qkv.weight"] = merge_qkv(q, k, v, cfg)
            out[p + "mlp.fc1.weight"] = torch.cat((hf_state[hf + "mlp.gate_proj.weight"], hf_state[hf + "mlp.up_proj.weight"]))
        else:
            out.update({ours: hf_state[theirs] for ours, theirs in _gpt2_layer_names(i).items()})
            hf = f"transformer.h.{i}."
            for kind in ("weight", "bias"):
                qkv = hf_state[hf + f"attn.c_attn.{kind}"]
                q, k, v = (qkv.t() if kind == "weight" else qkv).chunk(3, dim=0)
                out[p + f"attention.qkv.{kind}"] = merge_qkv(q, k, v, cfg)
            for ours, theirs in _GPT2_CONV1D.items():
                out[p + f"{ours}.weight"] = hf_state[hf + f"{theirs}.weight"].t()
                out[p + f"{ours}.bias"] = hf_state[hf + f"{theirs}.bias"]
    if fam == "llama":
        out["embedding.weight"] = hf_state["model.embed_tokens.weight"]
        out["final_norm.weight"] = hf_state["model.norm.weight"]
        if not cfg.tie_embeddings:
            out["output"] = hf_state["lm_head.weight"]
    else:
        out["embedding.weight"] = hf_state["transformer.wte.weight"]
        out["position_embedding"] = hf_state["transformer.wpe.weight"]
        out["final_norm.weight"] = hf_state["transformer.ln_f.weight"]
        out["final_norm.bias"] = hf_state["transformer.ln_f.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """A transformers config (LlamaConfig or GPT2Config) describing the same model.

    RoPE goes in as ``rope_theta`` and ``rope_scaling``, which transformers 4 keeps as they are and
    transformers 5 turns into ``rope_parameters``.
    """
    import transformers

    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if family(cfg) == "llama":
        scaling = cfg.rope_scaling
        rope_scaling = None if scaling.type is None else {
            "rope_type": scaling.type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=ffn,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
            head_dim=head_dim(cfg), max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_epsilon,
            rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False, mlp_bias=False, hidden_act="silu", attention_dropout=0.0,
            initializer_range=cfg.init_std, **special,
        )
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=ffn, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, initializer_range=cfg.init_std, **special,
    )
