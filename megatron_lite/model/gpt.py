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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..pipeline.schedules import LOOPED, global_chunk
from ..pipeline.stages import chunk_layers, layer_ranges
from ..parallel.collectives import TPGroup, copy_to_tp, gather_from_sp, scatter_to_sp
from ..parallel.context import CPGroup, local_positions
from ..tensor_parallel import ModelRNG, VocabParallelEmbedding, dropout, vocab_parallel_cross_entropy
from ..tensor_parallel.random import checkpoint_rng_context
from ..tensor_parallel.sharding import full_shape, mark_sharded, shard_tensor
from .transformer import Norm, TransformerBlock, rotary_tables

# The output layer's weight when it is tied to the embedding but lives on another pipeline stage:
# initialised from the embedding's seed, its gradient summed with the embedding's every step.
TIED_OUTPUT_NAME = "output_weight"


@dataclass(frozen=True)
class ChunkSpec:
    """Which part of the model a chunk holds: global layer indices [first_layer, last_layer)."""

    index: int  # global chunk index in [0, p·v)
    first_layer: int
    last_layer: int
    pre_process: bool  # holds the embedding
    post_process: bool  # holds the final norm, output layer and loss


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
    ``embedding_chunk``: for a tied head, the chunk of this rank that holds the embedding (the V
    placement puts both ends on rank 0): the head then uses its weight, with no copy to keep equal.
    """

    def __init__(
        self, cfg: ModelConfig, spec: ChunkSpec, vocab_size: int, tp: TPGroup, rng: ModelRNG,
        recompute: str = "none", recompute_num_layers: int = 1, cp: CPGroup = CPGroup(),
        embedding_chunk: GPTChunk | None = None,
    ):
        super().__init__()
        self.cfg, self.spec, self.tp, self.rng, self.cp = cfg, spec, tp, rng, cp
        self.recompute, self.recompute_num_layers = recompute, recompute_num_layers
        h = cfg.hidden_size
        if spec.pre_process:
            self.embedding = VocabParallelEmbedding(vocab_size, h, tp, init_std=cfg.init_std)
            self.embedding.weight.shared_embedding = cfg.tie_embeddings
            if cfg.position_embedding == "learned":
                self.position_embedding = mark_sharded(nn.Parameter(torch.empty(cfg.seq_length, h)), None)
                self.position_embedding.init_std = cfg.init_std
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, tp, rng, recompute == "selective", cp)
             for i in range(spec.first_layer, spec.last_layer)}
        )
        if spec.post_process:
            self.final_norm = Norm(cfg, tp)
            if not cfg.tie_embeddings:
                self.output = mark_sharded(nn.Parameter(torch.empty(vocab_size // tp.size, h)), 0)
                self.output.init_std = cfg.init_std
            elif embedding_chunk is not None:
                self._embedding_chunk = (embedding_chunk,)  # a tuple: not registered as a submodule
            elif not spec.pre_process:
                tied = mark_sharded(nn.Parameter(torch.empty(vocab_size // tp.size, h)), 0)
                tied.init_std, tied.tied_embedding, tied.shared_embedding = cfg.init_std, True, True
                setattr(self, TIED_OUTPUT_NAME, tied)
        # Global positions of this CP rank's tokens (all of 0..s-1 without context parallelism).
        self.register_buffer("positions", local_positions(cfg.seq_length, cp.size, cp.rank), persistent=False)
        if cfg.position_embedding == "rope":
            cos, sin = rotary_tables(cfg.seq_length, h // cfg.num_attention_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos[self.positions], persistent=False)
            self.register_buffer("rope_sin", sin[self.positions], persistent=False)
        self.generator = rng.tensor_parallel if tp.sequence_parallel else rng.default

    def output_weight_tensor(self) -> torch.Tensor:
        """The output layer's weight [V/t, h] (the embedding's own when tied on one stage)."""
        if not self.cfg.tie_embeddings:
            return self.output
        if self.spec.pre_process:
            return self.embedding.weight
        if hasattr(self, "_embedding_chunk"):
            return self._embedding_chunk[0].embedding.weight
        return getattr(self, TIED_OUTPUT_NAME)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.pre_process:
            x = self.embed(x)
        rope = (self.rope_cos, self.rope_sin) if self.cfg.position_embedding == "rope" else None
        layers = list(self.layers.values())
        if self.recompute == "full" and self.training:
            k = self.recompute_num_layers
            for start in range(0, len(layers), k):
                x = checkpoint(_run_layers, layers[start : start + k], x, rope, use_reentrant=False,
                               context_fn=partial(checkpoint_rng_context, self.rng))
        else:
            x = _run_layers(layers, x, rope)
        if not self.spec.post_process:
            return x
        x = self.final_norm(x)
        x = gather_from_sp(x, self.tp) if self.tp.sequence_parallel else copy_to_tp(x, self.tp)
        logits = F.linear(x, self.output_weight_tensor())  # [b, s, V/t]: never gathered
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.tp)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings: [b, s] ids -> [b, s, h] ([b, s/t, h] under SP)."""
        x = self.embedding(ids)
        if self.cfg.position_embedding == "learned":
            if self.cp.size == 1:
                positions = self.position_embedding[: ids.shape[1]].unsqueeze(0)
            else:
                positions = self.position_embedding[self.positions].unsqueeze(0)
            x = x + (scatter_to_sp(positions, self.tp) if self.tp.sequence_parallel else positions)
        return dropout(x, self.cfg.dropout, self.generator, self.training)


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
    tp = chunk.tp
    for name, param in chunk.named_parameters():
        if hasattr(param, "init_value"):
            param.fill_(param.init_value)
            continue
        generator = torch.Generator().manual_seed(parameter_seed(seed, canonical_name(name)))
        full = torch.empty(full_shape(param, tp.size)).normal_(0.0, param.init_std, generator=generator)
        shard = shard_tensor(full, getattr(param, "tp_dim", None), getattr(param, "tp_stride", 1), tp.rank, tp.size)
        param.copy_(shard)


def build_model_chunks(
    cfg: ModelConfig,
    vocab_size: int,
    tp: TPGroup = TPGroup(),
    seed: int = 1234,
    pp_rank: int = 0,
    pp_size: int = 1,
    vpp_size: int = 1,
    device: torch.device | str = "cpu",
    recompute: str = "none",
    recompute_num_layers: int = 1,
    cp: CPGroup = CPGroup(),
    layer_counts: tuple[int, ...] | None = None,
    placement: str = LOOPED,
) -> list[GPTChunk]:
    """The chunks this rank owns, initialised and on ``device``. ``vocab_size`` is already padded;
    ``layer_counts`` and ``placement`` as for ``chunk_specs``."""
    rng = ModelRNG(seed, tp_rank=tp.rank, pp_rank=pp_rank, device=device)
    chunks: list[GPTChunk] = []
    for spec in chunk_specs(cfg.num_layers, pp_size, vpp_size, pp_rank, layer_counts, placement):
        embedding_chunk = next((c for c in chunks if c.spec.pre_process), None) if spec.post_process else None
        chunk = GPTChunk(cfg, spec, vocab_size, tp, rng, recompute, recompute_num_layers, cp, embedding_chunk)
        init_weights(chunk, seed)
        chunks.append(chunk.to(device))
    return chunks


def build_gpt(cfg: ModelConfig, vocab_size: int, tp: TPGroup = TPGroup(), seed: int = 1234) -> GPTChunk:
    """The whole model as one chunk (no pipeline parallelism)."""
    return build_model_chunks(cfg, vocab_size, tp, seed)[0]
