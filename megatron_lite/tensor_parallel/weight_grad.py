"""Weight gradients of the linear and embedding layers: straight into the fp32 ``main_grad``, now or
later.

Gradient-accumulation fusion (Megatron's ``gradient_accumulation_fusion``). When a ``GradBuffer``
owns a parameter (``attach_main_grad``: ``param.main_grad``, an fp32 view into the flat buffer, and
``param.grad_sink``, the buffer), the layer's backward hands its weight-gradient work to the sink,
which writes it into ``main_grad`` (the step's first contribution overwrites, later ones
accumulate, so the buffer needs no zeroing) and counts it (to start overlapped DP reductions).
fp32 models: one GEMM into the view, ``torch.mm(dyᵀ, x, out=main_grad)`` or
``main_grad.addmm_(dyᵀ, x)``. bf16/fp16 on CUDA: a GEMM with an fp32 output
(``torch.mm(dyᵀ, x, out_dtype=torch.float32)``, torch ≥ 2.8), written into or added to the view, so
a microbatch's gradient is never rounded to 16 bits (the rounded product, added in fp32, was 0.17 %
off after 8 microbatches); on the CPU, which has no such kernel, the product in the parameter's dtype
(fp32 accumulation inside the GEMM, one rounding), copied or added once (``fp32_gemm``). The embedding adds its rows with ``index_add_`` (no dense
[V, h] gradient). Autograd never sees these gradients: no ``param.grad`` is allocated, copied and
freed per microbatch. Without a buffer the gradient goes back to autograd (``param.grad``) as for
any torch layer.

The split backward (zero-bubble pipeline schedules) defers the same work::

    store = WeightGradStore()
    with defer_weight_grads(store):
        torch.autograd.backward(outputs, grads)   # input gradients; weight-gradient work queued
    store.run()                                   # every queued weight gradient, in posting order

Inside ``defer_weight_grads`` the linear layers append their (input, output-gradient) work to
``store`` instead of computing it, and so does the embedding (its rows: a tied output layer's and
the embedding's contributions stay in order); norms and biases finish in the backward itself.
``run`` performs each item exactly as the immediate path would (the same ops in the same order per
parameter: the gradients are bit-identical to a normal backward) and hands each to the grad sink as
the backward would have, so a bucket's overlapped reduction starts when its last weight gradient is
done. A store keeps, per linear item, the layer's full input (under sequence parallelism the
re-gathered [b, s, in], not the shard) and its output gradient, until ``run``.

The active store is module state, not thread-local: on a GPU autograd runs the backward of CUDA
tensors in its own device thread.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Protocol

import torch
from torch import nn

from ..fp8.tensor import Float8
from ..fp8.tensor import mm as fp8_mm


class WeightGradWork(Protocol):
    """One layer's pending weight gradient for one backward."""

    def write_to(self, main_grad: torch.Tensor) -> None:
        """Overwrite the fp32 ``main_grad`` (the parameter's shape) with the gradient."""

    def add_to(self, main_grad: torch.Tensor) -> None:
        """Accumulate the gradient into the fp32 ``main_grad``."""

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        """The gradient as a new tensor in ``weight``'s dtype (no GradBuffer)."""


# torch's GEMM with an fp32 output for 16-bit inputs (``mm.dtype``, torch ≥ 2.8), and the devices
# that have a kernel for it (not the CPU).
FP32_OUT_GEMM = "dtype" in torch.ops.aten.mm.overloads()
FP32_OUT_DEVICES = ("cuda",)


def fp32_gemm(inputs: torch.Tensor, main_grad: torch.Tensor) -> bool:
    """Whether dyᵀx of 16-bit ``inputs`` goes to the fp32 ``main_grad`` through a GEMM with an fp32
    output (no rounding to 16 bits on the way): bf16/fp16 inputs on a device with that kernel."""
    return (FP32_OUT_GEMM and inputs.device.type in FP32_OUT_DEVICES and main_grad.dtype == torch.float32
            and inputs.dtype in (torch.bfloat16, torch.float16))


class LinearWeightGrad:
    """dW = dyᵀ x for y = x Wᵀ: ``grad_output`` [N, out] and ``inputs`` [N, in] (tokens flattened)."""

    def __init__(self, grad_output: torch.Tensor, inputs: torch.Tensor):
        self.grad_output, self.inputs = grad_output, inputs

    def write_to(self, main_grad: torch.Tensor) -> None:
        if self.inputs.dtype == main_grad.dtype:
            torch.mm(self.grad_output.t(), self.inputs, out=main_grad)
        elif fp32_gemm(self.inputs, main_grad):
            torch.mm(self.grad_output.t(), self.inputs, out_dtype=torch.float32, out=main_grad)
        else:
            main_grad.copy_(torch.mm(self.grad_output.t(), self.inputs))

    def add_to(self, main_grad: torch.Tensor) -> None:
        if self.inputs.dtype == main_grad.dtype:
            main_grad.addmm_(self.grad_output.t(), self.inputs)
        elif fp32_gemm(self.inputs, main_grad):
            main_grad.add_(torch.mm(self.grad_output.t(), self.inputs, out_dtype=torch.float32))
        else:
            main_grad.add_(torch.mm(self.grad_output.t(), self.inputs))

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.grad_output.t(), self.inputs)


