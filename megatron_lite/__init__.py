"""megatron_lite: Megatron-style tensor, pipeline and data parallel GPT pretraining."""

__version__ = "0.1.0"
