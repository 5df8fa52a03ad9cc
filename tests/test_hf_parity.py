"""Parity with an independent implementation: HuggingFace transformers' LlamaForCausalLM and
GPT2LMHeadModel, weights copied through the one name mapping in megatron_lite.model.hf."""

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.model import build_gpt
from megatron_lite.model.hf import from_hf, hf_config, to_hf

transformers = pytest.importorskip("transformers")
VOCAB = 256

CONFIGS = {
    "llama": ["model=llama_tiny", "model.num_layers=2", "model.seq_length=64"],
    "llama_tied_mqa": ["model=llama_tiny", "model.num_layers=2", "model.seq_length=64", "model.num_query_groups=1",
                       "model.tie_embeddings=true"],
    "llama3_rope_head_dim": ["model=llama_tiny", "model.num_layers=2", "model.seq_length=64", "model.kv_channels=32",
                             "model.rope_theta=500000", "model.rope_scaling.type=llama3",
                             "model.rope_scaling.original_max_position_embeddings=16"],
    "gpt2": ["model=gpt_tiny", "model.num_layers=2", "model.seq_length=64"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = load_config(CONFIGS[name]).model
    torch.manual_seed(0)
    hf_cls = transformers.LlamaForCausalLM if name.startswith("llama") else transformers.GPT2LMHeadModel
    hf_cfg = hf_config(cfg, VOCAB)
    hf_cfg._attn_implementation = "eager"
    hf_model = hf_cls(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones/zeros; perturb them so the mapping is tested
        for n, p in hf_model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))

    ours = build_gpt(cfg, VOCAB).eval()
    missing, unexpected = ours.load_state_dict(from_hf(hf_model.state_dict(), cfg), strict=False)
    assert not unexpected and not missing

    ids = torch.randint(0, VOCAB, (2, cfg.seq_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{name}: max logit error relative to max |logit| {err:.1e}")
    assert err < 1e-4

    round_trip = to_hf(dict(ours.state_dict()), cfg)
    hf_state = hf_model.state_dict()
    assert set(round_trip) == {k for k, v in hf_state.items() if k in dict(hf_model.named_parameters()) or k == "lm_head.weight"}
    for key, value in round_trip.items():
        assert torch.equal(value, hf_state[key]), key
