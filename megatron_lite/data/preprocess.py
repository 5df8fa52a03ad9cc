"""Tokenize a corpus into Megatron's ``.bin``/``.idx`` format, streaming, with N workers.

The command line is that of Megatron-LM's ``tools/preprocess_data.py``::

    python -m megatron_lite.data.preprocess --input corpus.jsonl[.gz|.xz] | corpus.parquet \\
        --json-keys text [title ...] --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --output-prefix data/corpus --workers 4 --append-eod

writes ``data/corpus_{key}_document.bin``/``.idx`` for every key (the prefixes to put in
``data.paths``) and beside each its record ``….record.json`` (tokenizer file and hash, vocabulary
size, eod id, key; see ``record.py``). ``--tokenizer-type`` takes Megatron's names
(``SentencePieceTokenizer``, ``HuggingFaceTokenizer`` with a tokenizer.json or directory,
``GPT2BPETokenizer`` with ``--vocab-file``/``--merge-file``, ``TikTokenizer``). Parquet input (one
column per key) needs ``pyarrow``. The main process reads documents in batches and hands them to
the workers; at most a few batches per worker are in flight, so memory stays flat however large the
corpus. Documents keep their input order.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from megatron_lite.data.errors import DataError
from megatron_lite.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from megatron_lite.data.jsonl import document_text, iter_lines
from megatron_lite.data.record import write_record
from megatron_lite.data.tokenizer import TOKENIZER_TYPES, Tokenizer, load_tokenizer, rebuild_tokenizer

BATCH_DOCUMENTS = 256
BATCHES_IN_FLIGHT_PER_WORKER = 4
# One document as read: a raw JSON line (parsed by the worker), or a parquet row's {key: text}.
Document = Union[bytes, dict]


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


# Per key: (the batch's tokens back to back, int32 length of each kept document, number skipped).
Encoded = list[tuple[np.ndarray, np.ndarray, int]]


class _Encoder:
    """Turns a batch of documents into token arrays, one triple per JSON key; one per worker."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eod: bool, skip_empty: bool,
                 source: str):
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.keys, self.append_eod, self.skip_empty = list(json_keys), append_eod, skip_empty
        self.source = source

    def _text(self, document: Document, key: str, where: str) -> str:
        if isinstance(document, bytes):
            return document_text(document, key, where)
        text = document[key]
        if not isinstance(text, str):
            raise DataError(f"{where}: column {key!r} holds a {type(text).__name__}, not a string")
        return text

    def encode(self, batch: list[tuple[int, Document]]) -> Encoded:
        per_key: dict[str, list[list[int]]] = {key: [] for key in self.keys}
        skipped = dict.fromkeys(self.keys, 0)
        for number, document in batch:
            where = f"{self.source}:{number}"
            for key in self.keys:
                ids = self.tokenizer.tokenize(self._text(document, key, where))
                if not ids:
                    if not self.skip_empty:
                        raise DataError(
                            f"{where}: empty document (key {key!r} has no tokens); remove it or pass --skip-empty"
                        )
                    skipped[key] += 1
                    continue
                if self.append_eod:
                    ids.append(self.tokenizer.eod)
                per_key[key].append(ids)
        out = []
        for key in self.keys:
            documents = per_key[key]
            # One flat array per batch: far cheaper to send back from a worker than one per document.
            lengths = np.fromiter((len(ids) for ids in documents), dtype=np.int32, count=len(documents))
            flat = (t for ids in documents for t in ids)
            out.append((np.fromiter(flat, dtype=self.dtype, count=int(lengths.sum())), lengths, skipped[key]))
        return out


_worker_encoder: Optional[_Encoder] = None


def _init_worker(tokenizer_spec: dict[str, Any], *args) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(rebuild_tokenizer(tokenizer_spec), *args)


def _encode_in_worker(batch: list[tuple[int, Document]]) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder.encode(batch)


def _documents(path: str | Path, keys: Sequence[str], stats: PreprocessStats) -> Iterator[tuple[int, Document]]:
    """(1-based document number, document) of a JSONL or parquet file, streamed."""
    if Path(path).suffix != ".parquet":
        for number, line in iter_lines(path):
            stats.input_bytes += len(line)
            yield number, line
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    if not Path(path).is_file():
        raise DataError(f"{path}: input file not found")
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid and others
        raise DataError(f"{path}: not a parquet file ({err})") from None
    missing = [k for k in keys if k not in table.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.schema_arrow.names)}); "
                        "pick the text columns with --json-keys")
    number = 0
    for batch in table.iter_batches(batch_size=BATCH_DOCUMENTS, columns=list(keys)):
        columns = [batch.column(k).to_pylist() for k in keys]
        for row in zip(*columns):
            number += 1
            document = dict(zip(keys, row))
            stats.input_bytes += sum(len(v.encode()) for v in row if isinstance(v, str))
            yield number, document


