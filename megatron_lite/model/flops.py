"""Model FLOPs per training iteration (Megatron-LM's formula; Narayanan et al. 2021, appendix).

Counts the matrix multiplications only, 2 FLOPs per multiply-add, and 3× the forward for a training
step (the backward computes gradients for inputs and for weights). Per layer and token, forward:

    QKV projection      2·h·(n + 2g)·d
    attention core      2·2·s·n·d, halved when causal (only the lower triangle is computed)
    output projection   2·n·d·h
    MLP                 2·h·f·(3 for SwiGLU: gate, up, down; else 2)
and once per token the logits, 2·h·V. Recomputation is not counted (model FLOPs, not hardware FLOPs).
An MoE layer's MLP is what a token activates: the router 2·h·E, k experts of width f_e and the shared
expert (Megatron-LM's MoE count); padding and dropped tokens are not counted.
"""

from __future__ import annotations

from typing import Optional

from ..config import ModelConfig, head_dim, moe_layers

# Dense peak FLOP/s per GPU (vendor datasheets, without sparsity): (name fragment, bf16/fp16 tensor
# core, TF32 tensor core, FP32). Matched in order against torch.cuda.get_device_name(), most
# specific first: the PCIe and NVL parts of a GPU run at lower clocks and power than the SXM one.
PEAK_FLOPS: list[tuple[str, float, float, float]] = [
    ("B200", 2.25e15, 1.1e15, 75e12),  # HGX/DGX B200 (the datasheet's sparse figures halved)
    ("H200 NVL", 835e12, 417.5e12, 60e12),
    ("H200", 989e12, 494.5e12, 67e12),  # SXM (also GH200)
    ("H100 NVL", 835e12, 417.5e12, 60e12),
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100", 989e12, 494.5e12, 67e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12, 156e12, 19.5e12),  # SXM and PCIe alike
]


def peak_flops(gpu_name: str, precision: str, tf32: bool) -> Optional[float]:
    """The peak the MFU of a run is measured against: the bf16/fp16 tensor-core peak for bf16 and
    fp16 runs; for fp32 runs the TF32 peak if matmuls may use TF32 (``tf32``), else the FP32 peak.
    None for a GPU not in ``PEAK_FLOPS``."""
    for fragment, half, tf32_peak, fp32 in PEAK_FLOPS:
        if fragment in gpu_name:
            return half if precision in ("bf16", "fp16") else (tf32_peak if tf32 else fp32)
    return None


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
    attention = 2 * h * (n + 2 * g) * d + attention_core + 2 * n * d * h
    dense_mlp = 2 * h * f * mlp_matrices
    moe = cfg.moe
    moe_count = sum(moe_layers(cfg))
    moe_mlp = 0.0
    if moe_count:
        expert = moe.ffn_hidden_size or f
        moe_mlp = 2 * h * moe.num_experts + moe.router_topk * 2 * h * expert * mlp_matrices
        moe_mlp += 2 * h * (moe.shared_expert_ffn_hidden_size or 0) * mlp_matrices
    per_token = (cfg.num_layers * attention + (cfg.num_layers - moe_count) * dense_mlp + moe_count * moe_mlp
                 + 2 * h * vocab_size)
    return 3.0 * global_batch_size * s * per_token
