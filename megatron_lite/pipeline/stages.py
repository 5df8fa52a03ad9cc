"""How many transformer layers each pipeline chunk holds: equal chunks, or an uneven layout.

A model of ``L`` layers cut into ``p·v`` chunks (p pipeline ranks, v chunks per rank) gives each chunk
``L/(p·v)`` consecutive layers by default. Uneven stages let ``L`` be any number and let the chunk
holding the embedding (the first) and the one holding the output layer and loss (the last) carry
fewer layers, as Megatron-LM's ``--decoder-first-pipeline-num-layers``,
``--decoder-last-pipeline-num-layers`` and ``--pipeline-model-parallel-layout`` do:

- ``layout``: the layers of every chunk in model order (global chunk 0 first), ``p·v`` counts summing
  to ``L``; or
- ``first`` / ``last``: the layers of the first / last chunk, the others splitting the rest equally.

The first and last chunk may hold no layer at all (the embedding or the head alone); every chunk in
between holds at least one. Chunks are numbered in model order whatever the placement: which rank
holds global chunk ``g`` is ``schedules.locate``'s business. Pure Python: ``config.validate`` calls
it before any process exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from . import schedules as S


class LayoutError(ValueError):
    """A layout that does not cover the layers once; ``key`` names the config key to change."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def chunk_layers(
    num_layers: int,
    pp: int,
    vpp: int = 1,
    layout: Optional[Sequence[int]] = None,
    first: Optional[int] = None,
    last: Optional[int] = None,
) -> tuple[int, ...]:
    """Layers of each of the ``pp·vpp`` global chunks, in model order (LayoutError if impossible)."""
    chunks = pp * vpp
    if layout is not None:
        if first is not None or last is not None:
            raise LayoutError("parallel.pipeline_layout", "is set together with decoder_first/last_"
                              "pipeline_num_layers; set one or the other")
        counts = tuple(int(n) for n in layout)
        if len(counts) != chunks:
            raise LayoutError("parallel.pipeline_layout", f"has {len(counts)} entries but the model is "
                              f"cut into PP×VPP = {chunks} chunks; give one layer count per chunk")
        if sum(counts) != num_layers:
            raise LayoutError("parallel.pipeline_layout", f"{list(counts)} holds {sum(counts)} layers "
                              f"but model.num_layers={num_layers}; the counts must add up to it")
    elif first is None and last is None:
        if num_layers % chunks:
            raise LayoutError("model.num_layers", f"{num_layers} layers do not split into PP×VPP = "
                              f"{pp}×{vpp} = {chunks} equal chunks; use a multiple of {chunks} layers, "
                              "change the pipeline sizes or set parallel.pipeline_layout")
        counts = (num_layers // chunks,) * chunks
    else:
        counts = _first_last(num_layers, chunks, first, last)
    inner = counts[1:-1]
    if any(n < 0 for n in counts) or any(n < 1 for n in inner):
        raise LayoutError("parallel.pipeline_layout", f"{list(counts)}: every chunk needs at least one "
                          "layer, the first and the last at least none")
    return counts


def _first_last(num_layers: int, chunks: int, first: Optional[int], last: Optional[int]) -> tuple[int, ...]:
    key = ("parallel.decoder_first_pipeline_num_layers" if first is not None
           else "parallel.decoder_last_pipeline_num_layers")
    if chunks == 1:
        raise LayoutError(key, "needs more than one pipeline chunk (PP×VPP > 1)")
    fixed = (first or 0) + (last or 0)
    free = chunks - (first is not None) - (last is not None)
    rest = num_layers - fixed
    if rest < 0 or (free == 0 and rest) or (free and rest % free):
        raise LayoutError(key, f"first={first}, last={last} leave {rest} of model.num_layers="
                          f"{num_layers} layers for the other {free} chunks, which must split them "
                          "equally")
    each = rest // free if free else 0
    return ((each if first is None else first),) + (each,) * (chunks - 2) + ((each if last is None else last),)


def layer_ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[first, last) global layer indices of each chunk, in model order."""
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class StageShape:
    """What one pipeline rank holds of the model, over all its chunks."""

    layers: int  # transformer layers
    has_embedding: bool  # global chunk 0
    has_head: bool  # the last global chunk (final norm, output layer, loss)
    sends_activations: bool  # some chunk's output goes to another rank
    layer_ids: tuple[int, ...] = ()  # the global indices of those layers


def stage_shape(counts: Sequence[int], pp: int, vpp: int, rank: int, placement: str = S.LOOPED) -> StageShape:
    """The part of the model pipeline rank ``rank`` holds, for chunk layer ``counts`` (model order)."""
    chunks = [S.global_chunk(pp, rank, c, placement) for c in range(vpp)]
    last = pp * vpp - 1
    sends = any(g < last and S.locate(pp, g + 1, placement)[0] != rank for g in chunks)
    ranges = layer_ranges(counts)
    ids = tuple(i for g in chunks for i in range(*ranges[g]))
    return StageShape(sum(counts[g] for g in chunks), 0 in chunks, last in chunks, sends, ids)
