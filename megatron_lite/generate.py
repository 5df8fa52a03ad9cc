"""Sample text from a checkpoint: the sanity check after (or during) a run.

    python -m megatron_lite.generate --load CKPT [--iteration N] --prompt TEXT
        [--max-new-tokens 64] [--temperature 1.0] [--top-k 50] [--greedy] [--seed 0]

Loads a checkpoint saved in any layout into one process (the TP = 1 loader of
``checkpoint.hf.load_model``), tokenizes the prompt with the checkpoint's tokenizer (its stored
``data.tokenizer``), and samples one token at a time with a KV cache (``model.transformer.KVCache``):
the prompt's forward fills the cache, then each step runs the new token alone. Stops at the end-of-
document token, after ``--max-new-tokens``, or at the model's ``seq_length``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from .checkpoint.storage import CheckpointError
from .config import ConfigError
from .data.errors import DataError
from .model import GPTChunk
from .model.transformer import KVCache


def next_token(
    logits: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> int:
    """A token id from the last position's logits [V]: the argmax, or a sample of softmax(logits / T)
    over the ``top_k`` largest (None: all)."""
    if greedy:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPTChunk, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
    greedy: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> list[int]:
    """The ids that continue ``prompt`` (a stop id, if reached, is the last one). ``model``: the whole
    model as one chunk (``load_model``), on one process."""
    if not prompt:
        raise ValueError("generate: the prompt has no tokens")
    room = model.cfg.seq_length - len(prompt)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's seq_length is {model.cfg.seq_length}")
    device = next(model.parameters()).device
    caches = [KVCache() for _ in model.layers]
    x = torch.tensor([list(prompt)], device=device)
    out: list[int] = []
    for _ in range(min(max_new_tokens, room)):
        logits = model(x, kv_caches=caches)[0, -1]
        token = next_token(logits, greedy, temperature, top_k, generator)
        out.append(token)
        if token in stop_ids:
            break
        x = torch.tensor([[token]], device=device)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint.hf import load_model
    from .data.tokenizer import build_tokenizer

    parser = argparse.ArgumentParser(prog="megatron-lite-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (checkpoint.save of the run)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    parser.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.temperature <= 0 and not args.greedy:
        print("error: --temperature must be positive (or pass --greedy)", file=sys.stderr)
        return 2
    if args.top_k is not None and args.top_k <= 0:
        print("error: --top-k must be positive", file=sys.stderr)
        return 2
    try:
        cfg, model = load_model(args.load, args.iteration)
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        prompt = tokenizer.tokenize(args.prompt) or [tokenizer.eod]
        start = time.perf_counter()
        ids = generate(
            model.to(args.device), prompt, args.max_new_tokens, (tokenizer.eod,), args.greedy, args.temperature,
            args.top_k, torch.Generator().manual_seed(args.seed),
        )
    except (CheckpointError, ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    stopped = "end of document" if ids and ids[-1] == tokenizer.eod else "length limit"
    # Decoded with the prompt: a word-initial piece decodes with its space only after other text.
    print(tokenizer.detokenize(prompt + (ids[:-1] if stopped == "end of document" else ids)))
    print(f"generate: {len(ids)} tokens in {seconds:.2f} s ({stopped}); prompt {len(prompt)} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
