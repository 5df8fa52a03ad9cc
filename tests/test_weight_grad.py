"""Weight gradients written by the layers (tensor_parallel/weight_grad.py): into the fp32 main_grad
(gradient-accumulation fusion) equal to autograd's gradients in fp32, bf16 and fp16; deferred to a
WeightGradStore and run later (the split backward) bit-identical to a normal backward, with every
overlapped bucket reduction starting only once its last weight gradient is in; on one rank and TP 2.
(Resume through a checkpoint with the fusion: test_checkpoint.py's bit-identical resumes, bf16/fp16.)
"""

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.model import build_model_chunks
from megatron_lite.optim import GradBuffer, finalize_grads
from megatron_lite.parallel.collectives import TPGroup
from megatron_lite.parallel.state import ParallelState
from megatron_lite.tensor_parallel import WeightGradStore, defer_weight_grads

VOCAB = 512
MODELS = {
    "gpt": ["model=gpt_tiny", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.seq_length=16"],
    "llama": ["model=llama_tiny", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.seq_length=16",
              "model.tie_embeddings=true"],
}
MICROBATCHES = 2


def _batches(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 12, (MICROBATCHES, 2, cfg.seq_length + 1), generator=g)
    return [(i[:, :-1], i[:, 1:]) for i in ids]


class LaunchLog:
    """Wraps a GradBuffer's bucket launches: at each, whether every parameter of the bucket already
    holds its final gradient (``final``: name -> fp32 gradient of the whole step)."""

    def __init__(self, buffer: GradBuffer, names: dict, final: dict):
        self.complete: list[bool] = []
        launch = buffer._launch

        def logged(bucket: int) -> None:
            members = [p for p in buffer.params if buffer.bucket_of[p] == bucket]
            self.complete.append(all(torch.equal(p.main_grad, final[names[p]]) for p in members))
            launch(bucket)

        buffer._launch = logged


def _step(model_name: str, tp: TPGroup, state, *, defer: bool, recompute: str = "none", final=None) -> dict:
    """One step of MICROBATCHES backwards into an overlapped GradBuffer (small buckets); with
    ``defer`` each backward queues its weight gradients and the store runs after it. ``final``:
    the gradients accumulated by the end of the backwards, which every launched bucket must hold."""
    cfg = load_config(MODELS[model_name]).model
    chunk = build_model_chunks(cfg, VOCAB, tp=tp, seed=5, recompute=recompute)[0]
    names = {p: n for n, p in chunk.named_parameters()}
    buffer = GradBuffer(chunk.parameters(), overlap=True, bucket_elements=20_000)
    log = LaunchLog(buffer, names, final) if final is not None else None
    buffer.start_step(MICROBATCHES)
    pending_after_backward = []
    for tokens, labels in _batches(cfg):
        loss = chunk(tokens, labels).mean() / MICROBATCHES
        if defer:
            store = WeightGradStore()
            with defer_weight_grads(store):
                loss.backward()
            pending_after_backward.append(len(store))
            store.run()
            assert len(store) == 0
        else:
            loss.backward()
    buffer.finish_accumulation()
    accumulated = {n: p.main_grad.clone() for n, p in chunk.named_parameters()}
    if state is not None:
        finalize_grads(buffer, state)
    grads = {n: p.main_grad.clone() for n, p in chunk.named_parameters()}
    return {"grads": grads, "accumulated": accumulated, "pending": pending_after_backward, "launches": buffer.early_launches,
            "complete": log.complete if log else None}


def _autograd_grads(model_name: str, dtype: torch.dtype) -> dict:
    """The reference: torch's autograd into param.grad (no GradBuffer), each microbatch's gradient
    taken separately and summed in fp32."""
    cfg = load_config(MODELS[model_name]).model
    chunk = build_model_chunks(cfg, VOCAB, seed=5)[0].to(dtype)
    total = {n: torch.zeros(p.shape) for n, p in chunk.named_parameters()}
    for tokens, labels in _batches(cfg):
        chunk.zero_grad(set_to_none=True)
        (chunk(tokens, labels).mean() / MICROBATCHES).backward()
        for n, p in chunk.named_parameters():
            total[n] += p.grad.float()
    return total


def _compare_deferred(model_name: str, tp: TPGroup, state, recompute: str = "none") -> dict:
    normal = _step(model_name, tp, state, defer=False, recompute=recompute)
    deferred = _step(model_name, tp, state, defer=True, recompute=recompute, final=normal["accumulated"])
    return {"max_diff": max((deferred["grads"][n] - g).abs().max().item() for n, g in normal["grads"].items()),
            "pending": deferred["pending"], "launches": (normal["launches"], deferred["launches"]),
            "complete": deferred["complete"]}


def _check(result: dict) -> None:
    assert result["max_diff"] == 0.0  # the same ops in the same order: bit-identical
    assert all(n > 0 for n in result["pending"])  # the weight gradients really were deferred
    normal, deferred = result["launches"]
    assert normal == deferred > 1  # buckets reduced during the step, as in a normal backward
    assert len(result["complete"]) == deferred and all(result["complete"])


@pytest.mark.parametrize("model_name,recompute", [("gpt", "none"), ("llama", "none"), ("llama", "full")])
def test_deferred_weight_grads_match_backward_on_one_rank(model_name, recompute):
    _check(_compare_deferred(model_name, TPGroup(), None, recompute))


def _tp2(sp: bool) -> list:
    state = ParallelState(tp=2)
    tp = TPGroup.from_state(state, sequence_parallel=sp)
    out = [_compare_deferred(name, tp, state) for name in MODELS]
    state.destroy()
    return out


@pytest.mark.parametrize("sp", [False, True])
def test_deferred_weight_grads_match_backward_with_tp2(ranks, sp):
    for per_rank in ranks(2).run(_tp2, sp):
        for result in per_rank:
            _check(result)


def test_deferred_without_grad_buffer_accumulates_param_grad():
    cfg = load_config(MODELS["llama"]).model
    ref = _autograd_grads("llama", torch.float32)
    chunk = build_model_chunks(cfg, VOCAB, seed=5)[0]
    for tokens, labels in _batches(cfg):
        store = WeightGradStore()
        with defer_weight_grads(store):
            (chunk(tokens, labels).mean() / MICROBATCHES).backward()
        store.run()
    for n, p in chunk.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-5, atol=1e-7), n


