"""Tensor parallelism against the single-rank model it replaces, on gloo ranks, in float32.

For a GPT-2-style and a LLaMA-style (GQA) config, TP = 1, 2, 4 with and without sequence
parallelism: the loss, every parameter's gradient gathered to full shape, and the parameters after
three SGD steps all equal the TP = 1 model's to 1e-5 (max-abs error relative to the reference's
max-abs value).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.config import load_config
from megatron_lite.model import build_gpt
from megatron_lite.optim import GradBuffer, finalize_grads
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.parallel.state import ParallelState
from megatron_lite.tensor_parallel import (
    ModelRNG,
    dropout,
    gather_full,
    shard_tensor,
    vocab_parallel_cross_entropy,
)

TOLERANCE = 1e-5
VOCAB = 512  # a multiple of 128 × 4, as padding makes it
MODELS = {
    "gpt": ["model=gpt_tiny", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=256",
            "model.seq_length=32"],
    "llama": ["model=llama_tiny", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=8",
              "model.num_query_groups=4", "model.ffn_hidden_size=96", "model.seq_length=32"],
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def batch(seed: int, cfg, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB - 12, (b, cfg.seq_length + 1), generator=g)  # 12 padded ids unused
    return tokens[:, :-1], tokens[:, 1:]


def full_grads_and_params(model, tp: TPGroup) -> tuple[dict, dict]:
    grads, params = {}, {}
    for name, p in model.named_parameters():
        dim, stride = p.meta.tp_shard_dim, p.meta.tp_shard_stride
        params[name] = gather_full(p.detach(), dim, stride, tp)
        grads[name] = gather_full(p.main_grad, dim, stride, tp)
    return grads, params


def train_steps(model, tp: TPGroup, cfg, steps: int, state=None):
    """Losses of ``steps`` SGD iterations, plus full grads of the first and full params after the last.

    Gradients go through the trainer's path: the fp32 ``GradBuffer`` (weight gradients written by
    the layers) and ``finalize_grads`` (the sequence-parallel sums over TP; ``state``: the
    ``ParallelState``, None for the single-rank reference).
    SGD with momentum, not Adam: Adam's first update is lr·sign(g) per element, so fp32 rounding of a
    gradient element near zero (1e-7 relative to the tensor) could flip a whole lr-sized step, which
    would test Adam's conditioning rather than the parallel code.
    """
    params = list(model.parameters())
    buffer = GradBuffer(params)
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    losses, first_grads = [], None
    for step in range(steps):
        tokens, labels = batch(step, cfg)
        buffer.start_step(1)
        loss = model(tokens, labels).mean()
        loss.backward()
        if state is None:
            buffer.finish_accumulation()
        else:
            finalize_grads(buffer, state)
        for p in params:
            p.grad = p.main_grad
        if first_grads is None:
            first_grads, _ = full_grads_and_params(model, tp)
        optimizer.step()
        for p in params:
            p.grad = None  # as optim/optimizer.py:Optimizer.step does: autograd would add into main_grad
        losses.append(loss.detach())
    _, params = full_grads_and_params(model, tp)
    return torch.stack(losses), first_grads, params


def _tp_equivalence(cases: list[tuple[str, int, bool]], steps: int = 3) -> dict:
    """On every rank: each (model, TP, SP) case against the TP=1 model computed locally."""
    errors = {}
    for model_name, tp_size, sp in cases:
        cfg = load_config(MODELS[model_name]).model
        ref_losses, ref_grads, ref_params = train_steps(build_gpt(cfg, VOCAB, TPGroup(), seed=7), TPGroup(), cfg, steps)
        state = ParallelState(tp=tp_size)
        tp = TPGroup.from_state(state, sequence_parallel=sp)
        losses, grads, params = train_steps(build_gpt(cfg, VOCAB, tp, seed=7), tp, cfg, steps, state)
        assert grads.keys() == ref_grads.keys()
        errors[(model_name, tp_size, sp)] = {
            "loss": rel_err(losses, ref_losses),
            "grad": max(rel_err(grads[k], ref_grads[k]) for k in grads),
            "param": max(rel_err(params[k], ref_params[k]) for k in params),
        }
        state.destroy()
    return errors


CASES = [(m, tp, sp) for m in MODELS for tp in (1, 2, 4) for sp in ((False, True) if tp > 1 else (False,))]


def test_tp_matches_single_rank(ranks):
    per_rank = ranks(4).run(_tp_equivalence, CASES)
    for case in CASES:
        worst = {k: max(r[case][k] for r in per_rank) for k in ("loss", "grad", "param")}
        print(f"{case}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        assert all(v < TOLERANCE for v in worst.values()), (case, worst)


def _cross_entropy_vs_torch(tp_size: int) -> dict:
    state = ParallelState(tp=tp_size)
    tp = TPGroup.from_state(state)
    g = torch.Generator().manual_seed(3)
    full_logits = torch.randn(2, 5, 64, generator=g, dtype=torch.float64).float() * 3
    labels = torch.randint(0, 64, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    errors = {}
    for smoothing in (0.0, 0.1):
        ref_logits = full_logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.view(-1, 64), labels.view(-1), reduction="none", label_smoothing=smoothing)
        ref.sum().backward()
        for overwrite in (False, True):
            local = shard_tensor(full_logits, -1, 1, tp.rank, tp.size).requires_grad_()
            logits = local.clone() if overwrite else local  # the model's logits: a non-leaf nothing else reads
            loss = vocab_parallel_cross_entropy(logits, labels, tp, label_smoothing=smoothing, overwrite_logits=overwrite)
            loss.sum().backward()
            errors[smoothing, overwrite] = (
                rel_err(loss.view(-1), ref.detach()),
                rel_err(local.grad, shard_tensor(ref_logits.grad, -1, 1, tp.rank, tp.size)),
                torch.equal(local.detach(), shard_tensor(full_logits, -1, 1, tp.rank, tp.size)),
            )
    # bf16 logits: the loss works on an fp32 copy and leaves them as they were, overwrite or not.
    rounded = full_logits.bfloat16().float()
    ref = F.cross_entropy(rounded.view(-1, 64), labels.view(-1), reduction="none")
    for overwrite in (False, True):
        local = shard_tensor(rounded, -1, 1, tp.rank, tp.size).bfloat16().requires_grad_()
        before = local.detach().clone()
        loss = vocab_parallel_cross_entropy(local, labels, tp, overwrite_logits=overwrite)
        loss.sum().backward()
        grad_dtype_err = 0.0 if local.grad.dtype == torch.bfloat16 else 1.0
        errors["bf16", overwrite] = (rel_err(loss.view(-1), ref), grad_dtype_err, torch.equal(local.detach(), before))
    state.destroy()
    return errors


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_vocab_parallel_cross_entropy(ranks, tp_size):
    """Against F.cross_entropy, with and without ``overwrite_logits``, fp32 and bf16 logits (the
    gradient in the logits' dtype); the caller's logits are left as they were unless they are fp32
    and ``overwrite_logits`` is set."""
    for errors in ranks(4).run(_cross_entropy_vs_torch, tp_size):
        for case, (loss_err, grad_err, logits_intact) in errors.items():
            assert loss_err < 1e-6 and grad_err < 1e-6, (case, loss_err, grad_err)
            assert logits_intact, case


def _dropout_masks() -> dict:
    """TP=2 × DP=2: masks inside TP regions differ across TP, outside they agree; DP replicas agree."""
    state = ParallelState(tp=2)
    rng = ModelRNG(seed=11, tp_rank=state.tp_rank, pp_rank=state.pp_rank)
    ones = torch.ones(1000)
    masks = {"default": dropout(ones, 0.5, rng.default), "tp": dropout(ones, 0.5, rng.tensor_parallel)}
    out = {}
    for kind, mask in masks.items():
        for dim, group in (("tp", state.tp_group), ("dp", state.dp_group)):
            gathered = [torch.empty_like(mask) for _ in range(2)]
            dist.all_gather(gathered, mask, group=group)
            out[(kind, dim)] = torch.equal(gathered[0], gathered[1])
    state.destroy()
    return out


def test_tp_aware_dropout(ranks):
    for out in ranks(4).run(_dropout_masks):
        assert out[("default", "tp")] and out[("default", "dp")]
        assert not out[("tp", "tp")] and out[("tp", "dp")]


def test_init_is_independent_of_tp():
    """The shards of a TP=4 model are slices of the TP=1 model's tensors (checked without ranks)."""
    cfg = load_config(MODELS["llama"]).model
    full = dict(build_gpt(cfg, VOCAB, TPGroup(), seed=5).named_parameters())
    for rank in range(4):
        tp = TPGroup(group=None, size=4, rank=rank)
        for name, p in build_gpt(cfg, VOCAB, tp, seed=5).named_parameters():
            expected = shard_tensor(full[name].detach(), p.meta.tp_shard_dim, p.meta.tp_shard_stride, rank, 4)
            assert torch.equal(p.detach(), expected), name


def _count_layer_communication(sp: bool) -> dict:
    """Collectives issued by one transformer block's forward + backward at TP=2, in elements."""
    import megatron_lite.parallel.collectives as C
    from megatron_lite.model.transformer import TransformerBlock

    state = ParallelState(tp=2)
    tp = TPGroup.from_state(state, sequence_parallel=sp)
    cfg = load_config(MODELS["gpt"]).model
    block = TransformerBlock(cfg, tp, ModelRNG(0))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    b, s, h = 2, cfg.seq_length, cfg.hidden_size
    x = torch.randn(b, s // tp.size if sp else s, h, requires_grad=True)

    counts: dict = {}
    # Bytes on the wire are counted by the full (unsharded) tensor: the output of an all-gather,
    # the input of a reduce-scatter, the tensor of an all-reduce.
    wrapped = {(C, "all_gather_flat"): lambda out, inp, *a, **k: out,
               (C, "reduce_scatter_flat"): lambda out, inp, *a, **k: inp,
               (dist, "all_reduce"): lambda t, *a, **k: t}
    originals = {key: getattr(*key) for key in wrapped}

    def counting(key, fn):
        name = {"all_gather_flat": "all_gather", "reduce_scatter_flat": "reduce_scatter"}.get(key[1], key[1])

        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + wrapped[key](*args, **kwargs).numel()
            counts[name + "_calls"] = counts.get(name + "_calls", 0) + 1
            return fn(*args, **kwargs)
        return call

    for key, fn in originals.items():
        setattr(*key, counting(key, fn))
    try:
        block(x).sum().backward()
    finally:
        for key, fn in originals.items():
            setattr(*key, fn)
    state.destroy()
    return {"counts": counts, "bsh": b * s * h}


@pytest.mark.parametrize("sp", [False, True])
def test_tp_communication_matches_megatron_count(ranks, sp):
    """Megatron: per layer and step 4 all-reduces of b·s·h without SP; with SP the same volume as
    all-gathers + reduce-scatters (2 of each forward, 2 of each backward), plus Megatron's two
    backward all-gathers of the column-parallel layers' inputs, which keep only their shard."""
    report = ranks(4).run(_count_layer_communication, sp)[0]
    counts, bsh = report["counts"], report["bsh"]
    print(f"sp={sp}: {counts} (b·s·h = {bsh})")
    if sp:
        assert counts == {"all_gather": 6 * bsh, "all_gather_calls": 6, "reduce_scatter": 4 * bsh,
                          "reduce_scatter_calls": 4}
    else:
        assert counts == {"all_reduce": 4 * bsh, "all_reduce_calls": 4}
