"""The GPT model, built as the pipeline chunks one rank owns.

A model of L layers cut into p·v chunks (p pipeline stages, v virtual stages per stage) has chunks of
consecutive layers, L/(p·v) each or as an uneven layout says (``pipeline/stages.py``); rank r holds
chunks r, r+p, r+2p, … (Megatron's interleaved assignment) or, in ZB-V's V placement, chunks r and
2p−1−r (``pipeline/schedules.py:global_chunk``). The first chunk owns the embedding, the last the
final norm, the output layer and the loss. Without pipelining the model is one chunk that owns
everything.

Parameter names use global layer indices (``layers.9.mlp.fc1.weight``), and every parameter is
initialised from a seed derived from that name on its full (unsharded) tensor, of which each rank
keeps its shard: the model starts identical whatever the TP, PP or VPP sizes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, head_dim
from ..parallel.collectives import TPGroup
from ..pipeline.schedules import LOOPED, global_chunk
from ..pipeline.stages import chunk_layers, layer_ranges
from ..parallel.context import CPGroup, local_positions
from ..tensor_parallel import (
    ModelRNG,
    ParallelLMHead,
    ParamMeta,
    VocabParallelEmbedding,
    dropout,
    new_parameter,
    vocab_parallel_cross_entropy,
)
from ..tensor_parallel.random import checkpoint_rng_context
from ..tensor_parallel.sharding import full_shape_of, shard_by_cuts, shard_cuts
from ..moe import ExpertGroups
from .rotary import rotary_tables
from .transformer import KVCache, Norm, TransformerBlock

# The output layer's weight when it is tied to the embedding but lives on another pipeline stage:
# initialised from the embedding's seed, its gradient summed with the embedding's every step.
TIED_OUTPUT_NAME = "output_weight"


@dataclass(frozen=True)
class ChunkSpec:
    """Which part of the model a chunk holds: global layer indices [first_layer, last_layer)."""

    index: int  # global chunk index in [0, p·v)
    first_layer: int
    last_layer: int
    has_embedding: bool  # the token (and learned position) embedding
    has_head: bool  # the final norm, output layer and loss


def chunk_specs(
    num_layers: int, pp_size: int, vpp_size: int, pp_rank: int,
    layer_counts: tuple[int, ...] | None = None, placement: str = LOOPED,
) -> list[ChunkSpec]:
    """This pipeline rank's chunks, in execution order (local chunk 0 first).

    ``layer_counts``: the layers of every global chunk in model order (``stages.chunk_layers``;
    None: equal chunks). ``placement``: which global chunks this rank holds (``schedules``).
    """
    total = pp_size * vpp_size
    ranges = layer_ranges(layer_counts or chunk_layers(num_layers, pp_size, vpp_size))
    specs = []
    for local in range(vpp_size):
        index = global_chunk(pp_size, pp_rank, local, placement)
        first, last = ranges[index]
        specs.append(ChunkSpec(index, first, last, index == 0, index == total - 1))
    return specs


class GPTChunk(nn.Module):
    """Consecutive transformer layers, plus the embedding (first chunk) and the head (last chunk).

    forward(x, labels=None):
      x: token ids [b, s] on the first chunk, else hidden states [b, s, h] ([b, s/t, h] under SP).
      Under context parallelism (``cp``) s is this CP rank's s/c tokens, at the global positions
      ``local_positions`` gives (the zigzag split): RoPE angles and position embeddings follow them.
      Returns hidden states for the next chunk; on the last chunk per-token losses [b, s] (fp32)
      when ``labels`` [b, s] are given, else this TP rank's logits [b, s, V/t].

    ``recompute``: none | selective (attention core) | full (groups of ``recompute_num_layers``
    layers keep only their input; the rest is recomputed in the backward).

    ``vocab_size`` is padded (to a multiple of 128 × TP); the logits of the padding rows, from
    ``unpadded_vocab_size`` on, are −inf, so that padding never changes a loss or a sample (an
    imported model's zero rows would otherwise add e^0 terms to the softmax).

    ``embedding_chunk``: for a tied head, the chunk of this rank that holds the embedding (the V
    placement puts both ends on rank 0): the head then uses its weight, with no copy to keep equal.
    ``head_on_this_rank``: some chunk of this rank has the head (the embedding chunk then needs no
    sum over the embedding group, which is this rank alone).
    """

    def __init__(
        self, cfg: ModelConfig, spec: ChunkSpec, vocab_size: int, tp: TPGroup, rng: ModelRNG,
        recompute: str = "none", recompute_num_layers: int = 1, cp: CPGroup = CPGroup(),
        unpadded_vocab_size: int | None = None, embedding_chunk: GPTChunk | None = None,
        head_on_this_rank: bool = False, experts: ExpertGroups = ExpertGroups(),
    ):
        super().__init__()
        self.cfg, self.spec, self.tp, self.rng, self.cp = cfg, spec, tp, rng, cp
        self.experts = experts
        self.recompute, self.recompute_num_layers = recompute, recompute_num_layers
        h = cfg.hidden_size
        tied = cfg.tie_embeddings
        # A tied embedding whose output copy sits on another rank: the two gradients are summed over
        # the embedding group. A head on this rank (this chunk, or another chunk in the V placement)
        # borrows the weight, so its gradient is already whole here.
        vocab_meta = ParamMeta(init_std=cfg.init_std,
                               grad_summed_over_embedding_group=tied and not (spec.has_head or head_on_this_rank))
        if spec.has_embedding:
            self.embedding = VocabParallelEmbedding(vocab_size, h, tp, vocab_meta)
            if cfg.position_embedding == "learned":
                self.position_embedding = new_parameter((cfg.seq_length, h), ParamMeta(init_std=cfg.init_std))
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, tp, rng, recompute == "selective", cp, i, experts)
             for i in range(spec.first_layer, spec.last_layer)}
        )
        if spec.has_head:
            self.final_norm = Norm(cfg, tp)
            # The head borrows the embedding's weight when tied on the same rank (the V placement puts
            # both ends on rank 0: ``embedding_chunk``), else it owns its output layer or tied copy.
            borrowed = tied and (spec.has_embedding or embedding_chunk is not None)
            self.head = ParallelLMHead(tp, borrows_weight=borrowed)
            rows = vocab_size // tp.size
            padding = torch.arange(tp.rank * rows, (tp.rank + 1) * rows) >= (unpadded_vocab_size or vocab_size)
            self.register_buffer("vocab_padding", padding if padding.any() else None, persistent=False)
            if not tied:
                self.output = new_parameter((rows, h), ParamMeta(tp_shard_dim=0, init_std=cfg.init_std))
            elif embedding_chunk is not None:
                self._embedding_chunk = (embedding_chunk,)  # a tuple: not registered as a submodule
            elif not spec.has_embedding:
                meta = vocab_meta.replace(tp_shard_dim=0, grad_summed_over_embedding_group=True,
                                          counted_in_grad_norm=False)
                setattr(self, TIED_OUTPUT_NAME, new_parameter((rows, h), meta))
        # Global positions of this CP rank's tokens (all of 0..s-1 without context parallelism).
        self.register_buffer("positions", local_positions(cfg.seq_length, cp.size, cp.rank), persistent=False)
        if cfg.position_embedding == "rope":
            cos, sin = rotary_tables(cfg.seq_length, head_dim(cfg), cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos[self.positions], persistent=False)
            self.register_buffer("rope_sin", sin[self.positions], persistent=False)
        self.generator = rng.tensor_parallel if tp.sequence_parallel else rng.default

    def _apply(self, fn, recurse=True):
        """``Module.to`` / ``.cuda()`` / ``.half()``: the RoPE tables follow the device but stay fp32
        (as in Megatron-LM; bf16 tables are ~0.4 % off)."""
        tables = {name: getattr(self, name) for name in ("rope_cos", "rope_sin") if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, table in tables.items():
            setattr(self, name, table.to(device=getattr(self, name).device, dtype=torch.float32))
        return self

    def output_weight_tensor(self) -> torch.Tensor:
        """The output layer's weight [V/t, h] (the embedding's own when tied on one stage)."""
        if not self.cfg.tie_embeddings:
            return self.output
        if self.spec.has_embedding:
            return self.embedding.weight
        if hasattr(self, "_embedding_chunk"):
            return self._embedding_chunk[0].embedding.weight
        return getattr(self, TIED_OUTPUT_NAME)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, kv_caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """``kv_caches`` (inference): one per layer of this chunk, holding the earlier tokens; x then
        continues the sequence from position ``kv_caches[0].length``."""
        first = kv_caches[0].length if kv_caches else 0  # x's first position
        if self.spec.has_embedding:
            x = self.embed(x, first)
        rope = (self.rope_cos[first:], self.rope_sin[first:]) if self.cfg.position_embedding == "rope" else None
        layers = list(self.layers.values())
        if kv_caches is not None:
            for layer, cache in zip(layers, kv_caches, strict=True):
                x = layer(x, rope, cache)
        elif self.recompute == "full" and self.training:
            k = self.recompute_num_layers
            for start in range(0, len(layers), k):
                x = checkpoint(_run_layers, layers[start : start + k], x, rope, use_reentrant=False,
                               context_fn=partial(checkpoint_rng_context, self.rng))
        else:
            x = _run_layers(layers, x, rope)
        if not self.spec.has_head:
            return x
        logits = self.head(self.final_norm(x), self.output_weight_tensor())  # [b, s, V/t]: never gathered
        if self.vocab_padding is not None:
            logits = logits.masked_fill(self.vocab_padding, float("-inf"))
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.tp, overwrite_logits=True)

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token (+ learned position) embeddings of ids [b, s] at positions start, start + 1, ...:
        [b, s, h] ([b, s/t, h] under SP)."""
        positions = None
        if self.cfg.position_embedding == "learned":
            if self.cp.size == 1:
                positions = self.position_embedding[start : start + ids.shape[1]]
            else:
                positions = self.position_embedding[self.positions]
        return dropout(self.embedding(ids, positions), self.cfg.dropout, self.generator, self.training)


