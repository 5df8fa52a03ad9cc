"""What made a ``.bin/.idx`` pair, and the start-up check of data against the model's tokenizer.

``preprocess`` writes ``PREFIX.record.json`` beside ``PREFIX.bin``/``.idx``::

    {"format": "megatron_lite data record", "version": 1,
     "tokenizer": {"type": "SentencePieceTokenizer", "files": ["/tok/tok.model"], "sha256": "…",
                   "vocab_size": 32000, "eod": 2},
     "json_key": "text", "append_eod": true, "input": "corpus.jsonl", "documents": 1189,
     "tokens": 1070000, "max_token_id": 31999, "bin_bytes": …, "idx_bytes": …}

The trainer calls ``check_data`` on every rank before any process group exists: a record whose
tokenizer differs from ``data.tokenizer`` (another file hash, vocabulary size or eod id), or data
whose largest token id does not fit the model's vocabulary, is one ``DataError`` line naming the
files, both vocabularies and the fix. Data without a record (written by Megatron-LM's tools) is
scanned once for its largest token id; the result is cached beside the index
(``PREFIX.scan.json``, or under the data cache when that directory is read-only), keyed by the
files' sizes and modification times, and concurrent ranks wait on a file lock for one scan.
A record whose sizes no longer match its files is stale and ignored (the data is scanned).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_lite.data.errors import DataError
from megatron_lite.data.indexed_dataset import IndexedDataset, data_paths
from megatron_lite.data.tokenizer import Tokenizer, tokenizer_sha256

RECORD_FORMAT = "megatron_lite data record"
RECORD_VERSION = 1
SCAN_CHUNK_TOKENS = 1 << 26  # tokens per np.max call while scanning a .bin (128 MiB of uint16)


def record_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.record.json")


def describe_tokenizer(tokenizer: Tokenizer) -> dict[str, Any]:
    """The record's ``tokenizer`` entry for ``tokenizer``."""
    return {"type": tokenizer.kind, "files": [str(p.resolve()) for p in tokenizer.files],
            "sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def _file_sizes(prefix: str | Path) -> dict[str, int]:
    bin_path, idx_path = data_paths(prefix)
    return {"bin_bytes": bin_path.stat().st_size, "idx_bytes": idx_path.stat().st_size}


def write_record(prefix: str | Path, tokenizer: Tokenizer, **facts: Any) -> Path:
    """Write ``PREFIX.record.json`` (atomically) for a pair just written with ``tokenizer``;
    ``facts``: json_key, append_eod, input, documents, tokens, max_token_id."""
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "tokenizer": describe_tokenizer(tokenizer),
              **facts, **_file_sizes(prefix)}
    path = record_path(prefix)
    _write_json(path, record)
    return path


def read_record(prefix: str | Path) -> Optional[dict[str, Any]]:
    """The record of ``prefix``, or None when there is none or it no longer matches the files."""
    path = record_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable data record ({err}); delete it or preprocess again") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise DataError(f"{path}: not a megatron_lite data record; delete it or preprocess again")
    if {k: record.get(k) for k in ("bin_bytes", "idx_bytes")} != _file_sizes(prefix):
        return None
    return record


def max_token_id(prefix: str | Path, cache_dir: Path) -> int:
    """The largest token id in ``PREFIX.bin``: from its record, else from a cached scan, else
    scanned now (once per node, under a file lock) and cached. -1 for an empty dataset."""
    record = read_record(prefix)
    if record is not None and "max_token_id" in record:
        return int(record["max_token_id"])
    bin_path, idx_path = data_paths(prefix)
    key = {"bin_bytes": bin_path.stat().st_size, "idx_bytes": idx_path.stat().st_size,
           "bin_mtime_ns": bin_path.stat().st_mtime_ns, "idx_mtime_ns": idx_path.stat().st_mtime_ns}
    cache = _scan_path(prefix, cache_dir)
    with _locked(cache.with_name(cache.name + ".lock")):
        cached = _read_json(cache)
        if cached is not None and cached.get("key") == key:
            return int(cached["max_token_id"])
        tokens = IndexedDataset(prefix).all_tokens()
        largest = -1
        for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
            largest = max(largest, int(tokens[start: start + SCAN_CHUNK_TOKENS].max()))
        try:
            _write_json(cache, {"key": key, "max_token_id": largest, "prefix": str(prefix)})
        except OSError:  # the cache is an optimisation: a full or read-only disk only costs a rescan
            pass
    return largest


def _scan_path(prefix: str | Path, cache_dir: Path) -> Path:
    beside = Path(f"{prefix}.scan.json")
    if os.access(beside.parent, os.W_OK):
        return beside
    cache_dir.mkdir(parents=True, exist_ok=True)
    flat = str(Path(prefix).resolve()).strip("/").replace("/", "_")
    return cache_dir / f"{flat}.scan.json"


class _locked:
    """An exclusive ``fcntl.flock`` on ``path``: released by the kernel if the holder dies."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        try:
            self._fd: Optional[int] = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system (or no room): each rank scans for itself
            self._fd = None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _tokenizer_words(entry: dict[str, Any]) -> str:
    files = ", ".join(entry["files"])
    return f"{entry['type']} {files} ({entry['vocab_size']} ids, eod {entry['eod']})"


def check_data(prefixes: list[str], tokenizer: Tokenizer, model_vocab_size: int, cache_dir: Path) -> None:
    """Raise DataError (one line) if any dataset was made by another tokenizer than ``tokenizer``
    or holds a token id ≥ ``model_vocab_size`` (the model's vocabulary before padding)."""
    ours = describe_tokenizer(tokenizer)
    for prefix in prefixes:
        IndexedDataset(prefix)  # a missing or broken pair is named by the index check first
        record = read_record(prefix)
        made_by = record.get("tokenizer") if record else None
        if made_by is not None:
            same = all(made_by.get(k) == ours[k] for k in ("sha256", "vocab_size", "eod"))
            if not same:
                raise DataError(
                    f"{prefix}.bin/.idx were tokenized with {_tokenizer_words(made_by)} but data.tokenizer is "
                    f"{_tokenizer_words(ours)}; set data.tokenizer.type/model to the tokenizer that made the data, "
                    f"or preprocess it again with this one (delete {record_path(prefix)} only if the ids are known to match)"
                )
        largest = max_token_id(prefix, cache_dir)
        if largest >= model_vocab_size:
            source = "the record" if made_by is not None else "a scan of the .bin"
            raise DataError(
                f"{prefix}.bin holds token ids up to {largest} ({source}) but the model's vocabulary has "
                f"{model_vocab_size} ids (data.tokenizer: {_tokenizer_words(ours)}); train with the tokenizer "
                f"that made the data, or set model.vocab_size to at least {largest + 1}"
            )
