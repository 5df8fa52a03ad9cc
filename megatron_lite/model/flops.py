"""Model FLOPs per training iteration (Megatron-LM's formula; Narayanan et al. 2021, appendix).

Counts the matrix multiplications only, 2 FLOPs per multiply-add, and 3× the forward for a training
step (the backward computes gradients for inputs and for weights). Per layer and token, forward:

    QKV projection      2·h·(n + 2g)·d
    attention core      2·2·s·n·d, halved when causal (only the lower triangle is computed)
    output projection   2·n·d·h
    MLP                 2·h·f·(3 for SwiGLU: gate, up, down; else 2)
and once per token the logits, 2·h·V. Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from ..config import ModelConfig, head_dim


def model_flops_per_iteration(cfg: ModelConfig, vocab_size: int, global_batch_size: int, causal: bool = True) -> float:
    """FLOPs of one training iteration (forward + backward) over ``global_batch_size`` sequences.

    ``vocab_size`` is the padded vocabulary. ``causal=False`` gives the classic Megatron count, which
    charges the full s×s attention matrix (as Megatron-LM's papers and README tables do).
    """
    h, s, n = cfg.hidden_size, cfg.seq_length, cfg.num_attention_heads
    g = cfg.num_query_groups or n
    d = head_dim(cfg)
    f = cfg.ffn_hidden_size or 4 * h
    mlp_matrices = 3 if cfg.activation == "swiglu" else 2
    attention_core = 2 * 2 * s * n * d * (0.5 if causal else 1.0)
    per_layer = 2 * h * (n + 2 * g) * d + attention_core + 2 * n * d * h + 2 * h * f * mlp_matrices
    per_token = cfg.num_layers * per_layer + 2 * h * vocab_size
    return 3.0 * global_batch_size * s * per_token
