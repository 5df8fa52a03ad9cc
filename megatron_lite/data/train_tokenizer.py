"""Train a sentencepiece BPE tokenizer on a JSONL corpus.

    python -m megatron_lite.data.train_tokenizer --input corpus.jsonl --vocab-size 8000 --output tok

writes ``tok.model`` (what ``data.tokenizer.model`` and ``preprocess --tokenizer-model`` take) and
``tok.vocab``, only when training succeeds (a failure writes nothing and leaves earlier files as
they were). Each line of each document is one training sentence. The model keeps text exactly
(no normalisation, whitespace kept) and falls back to bytes for characters it has not seen, so
``detokenize(tokenize(s)) == s`` for any string.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator

from megatron_lite.data.errors import DataError
from megatron_lite.data.jsonl import iter_documents

# ids 0-3, in sentencepiece's usual order; pad gets an id so that batches can be padded if needed.
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def _sentences(paths: list[str], key: str) -> Iterator[str]:
    for path in paths:
        for text in iter_documents(path, key):
            for line in text.split("\n"):
                if line.strip():
                    yield line


def train(
    inputs: list[str], output: str | Path, vocab_size: int, json_key: str = "text",
    max_sentences: int = 10_000_000, threads: int = 2,
) -> Path:
    """Train and write ``{output}.model``/``.vocab``; returns the .model path."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise DataError(
            f"--vocab-size: {vocab_size} is too small for byte fallback; use at least 300"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Trained under a temporary prefix beside the output and moved into place only when complete:
    # a failure (bad input, interrupt) leaves any earlier tok.model/.vocab as they were.
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        _train_checked(spm, inputs, json_key, temporary, vocab_size, max_sentences, threads)
        for suffix in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            os.replace(f"{temporary}{suffix}", f"{output}{suffix}")
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
    return Path(f"{output}.model")


def _train_checked(spm, inputs: list[str], json_key: str, output: Path, vocab_size: int, max_sentences: int,
                   threads: int) -> None:
    """Train into ``output``.model/.vocab; a bad input raises its DataError, not sentencepiece's trace."""
    # sentencepiece turns an exception raised in the iterator into a RuntimeError with a C++ trace:
    # the iterator stops at a bad input instead and its DataError is raised here.
    failed: list[DataError] = []

    def sentences() -> Iterator[str]:
        try:
            yield from _sentences(inputs, json_key)
        except DataError as err:
            failed.append(err)

    try:
        _train_from(spm, sentences(), output, vocab_size, max_sentences, threads)
    except RuntimeError:
        if failed:
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]


def _train_from(spm, sentences: Iterator[str], output: Path, vocab_size: int, max_sentences: int,
                threads: int) -> None:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences,
        model_prefix=str(output),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        num_threads=threads,
        minloglevel=2,
        **SPECIAL_IDS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz/.xz allowed)")
    parser.add_argument("--json-key", default="text", help="field holding the document text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--max-sentences", type=int, default=10_000_000,
                        help="sample at most this many lines for training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        model = train(args.input, args.output, args.vocab_size, args.json_key,
                      args.max_sentences, args.threads)
    except DataError as err:
        print(f"train_tokenizer: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the output prefix lies under a regular file
        print(f"train_tokenizer: {err.filename or args.output}: {err.strerror or err}; cannot write there, "
              "choose another --output", file=sys.stderr)
        return 2
    print(f"wrote {model} and {Path(str(args.output) + '.vocab')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
