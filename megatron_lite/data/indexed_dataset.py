"""Megatron's ``MMIDIDX`` indexed dataset: tokens in ``PREFIX.bin``, their index in ``PREFIX.idx``.

The ``.bin`` file is every sequence's tokens back to back, nothing else. The ``.idx`` file, all
little-endian, is:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     token type in .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                               6 float64, 7 float32, 8 uint16
    sequence count   uint64    S
    document count   uint64    D (= documents + 1)
    lengths          int32[S]  tokens per sequence
    pointers         int64[S]  byte offset of each sequence in .bin
    document index   int64[D]  sequence index where each document starts, then S

Files written by Megatron-LM's ``tools/preprocess_data.py`` load here and ours load there. With one
sequence per document (GPT preprocessing), sequences and documents coincide.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megatron_lite.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice: uint16 when every id fits with room to spare, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(``PREFIX.bin``, ``PREFIX.idx``)."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``.idx`` through numpy memmaps (no copy, no load).

    ``ds[i]`` is sequence i as a 1-D array of the file's token dtype; ``ds.get(i, offset, length)``
    a slice of it. ``sequence_lengths`` (int32[S]) and ``document_indices`` (int64[D]) are views of
    the index. Every size in the index is checked against the files on open: a truncated or foreign
    file raises DataError naming it, it is never read silently.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        bin_path, idx_path = data_paths(prefix)
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise DataError(
                    f"{path}: not found; data.paths lists .bin/.idx prefixes (without the suffix)"
                )
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as handle:
            header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size or not header.startswith(MAGIC):
            raise DataError(
                f"{idx_path}: not a Megatron MMIDIDX index (bad magic or truncated header)"
            )
        _, version, code, num_sequences, num_documents = _HEADER.unpack(header)
        if version != VERSION:
            raise DataError(
                f"{idx_path}: index version {version}, only version {VERSION} is supported"
            )
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        needed = _HEADER.size + num_sequences * (4 + 8) + num_documents * 8
        if idx_size < needed:
            raise DataError(
                f"{idx_path}: truncated: {idx_size} bytes, the header announces {needed}; "
                "rebuild it"
            )
        index = np.memmap(idx_path, mode="r", dtype=np.uint8, shape=(needed,))
        offset = _HEADER.size
        self.sequence_lengths = index[offset: offset + 4 * num_sequences].view(np.int32)
        offset += 4 * num_sequences
        self.sequence_pointers = index[offset: offset + 8 * num_sequences].view(np.int64)
        offset += 8 * num_sequences
        self.document_indices = index[offset: offset + 8 * num_documents].view(np.int64)

        bin_size = bin_path.stat().st_size
        if num_sequences:
            last_length = int(self.sequence_lengths[-1])
            end = int(self.sequence_pointers[-1]) + last_length * self.dtype.itemsize
            if bin_size < end:
                raise DataError(
                    f"{bin_path}: shorter than its index says ({bin_size} < {end} bytes); "
                    "the file is truncated, rebuild it"
                )
        # An empty .bin cannot be memory-mapped; a zero-token dataset reads as an empty array.
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def all_tokens(self) -> np.ndarray:
        """Every token of ``PREFIX.bin`` as one memory-mapped 1-D array (nothing is read yet)."""
        return self._bin

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end if length is None)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        return self._bin[start: start + length]


class IndexedDatasetWriter:
    """Write ``PREFIX.bin`` as documents arrive and ``PREFIX.idx`` at ``finalize``.

    Tokens go straight to disk; only the per-document lengths (4 bytes each) stay in memory. Files
    are written under temporary names and renamed at ``finalize``, so a crash never leaves a pair
    that looks complete.
    """

    def __init__(self, prefix: str | Path, dtype: type):
        self.bin_path, self.idx_path = data_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"{self.dtype} is not an MMIDIDX token dtype")
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + f".tmp{os.getpid()}")
        self._bin: BinaryIO = open(self._tmp_bin, "wb")
        self._lengths = array("i")

    def add_document(self, tokens) -> None:
        """Append one document (a sequence of token ids)."""
        data = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(data, np.array([len(data)], dtype=np.int32))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given back to back in ``tokens``, ``lengths[i]`` tokens each."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        if int(np.sum(lengths, dtype=np.int64)) != len(data):
            raise ValueError(
                f"lengths add up to {int(np.sum(lengths))}, not the {len(data)} tokens given"
            )
        self._bin.write(data.tobytes())
        self._lengths.extend(np.asarray(lengths, dtype=np.int32).tolist())

    def abort(self) -> None:
        """Drop what was written: no output files appear."""
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        tmp_idx = self.idx_path.with_name(self.idx_path.name + f".tmp{os.getpid()}")
        with open(tmp_idx, "wb") as out:
            code = _CODE_OF[self.dtype]
            out.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(document_indices)))
            out.write(lengths.tobytes(order="C"))
            out.write(pointers.tobytes(order="C"))
            out.write(document_indices.tobytes(order="C"))
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, self.idx_path)
