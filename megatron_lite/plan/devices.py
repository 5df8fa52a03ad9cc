"""Accelerator profiles for the planner (vendor datasheets; dense bf16 peak without sparsity).

Bandwidths are what one GPU can move in one direction: NVLink inside a node of 8 GPUs, and the
GPU's share of the node's InfiniBand across nodes (one 200 Gb/s HDR NIC per A100 in DGX A100, one
400 Gb/s NDR NIC per H100/H200/B200 in DGX H100/H200/B200). ``efficiency`` is the fraction of peak the
transformer's computation sustains when nothing waits for communication: the planner's one stated
assumption about kernels (an 8192³ bf16 matmul reaches ~0.8 of peak on H200; a whole layer with its
norms, softmax and elementwise ops less). It is not fitted per published row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float  # HBM
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per GPU per direction, inside a node
    internode_bandwidth: float  # bytes/s per GPU per direction, across nodes
    gpus_per_node: int = 8
    efficiency: float = 0.6  # sustained fraction of peak for the model's computation


GB = 1e9
DEVICES = {
    "A100-80G": Device("A100-80G", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB, efficiency=0.6),
    "H100-80G": Device("H100-80G", 989e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB, efficiency=0.6),
    "H200": Device("H200", 989e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB, efficiency=0.6),
    # HGX/DGX B200: 2.25 PFLOP/s dense bf16, 180 GB HBM3e at 7.7 TB/s, NVLink 5 (1.8 TB/s both
    # directions), one 400 Gb/s NIC per GPU. The efficiency is the same stated assumption, not
    # measured on a B200.
    "B200": Device("B200", 2.25e15, 180 * GB, 7.7e12, 900 * GB, 50 * GB, efficiency=0.6),
}


def device(name: str) -> Device:
    """The profile called ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"--device: unknown device {name!r}; use one of {', '.join(DEVICES)}") from None

# Dense FP8 tensor-core peak FLOP/s (datasheets, without sparsity): twice the bf16 peak on Hopper.
# Devices without FP8 tensor cores (A100) are absent: FP8 gives them no speed-up.
FP8_PEAK_FLOPS = {"H100-80G": 1979e12, "H200": 1979e12}
