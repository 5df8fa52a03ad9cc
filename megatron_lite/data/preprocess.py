"""Tokenize a JSONL corpus into Megatron's ``.bin``/``.idx`` format, streaming, with N workers.

    python -m megatron_lite.data.preprocess --input corpus.jsonl[.gz|.xz] --json-key text \\
        --tokenizer-model tok.model --output-prefix data/corpus --workers 4 --append-eod

writes ``data/corpus_text_document.bin``/``.idx`` (the prefix to put in ``data.paths``). The main
process reads lines in batches and hands them to the workers; at most a few batches per worker are
in flight, so memory stays flat however large the corpus. Documents keep their input order.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megatron_lite.data.errors import DataError
from megatron_lite.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from megatron_lite.data.jsonl import document_text, iter_lines
from megatron_lite.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer

BATCH_LINES = 256
BATCHES_IN_FLIGHT_PER_WORKER = 4


@dataclass
class PreprocessStats:
    documents: int = 0
    skipped_empty: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = max(self.seconds, 1e-9)
        return (
            f"{self.documents} docs ({self.documents / rate:.0f} docs/s), "
            f"{self.input_bytes / 1e6:.1f} MB ({self.input_bytes / 1e6 / rate:.2f} MB/s), "
            f"{self.tokens} tokens ({self.tokens / rate:.0f} tokens/s)"
        )


class _Encoder:
    """Turns a batch of JSON lines into token arrays; one per worker process (or in-process)."""

    def __init__(
        self, tokenizer: Tokenizer, json_key: str, append_eod: bool, skip_empty: bool, source: str
    ):
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.key, self.append_eod, self.skip_empty = json_key, append_eod, skip_empty
        self.source = source

    def encode(self, batch: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray, int]:
        """(the batch's tokens back to back, int32 length of each kept document, number skipped)."""
        documents: list[list[int]] = []
        skipped = 0
        for number, line in batch:
            where = f"{self.source}:{number}"
            ids = self.tokenizer.tokenize(document_text(line, self.key, where))
            if not ids:
                if not self.skip_empty:
                    raise DataError(
                        f"{where}: empty document (key {self.key!r} has no tokens); "
                        "remove it or pass --skip-empty"
                    )
                skipped += 1
                continue
            if self.append_eod:
                ids.append(self.tokenizer.eod)
            documents.append(ids)
        # One flat array per batch: far cheaper to send back from a worker than one per document.
        lengths = np.fromiter((len(ids) for ids in documents), dtype=np.int32, count=len(documents))
        flat = (t for ids in documents for t in ids)
        tokens = np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths, skipped


_worker_encoder: Optional[_Encoder] = None


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], *args) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(load_tokenizer(tokenizer_type, tokenizer_model), *args)


def _encode_in_worker(batch: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _worker_encoder is not None
    return _worker_encoder.encode(batch)


def _batches(path: str | Path, stats: PreprocessStats) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for number, line in iter_lines(path):
        stats.input_bytes += len(line)
        batch.append((number, line))
        if len(batch) == BATCH_LINES:
            yield batch
            batch = []
    if batch:
        yield batch


def output_prefix_for(output_prefix: str | Path, json_key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{json_key}_document``."""
    return f"{output_prefix}_{json_key}_document"


def preprocess(
    input_path: str | Path,
    output_prefix: str | Path,
    tokenizer_model: Optional[str | Path] = None,
    tokenizer_type: str = "sentencepiece",
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    skip_empty: bool = False,
    progress: bool = False,
    tokenizer: Optional[Tokenizer] = None,
) -> tuple[str, PreprocessStats]:
    """Tokenize ``input_path`` into ``{output_prefix}_{json_key}_document.bin/.idx``.

    The tokenizer is ``tokenizer`` if given, else loaded from ``tokenizer_type``/``tokenizer_model``
    (model None: the bundled one); worker processes load their own copy from its file.
    ``workers`` = 1 tokenizes in this process; more starts a pool. ``append_eod`` defaults to on
    here and off on the command line (``--append-eod``, as in Megatron). Returns the dataset prefix
    and the counts. Raises DataError naming the file and line of any bad document.
    """
    if workers < 1:
        raise DataError(f"--workers: must be at least 1, got {workers}")
    prefix = output_prefix_for(output_prefix, json_key)
    if tokenizer is None:  # loaded here first: a bad model fails before any pool starts
        tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    else:
        hf = isinstance(tokenizer, HuggingFaceTokenizer)
        tokenizer_type = "huggingface" if hf else "sentencepiece"
    encoder_args = (json_key, append_eod, skip_empty, str(input_path))
    local = _Encoder(tokenizer, *encoder_args)
    writer = IndexedDatasetWriter(prefix, local.dtype)
    stats = PreprocessStats()
    start = last_report = time.perf_counter()

    def consume(encoded: tuple[np.ndarray, np.ndarray, int]) -> None:
        nonlocal last_report
        tokens, lengths, skipped = encoded
        writer.add_documents(tokens, lengths)
        stats.documents += len(lengths)
        stats.tokens += len(tokens)
        stats.skipped_empty += skipped
        now = time.perf_counter()
        stats.seconds = now - start
        if progress and now - last_report > 1.0:
            last_report = now
            print(f"\r{stats.line()}", end="", file=sys.stderr, flush=True)

    try:
        if workers == 1:
            for batch in _batches(input_path, stats):
                consume(local.encode(batch))
        else:
            worker_args = (tokenizer_type, str(tokenizer.path), *encoder_args)
            with Pool(workers, initializer=_init_worker, initargs=worker_args) as pool:
                pending: deque = deque()
                for batch in _batches(input_path, stats):
                    pending.append(pool.apply_async(_encode_in_worker, (batch,)))
                    if len(pending) >= workers * BATCHES_IN_FLIGHT_PER_WORKER:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
    stats.seconds = time.perf_counter() - start
    if progress:
        print(f"\r{stats.line()}", file=sys.stderr)
    return prefix, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSONL file, optionally .gz or .xz")
    parser.add_argument("--json-key", default="text", help="field holding the document text")
    parser.add_argument("--tokenizer-model", default=None,
                        help="sentencepiece .model or HF tokenizer.json (default: the bundled one)")
    parser.add_argument("--tokenizer-type", default="sentencepiece",
                        choices=("sentencepiece", "huggingface"))
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=False,
                        help="end every document with the tokenizer's eod token (GPT wants it)")
    parser.add_argument("--skip-empty", action="store_true",
                        help="drop documents with no tokens instead of stopping with an error")
    args = parser.parse_args(argv)
    try:
        prefix, stats = preprocess(
            args.input, args.output_prefix, args.tokenizer_model, args.tokenizer_type,
            args.json_key, args.workers, args.append_eod, args.skip_empty, progress=True,
        )
    except DataError as err:
        print(f"preprocess: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the output prefix lies under a regular file, or a full disk
        print(f"preprocess: {err.filename or args.output_prefix}: {err.strerror or err}; cannot write there, "
              "choose another --output-prefix", file=sys.stderr)
        return 2
    skipped = f", skipped {stats.skipped_empty} empty documents" if stats.skipped_empty else ""
    print(f"wrote {prefix}.bin/.idx in {stats.seconds:.1f} s{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