class Float8WeightGrad:
    """dW = dyᵀ x as an FP8 GEMM (fp8/linear.py): ``grad_output_t`` [out, N] and ``inputs_t`` [in, N],
    quantised along the tokens N, the axis the GEMM contracts. The product (fp32 on the CPU, the
    activations' dtype from a GPU's FP8 GEMM) is written or added into ``main_grad`` once."""

    def __init__(self, grad_output_t: Float8, inputs_t: Float8):
        self.grad_output_t, self.inputs_t = grad_output_t, inputs_t

    def _product(self, dtype: torch.dtype) -> torch.Tensor:
        return fp8_mm(self.grad_output_t, self.inputs_t, dtype)

    def write_to(self, main_grad: torch.Tensor) -> None:
        main_grad.copy_(self._product(main_grad.dtype))

    def add_to(self, main_grad: torch.Tensor) -> None:
        main_grad.add_(self._product(main_grad.dtype))

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        return self._product(weight.dtype)


class EmbeddingWeightGrad:
    """dE[i] = Σ over the positions that looked up row i of their output gradient: ``ids`` [N] (local
    rows), ``grad_rows`` [N, h]."""

    def __init__(self, ids: torch.Tensor, grad_rows: torch.Tensor):
        self.ids, self.grad_rows = ids, grad_rows

    def write_to(self, main_grad: torch.Tensor) -> None:
        self.add_to(main_grad.zero_())

    def add_to(self, main_grad: torch.Tensor) -> None:
        main_grad.index_add_(0, self.ids, self.grad_rows.to(main_grad.dtype))

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(weight).index_add_(0, self.ids, self.grad_rows.to(weight.dtype))


class GradSink(Protocol):
    """Who owns a parameter's ``main_grad`` (the GradBuffer)."""

    def accumulate(self, param: nn.Parameter, work: WeightGradWork, notify: bool) -> None:
        """Put one contribution to ``param``'s gradient into its ``main_grad``; ``notify``: count
        it as this backward's gradient of ``param`` (see ``weight_grad``)."""


def attach_main_grad(param: nn.Parameter, main_grad: torch.Tensor, sink: GradSink) -> None:
    """Make ``main_grad`` (fp32, ``param``'s shape) where ``param``'s gradients go, through ``sink``."""
    param.main_grad = main_grad
    param.grad_sink = sink


class WeightGradStore:
    """Weight-gradient work queued by a backward under ``defer_weight_grads`` (module docstring)."""

    def __init__(self) -> None:
        self.pending: list[tuple[nn.Parameter, WeightGradWork, bool]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def post(self, weight: nn.Parameter, work: WeightGradWork, notify: bool) -> None:
        self.pending.append((weight, work, notify))

    def run(self) -> None:
        """Compute every pending weight gradient in posting order, then forget them."""
        pending, self.pending = self.pending, []
        with torch.no_grad():
            for weight, work, notify in pending:
                if hasattr(weight, "grad_sink"):
                    weight.grad_sink.accumulate(weight, work, notify)
                else:
                    grad = work.compute(weight)
                    weight.grad = grad if weight.grad is None else weight.grad.add_(grad)


_active_store: Optional[WeightGradStore] = None


@contextmanager
def defer_weight_grads(store: WeightGradStore) -> Iterator[WeightGradStore]:
    """Within the block, the layers' backwards queue their weight gradients on ``store``."""
    global _active_store
    if _active_store is not None:
        raise RuntimeError("defer_weight_grads is already active: weight gradients would go to two stores")
    _active_store = store
    try:
        yield store
    finally:
        _active_store = None


def weight_grad(weight: nn.Parameter, work: WeightGradWork, notify: bool = True) -> Optional[torch.Tensor]:
    """Called by a layer's backward for its weight: queue ``work`` (inside ``defer_weight_grads``),
    or hand it to the weight's grad sink, and return None; without a GradBuffer return the gradient
    for autograd. ``notify``: False for a borrowed weight (a tied output layer on the embedding's
    stage), whose owner's contribution, later in the same backward, reports the parameter ready."""
    if _active_store is not None:
        _active_store.post(weight, work, notify)
        return None
    if hasattr(weight, "grad_sink"):
        weight.grad_sink.accumulate(weight, work, notify)
        return None
    return work.compute(weight)
