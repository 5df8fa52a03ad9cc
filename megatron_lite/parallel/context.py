"""Context parallelism: each sequence split over the c ranks of a CP group, with causal ring attention.

Split (the load-balanced "zigzag" layout of Megatron-LM and torchtitan): a sequence of s tokens is cut
into 2c chunks of s/(2c); CP rank i holds chunks i and 2c−1−i, concatenated, so every activation on a
rank is [b, s/c, ...] (``local_positions``). Embeddings, norms and the MLP work on these tokens
unchanged; RoPE angles and learned position embeddings use each token's global position. Only the
attention needs the other ranks' tokens.

Ring attention (Megatron's ``cp_comm_type=p2p``; Liu et al. 2023): the local keys and values pass
around the CP group in c − 1 steps. At step j rank i holds the K/V of rank (i − j) mod c and computes
its queries' attention to them as a block with its own log-sum-exp; the blocks are merged with the
running max / LSE (online softmax). With the zigzag split every step costs the same on every rank:

  step 0 (its own K/V)          all queries × all keys, causal (local order is global order)
  K/V of a lower rank           all queries × that rank's first chunk (its second chunk is later
                                than every local query)
  K/V of a higher rank          the second local chunk × all keys (the first local chunk is earlier
                                than both of its chunks)

so each block is half of an (s/c)² square and fully masked blocks are never computed. The backward
sends K/V around again and, beside them, the partial sums of dK and dV for the block being held
(fp32), which end at the rank that owns that block: 2·(c − 1) block sends forward, 4·(c − 1)
backward. Each step's sends and receives are posted as ONE ``batch_isend_irecv`` group (NCCL runs a
group as one unit; a send completes only when its peer has posted the matching receive, so sends
and receives in separate groups deadlock) and waited for together; the exchange runs while the
current block is computed. Only the KV heads move (grouped-query attention expands them locally).

Block math: ``explicit`` (QKᵀ, masked softmax with its LSE, ·V, and the backward from the LSE, all
in fp32) or ``flash``: torch's flash-attention kernels, which return the LSE and take it back in the
backward (``aten._scaled_dot_product_flash_attention`` on CUDA for fp16/bf16, the kernels
``F.scaled_dot_product_attention`` dispatches to and torch's own experimental context parallelism
calls per block; ``..._for_cpu`` is their CPU twin, which tests the same path here). ``block_kernel``
makes the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..pipeline.p2p import post_batch

LAYOUTS = ("zigzag", "contiguous")
FLASH_MAX_HEAD_DIM = 256  # torch's flash-attention kernels: head_dim a multiple of 8, at most 256


@dataclass(frozen=True)
class CPGroup:
    """A context-parallel group as the model sees it: the process group, its size, this rank's index
    and the members' global ranks in CP order (the ring's neighbours)."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    ranks: tuple[int, ...] = (0,)

    @classmethod
    def from_state(cls, state) -> "CPGroup":
        return cls(state.cp_group, state.cp_size, state.cp_rank, tuple(state.cp_ranks))

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


def local_positions(seq_length: int, cp_size: int, cp_rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions [s/c] (int64) of the tokens CP rank ``cp_rank`` holds, in local order.

    ``zigzag``: chunks ``cp_rank`` and ``2c−1−cp_rank`` of 2c; ``contiguous``: chunk ``cp_rank`` of c
    (unbalanced: the last rank does 2c − 1 times the causal work of the first).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if cp_size == 1:
        return torch.arange(seq_length)
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 × CP = {2 * cp_size}")
    local = seq_length // cp_size
    if layout == "contiguous":
        return torch.arange(cp_rank * local, (cp_rank + 1) * local)
    chunk = local // 2
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                      torch.arange(late * chunk, (late + 1) * chunk)])


@dataclass(frozen=True)
class Block:
    """One ring step's attention: local queries ``q_rows`` against keys ``kv_cols`` of the held K/V."""

    q_rows: slice
    kv_cols: slice
    causal: bool


def block_plan(layout: str, rank: int, source: int, local_length: int) -> Optional[Block]:
    """What CP rank ``rank`` computes against the K/V of rank ``source`` (None: fully masked)."""
    everything, half = slice(0, local_length), local_length // 2
    if source == rank:
        return Block(everything, everything, True)
    if layout == "contiguous":
        return Block(everything, everything, False) if source < rank else None
    if source < rank:
        return Block(everything, slice(0, half), False)
    return Block(slice(half, local_length), everything, False)


