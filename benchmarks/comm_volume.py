"""Bytes each rank communicates in one training step, per collective and process group, counted by
wrapping torch.distributed's calls around ``Trainer.train_step()``, beside the analytic count.

    python benchmarks/comm_volume.py [--world-size 8] [overrides ...]
    python benchmarks/comm_volume.py parallel.sequence_parallel=false

Default: gpt_tiny, ``parallel=tp2_pp2_dp2`` (TP2 × PP2 with 2 virtual stages × DP2, sequence
parallel) on 8 gloo ranks. Counted is the logical payload of each call: the tensor all-reduced or
sent, the full (gathered) tensor of an all-gather, the full input of a reduce-scatter. A ring moves
2·(n−1)/n of that per rank for an all-reduce and (n−1)/n for the other two.

The analytic count, per rank (b micro batch, s sequence, h hidden, t TP, c CP, m microbatches, L_r
layers on the rank, V padded vocabulary, 4-byte fp32; under context parallelism every b·s below is
this rank's b·s/c):
  TP     per layer and microbatch 2 all-reduces of b·s·h forward (attention and MLP outputs) and 2
         backward (their inputs), or with SP 4 all-gathers + 4 reduce-scatters of b·s·h plus 2
         all-gathers backward (the column-parallel layers keep their input's shard and gather it
         again); the embedding's sum (with SP a reduce-scatter forward and an all-gather of the
         gradient backward, plus a learned position embedding's gradient gather, s·h), the output
         layer's input (1 collective each way, with SP and the backward's re-gather 2 all-gathers
         and a reduce-scatter), 3 all-reduces of b·s in the vocab-parallel cross-entropy; with SP
         once per step the sum of the norm and row-bias gradients (per layer 2 norms of 2h
         (LayerNorm) or h (RMSNorm) and 2h of biases if any; the final norm)
  PP     b·s·h (b·s/t·h with SP) per microbatch and chunk boundary: activations forward, gradients
         backward
  CP     ring attention, per layer and microbatch: 2·(c−1) K/V blocks of b·(s/c)·(g/t)·d sent forward
         (g KV heads, d head dim), 4·(c−1) backward (K/V again and the fp32 dK/dV partial sums), and
         the forward's again when recomputed; the loss mask's count, 1 value per microbatch, summed
         over CP on the last stage
  EMB    the tied embedding's gradient, V/t·h, summed between first and last stage (tied models only)
  DP     the flat fp32 gradient buffer (every local parameter), all-reduced over DP (DP_CP: DP × CP
         when c > 1); the loss (1 value) for logging
  MP     the squared gradient norm, one fp64 value; the same all-reduce is how the ranks agree that
         the step's gradients are finite (optim/clip.py), so no other reduction checks them (an MoE
         model sums it over the WORLD)
  FP8    (training.fp8_format, tensorwise or delayed; docs/fp8.md) per FP8 layer and microbatch: with
         SP the 4 all-gathers of the QKV and fc1 inputs (forward, and again backward) carry 1 byte per
         element instead of the activations' 4 (bf16: 2); the amaxes, one fp32 value each, all-reduced
         (MAX) over TP where a tensor is split over TP (per layer 8; with SP 10: the gathered inputs'
         too) and over CP for the 4 inputs and 4 output gradients; delayed scaling adds once per
         step its [FP8 linears, 3] amaxes over TP and over DP (DP × CP)
  EP     MoE layers (all-to-all dispatcher, ETP 1), from this step's routing map (each router's
         tokens per expert on this rank, and its EP peers'): per layer, with S rows this rank routed
         to experts on other EP ranks and R rows those ranks routed to its experts, dispatch sends S
         and combine R rows of h values forward, the backward R and S again (recomputation repeats
         the forward's); per microbatch the counts exchange sends (EP−1)·E/EP int64. An all-to-all
         is counted as what it sends to other ranks. With FP8 the dispatch's S rows go as h FP8
         bytes and one fp32 scale each (h + 4 bytes instead of 4h, bf16 2h); the combine and both
         backward exchanges stay in the activations' precision
  TP_CP  per MoE layer and microbatch the aux loss's token counts, E fp32 (b·E for seq_aux_loss;
         global_aux_loss sums its E over the STAGE instead) (with SP the TP line's
         gradient sums also hold each MoE layer's router weight, E·h, and shared-expert gate, h)
  STAGE  per MoE layer once per step the statistics (E counts, aux, z, dropped, assigned: fp64)
  EDP    the expert gradient buffer, all-reduced over expert-DP (DP then holds the dense ones)
Any difference is printed; the process exits 1 if one exists. tests/test_benchmarks.py runs the
default configuration in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness import RankPool  # noqa: E402

DEFAULT_OVERRIDES = ["model=gpt_tiny", "parallel=tp2_pp2_dp2", "training.train_iters=1", "training.eval_iters=0"]
FP32 = 4


def _group_name(group, state) -> str:
    for name in ("tp", "cp", "pp", "dp", "dp_cp", "embedding", "mp", "ep", "etp", "edp", "tp_cp", "stage"):
        if group is not None and group is getattr(state, f"{name}_group", None):
            return name.upper()
    return "WORLD" if group is None else "other"


class CommCounter:
    """Wraps the torch.distributed calls the trainer makes; counts (collective, group) -> bytes."""

    def __init__(self, state):
        self.state, self.bytes, self.calls = state, Counter(), Counter()
        self._saved: list[tuple[object, str, object]] = []

    def _record(self, op: str, group, tensor: torch.Tensor) -> None:
        key = (op, _group_name(group, self.state))
        self.bytes[key] += tensor.numel() * tensor.element_size()
        self.calls[key] += 1

    def _wrap(self, owner, attr: str, op: str, pick) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            tensor, group = pick(*args, **kwargs)
            self._record(op, group, tensor)
            return original(*args, **kwargs)

        self._saved.append((owner, attr, original))
        setattr(owner, attr, counted)

    def _p2p(self, original):
        def counted(ops):
            for p2p in ops:
                if p2p.op.__name__ == "isend":
                    self._record("send", p2p.group, p2p.tensor)
            return original(ops)

        return counted

    def __enter__(self) -> "CommCounter":
        from megatron_lite.parallel import collectives

        def group(kwargs, args, index):
            return kwargs.get("group", args[index] if len(args) > index else None)

        self._wrap(dist, "all_reduce", "all_reduce", lambda t, *a, **k: (t, group(k, a, 1)))
        self._wrap(dist, "broadcast", "broadcast", lambda t, *a, **k: (t, group(k, a, 1)))
        # all-gather: the full output; reduce-scatter: the full input (both positional first two).
        for owner, names in ((dist, ("all_gather_into_tensor", "all_gather_single")),
                             (collectives, ("all_gather_flat",))):
            for name in names:
                self._wrap(owner, name, "all_gather", lambda out, inp, *a, **k: (out, k.get("group")))
        for owner, names in ((dist, ("reduce_scatter_tensor", "reduce_scatter_single")),
                             (collectives, ("reduce_scatter_flat",))):
            for name in names:
                self._wrap(owner, name, "reduce_scatter", lambda out, inp, *a, **k: (inp, k.get("group")))
        self._wrap(dist, "all_to_all_single", "all_to_all", lambda out, inp, *a, **k: (
            _sent_to_others(inp, a[1] if len(a) > 1 else k.get("input_split_sizes"), k.get("group")),
            k.get("group")))
        original = dist.batch_isend_irecv
        self._saved.append((dist, "batch_isend_irecv", original))
        dist.batch_isend_irecv = self._p2p(original)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


def _sent_to_others(inp: torch.Tensor, in_splits, group) -> torch.Tensor:
    """The part of an all-to-all's input that leaves the rank (its own split stays)."""
    me, size = dist.get_rank(group), dist.get_world_size(group)
    rows = in_splits if in_splits else [inp.shape[0] // size] * size
    start = sum(rows[:me])
    return torch.cat((inp[:start], inp[start + rows[me]:]))


def _moe_replicated_elements(trainer) -> int:
    """Elements of the MoE layers' replicated weights (router, shared-expert gate) on this rank:
    under SP each TP rank routes its own tokens, so their gradients are summed over TP."""
    from megatron_lite.moe.stats import moe_layers

    moe = trainer.cfg.model.moe
    if moe.num_experts is None:
        return 0
    per_layer = moe.num_experts * trainer.cfg.model.hidden_size
    per_layer += trainer.cfg.model.hidden_size if moe.shared_expert_gate else 0
    return per_layer * len(moe_layers(trainer.chunks))


def moe_analytic(trainer) -> Counter:
    """The MoE terms of ``analytic`` (module docstring): needs the step's routing of the EP peers,
    gathered here (outside the counted step)."""
    from megatron_lite.moe.stats import moe_layers

    cfg, dims, state = trainer.cfg, trainer.dims, trainer.state
    out, layers = Counter(), moe_layers(trainer.chunks)
    moe, h, m = cfg.model.moe, cfg.model.hidden_size, dims.num_microbatches
    act = torch.empty((), dtype=trainer.dtype).element_size()
    forwards = 2 if cfg.training.recompute == "full" else 1
    for _, layer in layers:
        counts = layer.router.last_tokens_per_expert.long()
        peers: list = [None] * dims.ep
        dist.all_gather_object(peers, counts.tolist(), group=state.ep_group)
        local = moe.num_experts // dims.ep
        mine = slice(state.ep_rank * local, (state.ep_rank + 1) * local)
        sent = int(counts.sum() - counts[mine].sum())
        received = sum(sum(p[mine]) for j, p in enumerate(peers) if j != state.ep_rank)
        if dims.ep > 1:
            out[("all_to_all", "EP")] += (forwards + 1) * (sent + received) * h * act
            out[("all_to_all", "EP")] += forwards * m * (dims.ep - 1) * local * 8
            if layer.experts.fp8 is not None and moe.token_dispatcher == "alltoall":  # FP8 dispatch
                out[("all_to_all", "EP")] += forwards * sent * (h * 1 + FP32 - h * act)
        balancing = moe.load_balancing if moe.aux_loss_coeff > 0 else "none"
        b = cfg.training.micro_batch_size
        if dims.tp * dims.cp > 1 and balancing in ("aux_loss", "seq_aux_loss"):  # counts (per sequence)
            out[("all_reduce", "TP_CP")] += forwards * m * moe.num_experts * FP32 * (b if balancing == "seq_aux_loss" else 1)
        if dims.tp * dims.cp * dims.dp > 1 and balancing == "global_aux_loss":
            out[("all_reduce", "STAGE")] += forwards * m * moe.num_experts * FP32
        if dims.tp * dims.cp * dims.dp > 1:
            out[("all_reduce", "STAGE")] += (moe.num_experts + 4) * 8
    if trainer.expert_grads is not None and dims.edp > 1:
        out[("all_reduce", "EDP")] += trainer.expert_grads.data.numel() * FP32
    return out


def analytic(trainer) -> Counter:
    """The expected bytes per (collective, group) on this rank for one step (module docstring)."""
    cfg, dims, state = trainer.cfg, trainer.dims, trainer.state
    m_cfg = cfg.model
    b, s, h, t, c = cfg.training.micro_batch_size, m_cfg.seq_length // dims.cp, m_cfg.hidden_size, dims.tp, dims.cp
    m, V = dims.num_microbatches, trainer.vocab_size
    bsh = b * s * h * FP32
    out = Counter()
    specs = [chunk.spec for chunk in trainer.chunks]
    layers = sum(spec.last_layer - spec.first_layer for spec in specs)
    first, last = any(x.has_embedding for x in specs), any(x.has_head for x in specs)
    if t > 1:
        if dims.sequence_parallel:
            # per layer: qkv and fc1 inputs gathered (backward: gathered again, and their gradients
            # reduce-scattered), attention and MLP outputs reduce-scattered (backward: gathered).
            # The output layer's input likewise. The embedding's reduce-scatter gathers its gradient
            # backward; a learned position embedding [1, s, h] is split forward (no communication)
            # and its gradient gathered backward.
            positions = s * h * FP32 if m_cfg.position_embedding == "learned" else 0
            gathers = 6 * layers * bsh + (2 * bsh if last else 0) + (bsh + positions if first else 0)
            out[("all_gather", "TP")] += m * gathers
            out[("reduce_scatter", "TP")] += m * (4 * layers * bsh + (bsh if first else 0) + (bsh if last else 0))
            norm = 2 * h if m_cfg.normalization == "layernorm" else h  # weight (and bias)
            row_biases = 2 * h if m_cfg.add_bias_linear else 0  # attention output and fc2
            out[("all_reduce", "TP")] += ((2 * norm + row_biases) * layers + (norm if last else 0)) * FP32
            out[("all_reduce", "TP")] += _moe_replicated_elements(trainer) * FP32  # router (and gate) weights
        else:
            out[("all_reduce", "TP")] += m * (4 * layers * bsh + (bsh if first else 0) + (bsh if last else 0))
        if last:
            out[("all_reduce", "TP")] += m * 3 * b * s * FP32
    if dims.pp > 1:
        act = bsh // t if dims.sequence_parallel else bsh
        total = dims.pp * dims.vpp
        sends = sum(spec.index < total - 1 for spec in specs) + sum(spec.index > 0 for spec in specs)
        out[("send", "PP")] += m * sends * act
        if (first or last) and m_cfg.tie_embeddings:
            out[("all_reduce", "EMBEDDING")] += V // t * h * FP32
    if c > 1:
        n = m_cfg.num_attention_heads
        block = b * s * (m_cfg.num_query_groups or n) // t * (h // n) * FP32
        forwards = 1 if cfg.training.recompute == "none" else 2
        out[("send", "CP")] += m * layers * (c - 1) * (2 * forwards + 4) * block
        if last:
            out[("all_reduce", "CP")] += m * FP32
    if dims.dp * c > 1:
        replicas = "DP" if c == 1 else "DP_CP"
        out[("all_reduce", replicas)] += trainer.grads.data.numel() * FP32
        if last:
            out[("all_reduce", replicas)] += FP32
    if dims.experts:
        out[("all_reduce", "WORLD")] += 8  # the norm: experts differ across EP ranks
        out.update(moe_analytic(trainer))
    elif dims.tp * dims.pp > 1:
        out[("all_reduce", "MP")] += 8
    if trainer.fp8 is not None:
        out.update(_fp8_terms(trainer, bsh))
    return out


def _fp8_terms(trainer, bsh: int) -> Counter:
    """FP8's change to ``analytic`` (module docstring): the gathered inputs' bytes (negative: what
    FP32 would have sent), the amax reductions."""
    dims, recipe, out = trainer.dims, trainer.fp8.layers[0][1].recipe if trainer.fp8.layers else None, Counter()
    if recipe is None:
        return out
    if not recipe.tensor_scaled:
        raise NotImplementedError("the analytic count models FP8's tensorwise and delayed recipes")
    m, t, c = dims.num_microbatches, dims.tp, dims.cp
    layers = len(trainer.fp8.layers) // 4  # QKV, attention output, fc1, fc2
    if t > 1 and dims.sequence_parallel:
        out[("all_gather", "TP")] += m * 4 * layers * (bsh // FP32 - bsh)
    if t > 1:
        out[("all_reduce", "TP")] += m * layers * (10 if dims.sequence_parallel else 8) * FP32
    if c > 1:
        out[("all_reduce", "CP")] += m * layers * 8 * FP32
    if recipe.delayed:
        history = len(trainer.fp8.layers) * 3 * FP32
        if t > 1:
            out[("all_reduce", "TP")] += history
        if dims.dp * c > 1:
            out[("all_reduce", "DP" if c == 1 else "DP_CP")] += history
    return out


def _measure(overrides: list[str]) -> dict:
    from megatron_lite.config import load_config, validate
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(overrides)
    dims = validate(cfg, dist.get_world_size())
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    with CommCounter(state) as counter:
        trainer.train_step()
    expected = analytic(trainer)
    result = {
        "rank": state.rank, "tp_rank": state.tp_rank, "cp_rank": state.cp_rank, "pp_rank": state.pp_rank,
        "dp_rank": state.dp_rank,
        "measured": {f"{op}/{g}": n for (op, g), n in counter.bytes.items()},
        "calls": {f"{op}/{g}": n for (op, g), n in counter.calls.items()},
        "analytic": {f"{op}/{g}": n for (op, g), n in expected.items()},
        "dims": {"tp": dims.tp, "cp": dims.cp, "pp": dims.pp, "vpp": dims.vpp, "dp": dims.dp,
                 "m": dims.num_microbatches, "sp": dims.sequence_parallel},
    }
    state.destroy()
    return result


def differences(results: list[dict]) -> list[tuple[int, str, int, int]]:
    """(rank, collective/group, measured bytes, analytic bytes) wherever the two differ."""
    out = []
    for r in results:
        for key in sorted(set(r["measured"]) | set(r["analytic"])):
            got, want = r["measured"].get(key, 0), r["analytic"].get(key, 0)
            if got != want:
                out.append((r["rank"], key, got, want))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = DEFAULT_OVERRIDES + args.overrides
    pool = RankPool(args.world_size, timeout=600)
    try:
        results = pool.run(_measure, overrides)
    finally:
        pool.close()
    d = results[0]["dims"]
    print(f"one training step, {' '.join(overrides)}, world {args.world_size}: TP{d['tp']} CP{d['cp']} PP{d['pp']} "
          f"VPP{d['vpp']} DP{d['dp']}, {d['m']} microbatches, SP {d['sp']}; bytes per rank (logical payload)")
    mismatches = differences(results)
    shown = {r["pp_rank"]: r for r in results  # one rank per stage
             if r["tp_rank"] == 0 and r["cp_rank"] == 0 and r["dp_rank"] == 0}
    for pp_rank, r in sorted(shown.items()):
        print(f"\nrank {r['rank']} (pipeline stage {pp_rank}):")
        print(f"  {'collective/group':<26} {'calls':>6} {'measured bytes':>16} {'analytic bytes':>16} {'diff':>8}")
        for key in sorted(set(r["measured"]) | set(r["analytic"])):
            got, want = r["measured"].get(key, 0), r["analytic"].get(key, 0)
            print(f"  {key:<26} {r['calls'].get(key, 0):>6} {got:>16,} {want:>16,} {got - want:>8,}")
    print(f"\n{len(results)} ranks checked; {len(mismatches)} (rank, collective) differences")
    for rank, key, got, want in mismatches:
        print(f"  rank {rank} {key}: measured {got:,} analytic {want:,}")
    print(json.dumps({"benchmark": "comm_volume", "overrides": overrides, "ranks": results}))
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
