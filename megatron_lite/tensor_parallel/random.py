"""Random numbers that respect tensor parallelism (Megatron's RNG tracker, with explicit generators).

Two generators per rank, both identical across data-parallel replicas:
- ``default``: the same on every rank of a TP group. Used for dropout where activations are replicated
  across TP (the residual stream without sequence parallelism).
- ``tensor_parallel``: different on each TP rank. Used where each TP rank holds different data:
  attention probabilities (split by heads) and, with sequence parallelism, the residual stream
  (split by sequence).
Pipeline stages hold different layers, so the stage index enters both seeds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

TP_SEED_OFFSET = 2718


class ModelRNG:
    def __init__(self, seed: int, tp_rank: int = 0, pp_rank: int = 0, device: torch.device | str = "cpu"):
        base = seed + 100 * pp_rank
        self.default = torch.Generator(device=device).manual_seed(base)
        self.tensor_parallel = torch.Generator(device=device).manual_seed(base + TP_SEED_OFFSET + tp_rank)

    def get_state(self) -> dict[str, torch.Tensor]:
        return {"default": self.default.get_state(), "tensor_parallel": self.tensor_parallel.get_state()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.default.set_state(state["default"])
        self.tensor_parallel.set_state(state["tensor_parallel"])


def dropout(x: torch.Tensor, p: float, generator: torch.Generator, training: bool = True) -> torch.Tensor:
    """Inverted dropout whose mask comes from ``generator`` (so TP ranks can agree or differ)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def checkpoint_rng_context(rng: ModelRNG):
    """``context_fn`` for torch.utils.checkpoint: the recomputation replays the generators' states
    from the original forward (so dropout masks match), then puts the current states back."""
    from contextlib import nullcontext

    snapshot = rng.get_state()

    @contextmanager
    def replay():
        current = rng.get_state()
        rng.set_state(snapshot)
        try:
            yield
        finally:
            rng.set_state(current)

    return nullcontext(), replay()


@contextmanager
def as_default_generator(generator: torch.Generator):
    """Run the block with ``generator``'s state in its device's default generator, for ops that draw
    only from the default one (SDPA's dropout); afterwards ``generator`` has advanced by what they drew
    and the default generator is as before. So their randomness follows the TP-aware ``ModelRNG``:
    reproducible, checkpointed, replayed by recomputation."""
    if generator.device.type == "cuda":
        default = torch.cuda.default_generators[generator.device.index or torch.cuda.current_device()]
    else:
        default = torch.default_generator
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)