def block_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """``flash`` where torch's flash-attention kernel runs (CUDA, fp16/bf16, head_dim a multiple of 8
    up to 256), else ``explicit``."""
    flash = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
             and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM)
    return "flash" if flash else "explicit"


@dataclass
class RingStats:
    """What ``ring_attention`` computed on this rank: forward attention FLOPs (2 per multiply-add of
    QKᵀ and ·V; a causal block counts its lower half) and blocks run."""

    flops: float = 0.0
    blocks: int = 0


# Block math ----------------------------------------------------------------------------------------
def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, g, s, d] -> [b, heads, s, d]: query head h reads KV head h // (heads / g)."""
    repeat = heads // kv.shape[1]
    return kv if repeat == 1 else kv.repeat_interleave(repeat, dim=1)


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, heads, s, d] -> [b, groups, s, d]: sum the gradients of the query heads sharing a KV head."""
    b, heads, s, d = grad.shape
    return grad if heads == groups else grad.view(b, groups, heads // groups, s, d).sum(2)


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def _explicit_forward(q, k, v, causal: bool, scale: float):
    """fp32 softmax(QKᵀ·scale)·V of one block and its LSE: out [b, H, sq, d], lse [b, H, sq]."""
    heads = q.shape[1]
    scores = torch.matmul(q.float(), _expand(k, heads).float().transpose(-1, -2)) * scale
    if causal:
        scores.masked_fill_(_causal_mask(scores.shape[-2], scores.shape[-1], scores.device), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), _expand(v, heads).float()), lse, ()


def _explicit_backward(dout, q, k, v, out, lse, aux, causal: bool, scale: float):
    """fp32 dQ [b, H, sq, d], dK, dV [b, g, sk, d] of one block from the merged output's LSE."""
    heads, groups = q.shape[1], k.shape[1]
    qf, kf, vf, dout = q.float(), _expand(k, heads).float(), _expand(v, heads).float(), dout.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        scores.masked_fill_(_causal_mask(scores.shape[-2], scores.shape[-1], scores.device), -math.inf)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    delta = (dout * out.float()).sum(-1, keepdim=True)  # rowsum(dO ∘ O) = Σ_k P·dP
    dscores = probs * (torch.matmul(dout, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, kf) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qf) * scale
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    return dq, _fold(dk, groups), _fold(dv, groups)


def _flash_forward(q, k, v, causal: bool, scale: float):
    """torch's flash-attention kernel on one block: out (input dtype), lse (fp32), and what its
    backward needs from this call."""
    heads = q.shape[1]
    k, v = _expand(k, heads), _expand(v, heads)
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, ()


def _flash_backward(dout, q, k, v, out, lse, aux, causal: bool, scale: float):
    heads, groups = q.shape[1], k.shape[1]
    k, v = _expand(k, heads), _expand(v, heads)
    dout, out, lse = dout.to(q.dtype).contiguous(), out.to(q.dtype).contiguous(), lse.contiguous()
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return dq.float(), _fold(dk.float(), groups), _fold(dv.float(), groups)


BLOCK_KERNELS = {"explicit": (_explicit_forward, _explicit_backward), "flash": (_flash_forward, _flash_backward)}


# The ring ------------------------------------------------------------------------------------------
class _Exchange:
    """One ring step's messages: ``sends`` to the next CP rank and as many receives (shaped like
    ``recv_like``) from the previous one, posted as ONE batch_isend_irecv group."""

    def __init__(self, cp: CPGroup, sends: list[torch.Tensor], recv_like: list[torch.Tensor]):
        self.group = cp.group  # what the hang watchdog names when a rank waits here
        self.sends = sends  # kept alive until the group completes
        self.received = [torch.empty_like(t) for t in recv_like]
        self.works = post_batch([(t, cp.next_rank) for t in sends], [(t, cp.prev_rank) for t in self.received],
                                cp.group)

    def wait(self) -> list[torch.Tensor]:
        """Wait for the whole group (sends too: on NCCL it completes as one unit)."""
        for work in self.works:
            work.wait()
        return self.received


