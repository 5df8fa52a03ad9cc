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
    d = head_dim(cfg)
    attention_core = 2 * 2 * s * n * d * (0.5 if causal else 1.0)
    moe_count = sum(moe_layers(cfg))
    per_token = (cfg.num_layers * (_attention_linear_flops_per_token(cfg) + attention_core)
                 + (cfg.num_layers - moe_count) * _mlp_flops_per_token(cfg, cfg.ffn_hidden_size or 4 * h)
                 + (moe_count * _moe_mlp_flops_per_token(cfg) if moe_count else 0.0) + 2 * h * vocab_size)
    return 3.0 * global_batch_size * s * per_token


def _attention_linear_flops_per_token(cfg: ModelConfig) -> float:
    """One layer's QKV and output projection GEMMs per token, forward."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    g, d = cfg.num_query_groups or n, head_dim(cfg)
    return 2 * h * (n + 2 * g) * d + 2 * n * d * h


def _mlp_flops_per_token(cfg: ModelConfig, width: int) -> float:
    """One MLP of hidden width ``width`` per token, forward."""
    return 2 * cfg.hidden_size * width * (3 if cfg.activation == "swiglu" else 2)


def _moe_mlp_flops_per_token(cfg: ModelConfig) -> float:
    """What one token activates in an MoE layer: the router, k experts and the shared expert."""
    return 2 * cfg.hidden_size * cfg.moe.num_experts + _expert_flops_per_token(cfg)


def _expert_flops_per_token(cfg: ModelConfig) -> float:
    """The k experts and the shared expert one token activates in an MoE layer, forward."""
    moe = cfg.moe
    expert = moe.ffn_hidden_size or cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return (moe.router_topk * _mlp_flops_per_token(cfg, expert)
            + _mlp_flops_per_token(cfg, moe.shared_expert_ffn_hidden_size or 0))


def _linear_flops_per_token(cfg: ModelConfig) -> float:
    """A layer's QKV, output projection and MLP GEMMs per token, forward, averaged over the layers:
    an MoE layer's MLP GEMMs are the k experts' and the shared expert's a token activates (the
    router's small GEMM stays in high precision, as in Megatron)."""
    moe_count = sum(moe_layers(cfg))
    dense = _mlp_flops_per_token(cfg, cfg.ffn_hidden_size or 4 * cfg.hidden_size)
    experts = _expert_flops_per_token(cfg) if moe_count else 0.0
    mlp = ((cfg.num_layers - moe_count) * dense + moe_count * experts) / cfg.num_layers
    return _attention_linear_flops_per_token(cfg) + mlp


def linear_flops_per_iteration(cfg: ModelConfig, global_batch_size: int, layers: Optional[int] = None) -> float:
    """The part of ``model_flops_per_iteration`` in the transformer layers' linears (what FP8 runs),
    over ``layers`` layers (default all; a subset counts the average layer)."""
    layers = cfg.num_layers if layers is None else layers
    return 3.0 * global_batch_size * cfg.seq_length * layers * _linear_flops_per_token(cfg)
