"""The model-FLOPs count against a hand count and against Megatron's closed form."""

from megatron_lite.config import ModelConfig
from megatron_lite.model import model_flops_per_iteration


def test_hand_count_gpt():
    cfg = ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=32, seq_length=4)
    # Per token, forward: QKV 2·8·24 = 384, attention core 2·2·4·8 = 128 (causal: 64),
    # out 2·8·8 = 128, MLP 2·8·32·2 = 1024 -> 1600 (causal) per layer; logits 2·8·16 = 256.
    per_token = 2 * 1600 + 256
    assert model_flops_per_iteration(cfg, vocab_size=16, global_batch_size=3) == 3 * 3 * 4 * per_token
    assert model_flops_per_iteration(cfg, 16, 3, causal=False) == 3 * 3 * 4 * (2 * 1664 + 256)


def test_hand_count_swiglu_gqa():
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=16, seq_length=2, activation="swiglu")
    # QKV 2·8·(4+4)·2 = 256, core 2·2·2·8/2 = 32, out 128, MLP 2·8·16·3 = 768, logits 2·8·10 = 160.
    assert model_flops_per_iteration(cfg, 10, 1) == 3 * 2 * (256 + 32 + 128 + 768 + 160)


def test_megatron_closed_form():
    """Non-causal, MHA, ffn = 4h: 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)) (Narayanan et al. 2021)."""
    cfg = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192, seq_length=2048)
    B, s, l, h, V = 512, 2048, 24, 2048, 51200
    expected = 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
    assert abs(model_flops_per_iteration(cfg, V, B, causal=False) / expected - 1) < 1e-12