def _batches(documents: Iterator[tuple[int, Document]]) -> Iterator[list[tuple[int, Document]]]:
    batch: list[tuple[int, Document]] = []
    for item in documents:
        batch.append(item)
        if len(batch) == BATCH_DOCUMENTS:
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
    tokenizer_type: str = "SentencePieceTokenizer",
    json_key: str | Sequence[str] = "text",
    workers: int = 1,
    append_eod: bool = True,
    skip_empty: bool = False,
    progress: bool = False,
    tokenizer: Optional[Tokenizer] = None,
    **tokenizer_files: Any,
) -> tuple[str | list[str], PreprocessStats]:
    """Tokenize ``input_path`` into ``{output_prefix}_{key}_document.bin/.idx`` per JSON key, each
    with its record.

    The tokenizer is ``tokenizer`` if given, else loaded from ``tokenizer_type``/``tokenizer_model``
    and ``tokenizer_files`` (vocab_file, merge_file, tiktoken_*; model None: the bundled one); worker
    processes load their own copy. ``workers`` = 1 tokenizes in this process; more starts a pool.
    ``append_eod`` defaults to on here and off on the command line (``--append-eod``, as in
    Megatron). Returns the dataset prefix (a list for several keys) and the counts. Raises
    DataError naming the file and line of any bad document; no output is left then.
    """
    if workers < 1:
        raise DataError(f"--workers: must be at least 1, got {workers}")
    keys = [json_key] if isinstance(json_key, str) else list(json_key)
    if not keys or len(set(keys)) != len(keys):
        raise DataError(f"--json-keys: {keys} must be one or more distinct keys")
    prefixes = [output_prefix_for(output_prefix, key) for key in keys]
    if tokenizer is None:  # loaded here first: a bad model fails before any pool starts
        tokenizer = load_tokenizer(tokenizer_type, tokenizer_model, **tokenizer_files)
    encoder_args = (keys, append_eod, skip_empty, str(input_path))
    local = _Encoder(tokenizer, *encoder_args)
    writers = [IndexedDatasetWriter(prefix, local.dtype) for prefix in prefixes]
    per_key = [{"documents": 0, "tokens": 0, "max_token_id": -1} for _ in keys]
    stats = PreprocessStats()
    start = last_report = time.perf_counter()

    def consume(encoded: Encoded) -> None:
        nonlocal last_report
        for writer, counts, (tokens, lengths, skipped) in zip(writers, per_key, encoded):
            writer.add_documents(tokens, lengths)
            counts["documents"] += len(lengths)
            counts["tokens"] += len(tokens)
            if len(tokens):
                counts["max_token_id"] = max(counts["max_token_id"], int(tokens.max()))
            stats.skipped_empty += skipped
        stats.documents = per_key[0]["documents"]
        stats.tokens = sum(c["tokens"] for c in per_key)
        now = time.perf_counter()
        stats.seconds = now - start
        if progress and now - last_report > 1.0:
            last_report = now
            print(f"\r{stats.line()}", end="", file=sys.stderr, flush=True)

    try:
        batches = _batches(_documents(input_path, keys, stats))
        if workers == 1:
            for batch in batches:
                consume(local.encode(batch))
        else:
            with Pool(workers, initializer=_init_worker, initargs=(tokenizer.spec, *encoder_args)) as pool:
                pending: deque = deque()
                for batch in batches:
                    pending.append(pool.apply_async(_encode_in_worker, (batch,)))
                    if len(pending) >= workers * BATCHES_IN_FLIGHT_PER_WORKER:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer, prefix, key, counts in zip(writers, prefixes, keys, per_key):
        writer.finalize()
        write_record(prefix, tokenizer, json_key=key, append_eod=append_eod, input=str(input_path), **counts)
    stats.seconds = time.perf_counter() - start
    if progress:
        print(f"\r{stats.line()}", file=sys.stderr)
    return (prefixes[0] if isinstance(json_key, str) else prefixes), stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_lite.data.preprocess",
                                     description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, help="JSONL file (optionally .gz or .xz) or .parquet")
    group.add_argument("--json-keys", nargs="+", default=None,
                       help="fields (parquet: columns) to tokenize, one output per key (default: text)")
    group.add_argument("--json-key", dest="json_keys", action="append", help=argparse.SUPPRESS)
    group.add_argument("--split-sentences", action="store_true", help="not supported (GPT data is documents)")
    group.add_argument("--keep-newlines", action="store_true", help="accepted; newlines are always kept")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=tuple(TOKENIZER_TYPES))
    group.add_argument("--tokenizer-model", default=None,
                       help="sentencepiece .model, HF tokenizer.json or directory, tiktoken file (default: bundled)")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--tiktoken-pattern", default="v2", choices=("v1", "v2"))
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    group.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=False,
                       help="end every document with the tokenizer's eod token (GPT wants it)")
    group.add_argument("--lang", default="english", help="accepted; used only to split sentences")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True)
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1)
    group.add_argument("--partitions", type=int, default=1, help="accepted; one streaming pass serves any size")
    group.add_argument("--log-interval", type=int, default=1000, help="accepted; progress prints every second")
    group.add_argument("--keep-sequential-samples", action="store_true", help="accepted; order is always kept")
    group.add_argument("--skip-empty", action="store_true",
                       help="drop documents with no tokens instead of stopping with an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        print("preprocess: --split-sentences: not supported; GPT pretraining data is whole documents, "
              "drop the flag", file=sys.stderr)
        return 2
    keys = args.json_keys or ["text"]
    try:
        prefixes, stats = preprocess(
            args.input, args.output_prefix, args.tokenizer_model, args.tokenizer_type,
            keys, args.workers, args.append_eod, args.skip_empty, progress=True,
            vocab_file=args.vocab_file, merge_file=args.merge_file, tiktoken_pattern=args.tiktoken_pattern,
            tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        )
    except DataError as err:
        print(f"preprocess: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the output prefix lies under a regular file, or a full disk
        print(f"preprocess: {err.filename or args.output_prefix}: {err.strerror or err}; cannot write there, "
              "choose another --output-prefix", file=sys.stderr)
        return 2
    skipped = f", skipped {stats.skipped_empty} empty documents" if stats.skipped_empty else ""
    print(f"wrote {', '.join(p + '.bin/.idx' for p in prefixes)} in {stats.seconds:.1f} s{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
