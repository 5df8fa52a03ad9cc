"""FP8 training: quantisation and the FP8 GEMM (tensor.py), recipes and delayed scaling (recipe.py),
a linear layer's three FP8 GEMMs (linear.py), the FP8 sequence-parallel all-gather (comm.py), which
layers of a model run FP8 and their checkpointed state (model.py), Transformer Engine's guard (te.py).
docs/fp8.md describes the whole."""
