"""``python -m megatron_lite.plan``: predict a layout, search all layouts, or check the planner
against published Megatron-LM throughput.

    python -m megatron_lite.plan --world-size 8 --device H100-80G model=gpt2_124m training.precision=bf16 \\
        parallel.tensor_model_parallel_size=2 training.global_batch_size=64
    python -m megatron_lite.plan --world-size 64 --search --top 10 model=llama_1b training.precision=bf16 \\
        training.global_batch_size=256
    python -m megatron_lite.plan --validate

Overrides are the trainer's Hydra overrides. The vocabulary is ``model.vocab_size`` or, if unset, the
configured tokenizer's (the bundled one by default), padded as the trainer pads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Optional, Sequence

from ..config import ConfigError, load_config
from .devices import DEVICES, device
from .estimate import RECOMPUTE, Prediction, predict, rank_memory, setup_from_config
from .published import ERROR_BOUND, validation_table
from .search import MICRO_BATCHES, search

GiB = 2**30


def _vocab(cfg) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from ..data import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer).vocab_size


def _layout(p: Prediction) -> str:
    d, s = p.setup.dims, p.setup
    vpp = f" VPP{d.vpp}" if d.vpp > 1 else ""
    cp = f" CP{d.cp}" if d.cp > 1 else ""
    cp += (f" EP{d.ep}" + (f" ETP{d.etp}" if d.etp > 1 else "")) if d.experts else ""
    return (f"TP{d.tp}{cp} PP{d.pp}{vpp} DP{d.dp} mbs {s.micro_batch_size} ×{d.num_microbatches} "
            f"{d.pipeline_schedule}{' SP' if d.sequence_parallel else ''}")


def assumptions(cfg, dev, recompute: Optional[str], overlap: bool, search: bool = False) -> str:
    """The line every prediction opens with: what it assumes besides the layout, and where each is set."""
    t = cfg.training
    micro = (f"micro batch each layout's of {', '.join(map(str, MICRO_BATCHES))}" if search
             else f"micro batch {t.micro_batch_size} (training.micro_batch_size)")
    return (f"assumptions: global batch {t.global_batch_size} × {cfg.model.seq_length} tokens "
            f"(training.global_batch_size, model.seq_length), {micro}, "
            f"{t.precision} (training.precision), recompute {recompute or t.recompute} (training.recompute, --recompute), "
            f"distributed optimizer {'on' if cfg.optimizer.use_distributed_optimizer else 'off'} "
            f"(optimizer.use_distributed_optimizer), communication {'overlapped' if overlap else 'exposed'} "
            f"(--overlap), computation at {dev.efficiency:.0%} of {dev.name}'s peak (--efficiency)")


def print_prediction(p: Prediction) -> None:
    s, d = p.setup, p.setup.dims
    print(f"layout: {_layout(p)}  on {d.world_size} × {p.device.name}, {s.precision}, recompute {s.recompute}, "
          f"distributed optimizer {s.distributed_optimizer}")
    print("memory per rank (GiB), fullest pipeline stage; one column per recompute mode:")
    def fullest(mode: str, distributed: bool):
        setup = replace(s, recompute=mode, distributed_optimizer=distributed)
        return max((rank_memory(setup, r) for r in range(d.pp)), key=lambda m: m.total)

    # The distributed optimizer shards over DP × CP (an MoE model's expert state over expert-DP).
    plain = {mode: fullest(mode, False) for mode in RECOMPUTE}
    sharded = {mode: fullest(mode, True) for mode in RECOMPUTE}
    print(f"  {'':<34}" + "".join(f"{mode:>11}" for mode in RECOMPUTE))
    for label, key in (("parameters", "parameters"), ("gradients (fp32)", "gradients"),
                       ("optimizer", "optimizer"), ("activations", "activations")):
        print(f"  {label:<34}" + "".join(f"{getattr(plain[m], key) / GiB:>11.2f}" for m in RECOMPUTE))
    print(f"  {'optimizer, distributed (÷ DP×CP' + (', experts ÷ EDP)' if d.experts else ')'):<34}"
          + "".join(f"{sharded[m].optimizer / GiB:>11.2f}" for m in RECOMPUTE))
    print(f"  {'total':<34}" + "".join(f"{plain[m].total / GiB:>11.2f}" for m in RECOMPUTE))
    print(f"  {'total, distributed optimizer':<34}" + "".join(f"{sharded[m].total / GiB:>11.2f}" for m in RECOMPUTE))
    print(f"  in-flight microbatches on the fullest stage: {p.memory.in_flight:g}; device memory "
          f"{p.device.memory_bytes / GiB:.1f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}")
    t = p.time
    print(f"model FLOPs per iteration: {p.model_flops:.3e}")
    print(f"step time {t.total * 1e3:.1f} ms = compute {t.compute * 1e3:.1f} (at {p.device.efficiency:.0%} of peak) + "
          f"TP {t.tp * 1e3:.1f} + PP {t.pp * 1e3:.1f} + CP {t.cp * 1e3:.1f} + bubble {t.bubble * 1e3:.1f} + DP {t.dp * 1e3:.1f} + "
          f"optimizer {t.optimizer * 1e3:.1f}")
    print(f"predicted {p.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {p.mfu:.1%}, {p.tokens_per_s:,.0f} tokens/s")


def print_search(predictions: list[Prediction], top: int) -> None:
    print(f"{'rank':>4}  {'layout':<40} {'memory GiB':>10} {'step ms':>9} {'MFU':>6} {'tokens/s':>12}")
    for i, p in enumerate(predictions[:top], 1):
        print(f"{i:>4}  {_layout(p):<40} {p.memory.total / GiB:>10.1f} {p.time.total * 1e3:>9.1f} "
              f"{p.mfu:>6.1%} {p.tokens_per_s:>12,.0f}")
    print(f"{len(predictions)} valid layouts fit")


def print_validation(rows: list[dict]) -> None:
    print(f"{'source':<48} {'model':>15} {'GPUs':>5} {'TP':>3} {'PP':>3} {'EP':>3} {'published':>10} "
          f"{'predicted':>10} {'error':>7}")
    for r in rows:
        print(f"{r['source']:<48} {r['model']:>15} {r['gpus']:>5} {r['tp']:>3} {r['pp']:>3} {r['ep']:>3} "
              f"{r['published_tflops']:>10.1f} {r['predicted_tflops']:>10.1f} {r['error']:>+7.1%}"
              f"{'  known miss' if r['known_miss'] else ''}")
    bounded = [abs(r["error"]) for r in rows if not r["known_miss"]]
    print(f"TFLOP/s per GPU; mean |error| {sum(bounded) / len(bounded):.1%}, worst {max(bounded):.1%} "
          f"(bound {ERROR_BOUND:.0%}) over all rows but the {len(rows) - len(bounded)} known misses "
          "(docs/performance.md)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lite.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, help="number of GPUs (ranks)")
    parser.add_argument("--device", default="H100-80G", help=f"one of {', '.join(DEVICES)}")
    parser.add_argument("--recompute", choices=RECOMPUTE, help="default: training.recompute, else none")
    parser.add_argument("--efficiency", type=float, help="fraction of peak the computation sustains")
    parser.add_argument("--overlap", action="store_true", help="DP and TP communication overlapped")
    parser.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--validate", action="store_true", help="predicted vs published Megatron-LM and Megatron-Bridge")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2_124m")
    args = parser.parse_args(argv)
    if args.validate:
        rows = validation_table()
        print(json.dumps(rows) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_validation(rows)
        return 0
    if args.world_size is None or args.world_size <= 0:
        parser.error("--world-size: give the number of GPUs (a positive integer)")
    try:
        dev = device(args.device)
        if args.efficiency is not None:
            if not 0 < args.efficiency <= 1:
                raise ValueError(f"--efficiency: {args.efficiency} is not in (0, 1]")
            dev = replace(dev, efficiency=args.efficiency)
        cfg = load_config(args.overrides)
        vocab = _vocab(cfg)
        if args.search:
            predictions = search(cfg, args.world_size, vocab, dev, args.recompute, args.overlap)
        else:
            prediction = predict(setup_from_config(cfg, args.world_size, vocab, args.recompute, args.overlap), dev)
    except (ConfigError, ValueError) as err:
        print(f"plan error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([p.as_dict() for p in predictions[: args.top]] if args.search else prediction.as_dict()))
        return 0
    print(assumptions(cfg, dev, args.recompute, args.overlap, args.search))
    if args.search:
        print_search(predictions, args.top)
    else:
        print_prediction(prediction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
