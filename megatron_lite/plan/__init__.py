"""The planner: per-rank memory, FLOPs, step time and MFU of a layout before launching it, and a
search over every valid layout (``python -m megatron_lite.plan --help``).

    memory.py     parameters, gradients, optimizer state, activations (Korthikanti et al. 2022)
    estimate.py   one layout's prediction: step time by cause, MFU
    search.py     every valid TP × PP × VPP × DP × micro-batch layout, ranked
    devices.py    A100-80G, H100-80G, H200 profiles
    published.py  Megatron-LM's published throughput and the planner's prediction of it
"""

from .devices import DEVICES, Device, device
from .estimate import Prediction, Setup, predict, setup_from_config
from .search import search

__all__ = ["DEVICES", "Device", "Prediction", "Setup", "device", "predict", "search", "setup_from_config"]