def _source(cp: CPGroup, step: int) -> int:
    return (cp.rank - step) % cp.size


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup, scale: float, kernel: str, layout: str, stats: Optional[RingStats]):
        block_forward = BLOCK_KERNELS[kernel][0]
        b, heads, s, d = q.shape
        out_acc = torch.zeros(b, heads, s, d, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((b, heads, s), -math.inf, dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        aux = {}
        for step in range(cp.size):
            exchange = _Exchange(cp, kv, kv) if step < cp.size - 1 else None
            block = block_plan(layout, cp.rank, _source(cp, step), s)
            if block is not None:
                rows, cols = block.q_rows, block.kv_cols
                out, lse, aux[step] = block_forward(
                    q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], block.causal, scale)
                merged = torch.logaddexp(lse_acc[:, :, rows], lse)
                out_acc[:, :, rows] = (out_acc[:, :, rows] * torch.exp(lse_acc[:, :, rows] - merged).unsqueeze(-1)
                                       + out.float() * torch.exp(lse - merged).unsqueeze(-1))
                lse_acc[:, :, rows] = merged
                if stats is not None:
                    pairs = (rows.stop - rows.start) * (cols.stop - cols.start) * (0.5 if block.causal else 1.0)
                    stats.flops += 4.0 * b * heads * d * pairs
                    stats.blocks += 1
            if exchange is not None:
                kv = exchange.wait()
        # [b, s, H, d] in memory, so that the output projection's [b, s, H·d] input is a view of it.
        result = torch.empty(b, s, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        result.copy_(out_acc)
        ctx.save_for_backward(q, k, v, result, lse_acc)
        ctx.cp, ctx.scale, ctx.kernel, ctx.layout, ctx.aux = cp, scale, kernel, layout, aux
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp, scale = ctx.cp, ctx.scale
        block_backward = BLOCK_KERNELS[ctx.kernel][1]
        s = q.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        own = travelling = None  # dK, dV of this rank's K/V; the partial sums for the held K/V
        for step in range(cp.size):
            sends = kv if step < cp.size - 1 else []
            if step >= 2:  # last step's partial sums go on; this step's arrive from the previous rank
                sends = sends + travelling
            exchange = _Exchange(cp, sends, sends)
            block = block_plan(ctx.layout, cp.rank, _source(cp, step), s)
            grads = [torch.zeros(kv[0].shape, dtype=torch.float32, device=q.device) for _ in range(2)]
            if block is not None:
                rows, cols = block.q_rows, block.kv_cols
                dq_part, dk_part, dv_part = block_backward(
                    dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                    out[:, :, rows], lse[:, :, rows], ctx.aux.get(step), block.causal, scale)
                dq[:, :, rows] += dq_part
                grads[0][:, :, cols] += dk_part
                grads[1][:, :, cols] += dv_part
            received = exchange.wait()
            if step == 0:
                own = grads
            else:
                partial = received[-2:] if step >= 2 else [0.0, 0.0]
                travelling = [grads[0] + partial[0], grads[1] + partial[1]]
            if step < cp.size - 1:
                kv = received[:2]
        if cp.size > 1:  # the partial sums for this rank's K/V come home from the previous rank
            home = _Exchange(cp, travelling, travelling).wait()
            own = [own[0] + home[0], own[1] + home[1]]
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPGroup, scale: Optional[float] = None,
    kernel: str = "auto", layout: str = "zigzag", stats: Optional[RingStats] = None,
) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence held by the CP group.

    q: [b, heads, s/c, d], k, v: [b, groups, s/c, d] (heads a multiple of groups), this rank's tokens
    in ``layout`` order (``local_positions``), on every rank of ``cp``'s group (collective: every
    member calls it with the same shapes). Returns the attention output [b, heads, s/c, d] in q's
    dtype. ``kernel``: auto (``block_kernel``), explicit or flash. ``stats`` accumulates what this
    rank computed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if q.shape[2] % 2:
        raise ValueError(f"local sequence length {q.shape[2]} must be even (two chunks per CP rank)")
    d = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if kernel == "auto":
        kernel = block_kernel(q.device, q.dtype, d)
    if kernel not in BLOCK_KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of auto, {', '.join(BLOCK_KERNELS)}")
    return _RingAttention.apply(q, k, v, cp, scale, kernel, layout, stats)


def masked_mean_over_cp(losses: torch.Tensor, mask: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """This CP rank's share of the masked mean loss: c · Σ(losses · mask) over its tokens divided by
    the mask's count over the whole CP group (one fp32 all-reduce over CP). Averaged over the CP
    group, as the DP × CP gradient average does, it is the mean over every token of the sequences.
    losses, mask: [b, s/c] on this rank."""
    total = (losses * mask).sum()
    count = mask.sum().detach().float().reshape(1)
    if cp.size > 1:
        dist.all_reduce(count, group=cp.group)
    return total * cp.size / count.clamp_min(1.0).reshape(())