def _run_layers(layers: list[nn.Module], x: torch.Tensor, rope) -> torch.Tensor:
    for layer in layers:
        x = layer(x, rope)
    return x


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the parameter called ``name`` (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def canonical_name(name: str) -> str:
    """The name that defines a parameter's initial value: a tied output copy is the embedding."""
    return "embedding.weight" if name == TIED_OUTPUT_NAME else name


@torch.no_grad()
def init_weights(chunk: GPTChunk, seed: int) -> None:
    """Initialise every parameter from its full tensor (seeded by name) and keep this rank's shard."""
    for name, param in chunk.named_parameters():
        meta = param.meta
        if meta.init_value is not None:
            param.fill_(meta.init_value)
            continue
        cuts = shard_cuts(meta, chunk.tp, chunk.experts)
        generator = torch.Generator().manual_seed(parameter_seed(seed, canonical_name(name)))
        full = torch.empty(full_shape_of(param.shape, cuts)).normal_(0.0, meta.init_std, generator=generator)
        param.copy_(shard_by_cuts(full, cuts))


def build_model_chunks(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    tp: TPGroup = TPGroup(),
    seed: int = 1234,
    pp_rank: int = 0,
    pp_size: int = 1,
    vpp_size: int = 1,
    device: torch.device | str = "cpu",
    recompute: str = "none",
    recompute_num_layers: int = 1,
    cp: CPGroup = CPGroup(),
    unpadded_vocab_size: int | None = None,
    layer_counts: tuple[int, ...] | None = None,
    placement: str = LOOPED,
    experts: ExpertGroups = ExpertGroups(),
) -> list[GPTChunk]:
    """The chunks this rank owns, initialised and on ``device``. ``vocab_size`` is already padded;
    ``unpadded_vocab_size`` (None: no padding) is the tokenizer's, whose logits are kept;
    ``layer_counts`` and ``placement`` as for ``chunk_specs``; ``experts``: the MoE layers'
    process groups."""
    rng = ModelRNG(seed, tp_rank=tp.rank, pp_rank=pp_rank, device=device)
    chunks: list[GPTChunk] = []
    specs = chunk_specs(cfg.num_layers, pp_size, vpp_size, pp_rank, layer_counts, placement)
    for spec in specs:
        embedding_chunk = next((c for c in chunks if c.spec.has_embedding), None) if spec.has_head else None
        chunk = GPTChunk(cfg, spec, vocab_size, tp, rng, recompute=recompute, recompute_num_layers=recompute_num_layers,
                         cp=cp, unpadded_vocab_size=unpadded_vocab_size, embedding_chunk=embedding_chunk,
                         head_on_this_rank=any(s.has_head for s in specs), experts=experts)
        init_weights(chunk, seed)
        chunks.append(chunk.to(device))
    return chunks


def build_gpt(
    cfg: ModelConfig, vocab_size: int, tp: TPGroup = TPGroup(), seed: int = 1234, unpadded_vocab_size: int | None = None
) -> GPTChunk:
    """The whole model as one chunk (no pipeline parallelism)."""
    return build_model_chunks(cfg, vocab_size, tp=tp, seed=seed, unpadded_vocab_size=unpadded_vocab_size)[0]
