"""Rotary position embedding tables (Su et al. 2021), with Llama 3.x's frequency scaling.

Pair i of a head's d dimensions turns by position · ω_i, ω_i = θ^(−2i/d). Llama 3.1 (Meta's
``apply_scaling``; HF's ``rope_type: llama3``) stretches the slow pairs to extend the context: with
wavelength λ_i = 2π/ω_i, the original training length L and factors (α_low, α_high, k):

    λ_i < L / α_high            ω_i unchanged (fast pairs, local order)
    λ_i > L / α_low             ω_i / k       (slow pairs, positions beyond L)
    otherwise                   (1 − r)·ω_i/k + r·ω_i,   r = (L/λ_i − α_low) / (α_high − α_low)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import RopeScalingConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScalingConfig] = None) -> torch.Tensor:
    """ω_i for i < head_dim/2, float64, after ``scaling`` (None or ``type`` None: unscaled)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None or scaling.type is None:
        return inv_freq
    k, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    length = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    ratio = ((length / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow pair, 1: fast pair
    return (1 - ratio) * inv_freq / k + ratio * inv_freq


def rotary_tables(
    seq_length: int, head_dim: int, theta: float, scaling: Optional[RopeScalingConfig] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_length, head_dim/2], float32 (angles computed in float64)."""
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float64), inverse_frequencies(head_dim, theta, scaling))
    return angles.cos().float(), angles.sin().float()
