"""GPU details tested on the CPU through the decisions they make (issue 15, item 5): RoPE tables
that stay fp32 in a bf16 model, the GPU a rank binds to, the peak MFU is measured against (with
Megatron's non-causal count beside ours), and SDPA dropout that follows the TP-aware generator."""

from __future__ import annotations

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.model import build_gpt, model_flops_per_iteration
from megatron_lite.model.flops import peak_flops
from megatron_lite.model.rotary import rotary_tables
from megatron_lite.model.transformer import Attention
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.parallel.state import local_cuda_device, process_group_options
from megatron_lite.tensor_parallel import ModelRNG

LLAMA = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    seq_length=64, normalization="rmsnorm", activation="swiglu", position_embedding="rope",
                    add_bias_linear=False, tie_embeddings=False)


def test_rope_tables_stay_fp32_in_a_bf16_model():
    """chunk.to(bf16) casts parameters and buffers, but the cos/sin tables stay fp32 and exact: bf16
    tables are off by up to 2^-9 relative (~0.4 % of an angle's sine near 1)."""
    model = build_gpt(LLAMA, 128, TPGroup(), seed=1).to(torch.bfloat16)
    cos, sin = rotary_tables(LLAMA.seq_length, 16, LLAMA.rope_theta)
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (sin.bfloat16().float() - sin).abs().max() > 1e-3  # what the cast would have lost


def test_reference_rotary_rounds_once():
    """bf16 activations rotated with fp32 tables: one rounding at the end, like the fused kernels."""
    from megatron_lite.ops import reference

    x = torch.randn(2, 64, 4, 16, dtype=torch.bfloat16)
    cos, sin = rotary_tables(64, 16, 10000.0)
    exact = reference.rotary(x.double(), cos.double(), sin.double())
    error = (reference.rotary(x, cos, sin).double() - exact).abs() / exact.abs().clamp_min(1e-2)
    assert error.max() <= 2**-8


@pytest.mark.parametrize("local_rank,count,expected", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (5, 4, 1)])
def test_rank_device_is_local_rank_modulo_visible_gpus(local_rank, count, expected):
    """SLURM --gpus-per-task=1 shows each task one GPU: local rank 3 uses cuda:0, not cuda:3."""
    assert local_cuda_device(local_rank, count) == torch.device("cuda", expected)
    assert process_group_options("nccl", local_rank, count) == {"device_id": torch.device("cuda", expected)}
    assert process_group_options("gloo", local_rank, 0) == {}


def test_no_visible_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        local_cuda_device(0, 0)


@pytest.mark.parametrize("name,precision,tf32,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989e12),
    ("NVIDIA H100 PCIe", "bf16", False, 756e12),
    ("NVIDIA H100 NVL", "bf16", False, 835e12),
    ("NVIDIA H200", "bf16", False, 989e12),
    ("NVIDIA H200 NVL", "fp16", False, 835e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5e12),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67e12),
    ("NVIDIA H100 PCIe", "fp32", False, 51e12),
    ("NVIDIA GeForce RTX 4090", "bf16", False, None),
])
def test_peak_by_gpu_name_and_precision(name, precision, tf32, peak):
    assert peak_flops(name, precision, tf32) == peak


def test_noncausal_count_charges_the_full_attention_matrix():
    """Megatron's count minus ours is the upper triangle of QKᵀ and of ·V: 3·L·2·2·s·h/2 per token."""
    cfg = ModelConfig(num_layers=48, hidden_size=1600, num_attention_heads=25, ffn_hidden_size=6400, seq_length=2048)
    ours = model_flops_per_iteration(cfg, 50304, 8)
    megatron = model_flops_per_iteration(cfg, 50304, 8, causal=False)
    expected = 3 * 8 * 2048 * 48 * (2 * 2 * 2048 * 1600) / 2
    assert megatron - ours == pytest.approx(expected)


def _sdpa_attention(tp_rank: int, seed: int = 3) -> tuple[Attention, ModelRNG]:
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, seq_length=16, dropout=0.5, attention_backend="sdpa")
    rng = ModelRNG(seed, tp_rank=tp_rank)
    attention = Attention(cfg, TPGroup(), rng).train()
    torch.manual_seed(0)
    for p in attention.parameters():  # the same weights on both "ranks" (TP size 1 here)
        torch.nn.init.normal_(p, std=0.2)
    return attention, rng


def test_sdpa_dropout_follows_the_tp_aware_generator():
    """The masks of SDPA's dropout come from ModelRNG.tensor_parallel: independent of the global RNG,
    different per TP rank, advancing the generator (so checkpointing it resumes the same masks), and
    the global generator is left as it was."""
    x = torch.randn(2, 16, 64)
    outputs = []
    for global_seed in (11, 12):
        attention, rng = _sdpa_attention(tp_rank=0)
        torch.manual_seed(global_seed)
        before_global = torch.get_rng_state()
        before_tp = rng.tensor_parallel.get_state()
        outputs.append(attention(x, None))
        assert torch.equal(torch.get_rng_state(), before_global)
        assert not torch.equal(rng.tensor_parallel.get_state(), before_tp)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    other_rank, _ = _sdpa_attention(tp_rank=1)
    assert not torch.allclose(other_rank(x, None), outputs[0])
