"""Parity with an independent implementation: transformers' *ForCausalLM of every dense family
(LlamaForCausalLM, Qwen2, Qwen3, Mistral, GPT2LMHeadModel), weights copied through the one name
mapping in megatron_lite.model.hf; and the whole-projection q/k norm (qk_layernorm_mode=projection)
against OLMo 2's attention module, the HF family that normalises that way (OLMoE's attention is the
same)."""

import pytest
import torch
from hf_models import perturb

from megatron_lite.config import load_config
from megatron_lite.model import build_gpt
from megatron_lite.model.hf import family, from_hf, hf_config, merge_qkv, to_hf

transformers = pytest.importorskip("transformers")
VOCAB = 256
LLAMA = ["model=llama_tiny", "model.num_layers=2", "model.seq_length=64"]

CONFIGS = {
    "llama": LLAMA,
    "llama_tied_mqa": LLAMA + ["model.num_query_groups=1", "model.tie_embeddings=true"],
    "llama3_rope_head_dim": LLAMA + ["model.kv_channels=32", "model.rope_theta=500000", "model.rope_scaling.type=llama3",
                                     "model.rope_scaling.original_max_position_embeddings=16"],
    "qwen2": LLAMA + ["model.add_qkv_bias=true", "model.tie_embeddings=true", "model.rope_theta=1000000"],
    "qwen3": LLAMA + ["model.qk_layernorm=true", "model.kv_channels=32"],
    "mistral": LLAMA + ["model.hf_model_type=mistral", "model.sliding_window=64"],
    "gpt2": ["model=gpt_tiny", "model.num_layers=2", "model.seq_length=64"],
}


def _max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = load_config(CONFIGS[name]).model
    torch.manual_seed(0)
    hf_cfg = hf_config(cfg, VOCAB)
    hf_cfg._attn_implementation = "eager"
    hf_model = perturb(transformers.AutoModelForCausalLM.from_config(hf_cfg).eval())
    assert type(hf_model).__name__ == family(cfg).architecture

    ours = build_gpt(cfg, VOCAB).eval()
    missing, unexpected = ours.load_state_dict(from_hf(hf_model.state_dict(), cfg), strict=False)
    assert not unexpected and not missing

    ids = torch.randint(0, VOCAB, (2, cfg.seq_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    err = _max_rel(got, ref)
    print(f"{name}: max logit error relative to max |logit| {err:.1e}")
    assert err < 1e-4

    round_trip = to_hf(dict(ours.state_dict()), cfg)  # a tied lm_head is left out, as transformers saves it
    hf_state = hf_model.state_dict()
    assert set(round_trip) == set(hf_state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    for key, value in round_trip.items():
        assert torch.equal(value, hf_state[key]), key


def test_projection_qk_norm_matches_olmo2_attention():
    """RMSNorm over the whole q (n·d) and k (g·d) projection, before RoPE, with GQA."""
    from transformers.models.olmo2 import modeling_olmo2

    from megatron_lite.model.rotary import rotary_tables
    from megatron_lite.model.transformer import Attention
    from megatron_lite.parallel.collectives import TPGroup
    from megatron_lite.tensor_parallel import ModelRNG

    cfg = load_config(LLAMA + ["model.qk_layernorm=true", "model.qk_layernorm_mode=projection"]).model
    d, s = cfg.hidden_size // cfg.num_attention_heads, cfg.seq_length
    hf_cfg = transformers.Olmo2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta,
        attention_bias=False, max_position_embeddings=s,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = modeling_olmo2.Olmo2Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.5) + (p.ndim == 1))  # norm weights ≈ 1
    ours = Attention(cfg, TPGroup(), ModelRNG(0)).eval()
    ours.load_state_dict({
        "qkv.weight": merge_qkv(*(getattr(theirs, f"{n}_proj").weight for n in "qkv"), cfg),
        "out.weight": theirs.o_proj.weight, "q_norm.weight": theirs.q_norm.weight, "k_norm.weight": theirs.k_norm.weight,
    })
    x = torch.randn(2, s, cfg.hidden_size)
    cos, sin = rotary_tables(s, d, cfg.rope_theta)
    causal = torch.full((s, s), float("-inf")).triu(1).expand(2, 1, s, s)
    with torch.no_grad():
        emb = torch.cat((cos, cos), -1).expand(2, s, d), torch.cat((sin, sin), -1).expand(2, s, d)
        ref = theirs(x, position_embeddings=emb, attention_mask=causal)[0]
        got = ours(x, (cos, sin))
    print(f"projection q/k norm vs Olmo2Attention: {_max_rel(got, ref):.1e}")
    assert _max_rel(got, ref) < 1e-5


@pytest.mark.parametrize("overrides,expected", [
    ([], "llama"), (["model.add_qkv_bias=true"], "qwen2"), (["model.qk_layernorm=true"], "qwen3"),
    (["model.sliding_window=128"], "mistral"), (["model.hf_model_type=mistral"], "mistral"),
    (["model.hf_model_type=qwen3"], "model.hf_model_type=qwen3: model.qk_layernorm=False, where qwen3 has True"),
    (["model.qk_layernorm=true", "model.qk_layernorm_mode=projection"], "model: no HF family fits this config"),
])
def test_export_family_is_the_declared_one_or_the_first_that_fits(overrides, expected):
    """A checkpoint exports to model.hf_model_type (set by the import) when its config fits it, else to
    the first family that fits; a config no family represents is one line."""
    from megatron_lite.model.hf import UnsupportedModel

    cfg = load_config(LLAMA + overrides).model
    if expected in ("llama", "qwen2", "qwen3", "mistral"):
        assert family(cfg).model_type == expected
    else:
        with pytest.raises(UnsupportedModel, match=expected):
            family(cfg)