# Fusion in each precision: main_grad (fp32) against autograd's gradient of the same model.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fused_main_grad_matches_autograd(model_name, dtype, tolerance):
    cfg = load_config(MODELS[model_name]).model
    ref = _autograd_grads(model_name, dtype)
    chunk = build_model_chunks(cfg, VOCAB, seed=5)[0].to(dtype)
    buffer = GradBuffer(chunk.parameters())
    buffer.start_step(MICROBATCHES)
    for tokens, labels in _batches(cfg):
        (chunk(tokens, labels).mean() / MICROBATCHES).backward()
    buffer.finish_accumulation()
    for n, p in chunk.named_parameters():
        assert p.grad is None, n  # nothing left in param.grad: every gradient went into main_grad
        err = ((p.main_grad - ref[n]).abs().max() / ref[n].abs().max()).item()
        assert err < tolerance, (n, err)


def test_unwritten_main_grad_is_zeroed_at_the_end_of_the_step():
    """A step's first contribution overwrites main_grad (no zeroing); a parameter that got none is
    zeroed by finish_accumulation rather than keeping the previous step's gradient."""
    cfg = load_config(MODELS["gpt"]).model
    chunk = build_model_chunks(cfg, VOCAB, seed=5)[0]
    buffer = GradBuffer(chunk.parameters())
    (tokens, labels), _ = _batches(cfg)
    for step in range(2):
        buffer.start_step(1)
        chunk(tokens, labels).mean().backward()
        if step == 0:
            first = {n: p.main_grad.clone() for n, p in chunk.named_parameters()}
            chunk.position_embedding.requires_grad_(False)  # step 1 leaves it unwritten
        buffer.finish_accumulation()
    for n, p in chunk.named_parameters():
        expected = torch.zeros_like(first[n]) if n == "position_embedding" else first[n]
        assert torch.equal(p.main_grad, expected), n


# 16-bit weight gradients on CUDA: one GEMM with an fp32 output (fp32_gemm), never rounded to 16 bits.
def test_fp32_gemm_decision(monkeypatch):
    """bf16/fp16 inputs into an fp32 main_grad take the fp32-output GEMM on a device that has it
    (CUDA; ``meta`` stands in for it here, which also checks the call's signature) and nowhere else;
    the CPU keeps the rounded product (its accuracy: test_fused_main_grad_matches_autograd)."""
    from megatron_lite.tensor_parallel import weight_grad as wg

    assert wg.FP32_OUT_GEMM  # torch >= 2.8 has mm(..., out_dtype=torch.float32)
    fp32 = torch.zeros(5, 3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert not wg.fp32_gemm(torch.zeros(4, 3, dtype=dtype), fp32), dtype  # the CPU: no such kernel
    monkeypatch.setattr(wg, "FP32_OUT_DEVICES", ("cuda", "meta"))
    for dtype, expected in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        x, dy = torch.empty(4, 3, dtype=dtype, device="meta"), torch.empty(4, 5, dtype=dtype, device="meta")
        main_grad = torch.empty(5, 3, device="meta")
        assert wg.fp32_gemm(x, main_grad) is expected
        work = wg.LinearWeightGrad(dy, x)
        work.write_to(main_grad)
        work.add_to(main_grad)
        assert main_grad.dtype == torch.float32 and main_grad.shape == (5, 3)
    assert not wg.fp32_gemm(x.to(torch.bfloat16), main_grad.to(torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weight_grads_accumulate_in_fp32_on_cuda(dtype):
    """8 microbatches of dW = dyᵀx into main_grad against the fp64 sum of the same 16-bit inputs:
    within 2e-4 relative (a bf16-rounded product per microbatch was 1.7e-3 off)."""
    from megatron_lite.tensor_parallel.weight_grad import LinearWeightGrad

    g = torch.Generator(device="cuda").manual_seed(0)
    pairs = [(torch.randn(4096, 256, device="cuda", generator=g).to(dtype),
              torch.randn(4096, 128, device="cuda", generator=g).to(dtype)) for _ in range(8)]
    main_grad = torch.empty(256, 128, device="cuda")
    for i, (dy, x) in enumerate(pairs):
        work = LinearWeightGrad(dy, x)
        work.write_to(main_grad) if i == 0 else work.add_to(main_grad)
    exact = sum(dy.double().t() @ x.double() for dy, x in pairs)
    err = ((main_grad.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 2e-4, err
