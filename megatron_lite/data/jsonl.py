"""Reading JSON-lines corpora, plain or compressed (``.gz``, ``.xz``), one document per line."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path
from typing import BinaryIO, Iterator

from megatron_lite.data.errors import DataError


def open_bytes(path: str | Path) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing by suffix (``.gz``, ``.xz``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.suffix == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line of ``path``, streamed."""
    with open_bytes(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise DataError(f"{path}: unreadable or truncated input ({err})") from None


def document_text(line: str | bytes, key: str, where: str) -> str:
    """The string under ``key`` in one JSON line; ``where`` (``file:line``) names it in errors."""
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(
            f"{where}: not a valid UTF-8 JSON line ({err}); one JSON object per line expected"
        ) from None
    if not isinstance(record, dict) or key not in record:
        raise DataError(
            f"{where}: no key {key!r} in this JSON line; pick the text field with --json-key"
        )
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"{where}: key {key!r} holds a {type(text).__name__}, not a string")
    return text


def iter_documents(path: str | Path, key: str) -> Iterator[str]:
    """The text of every document of a JSONL file, in order."""
    for number, line in iter_lines(path):
        yield document_text(line, key, f"{path}:{number}")
