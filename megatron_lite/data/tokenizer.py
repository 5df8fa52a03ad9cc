"""Tokenizers behind one interface: ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``pad``.

The types are Megatron-LM's names (``--tokenizer-type`` of its ``tools/preprocess_data.py`` and
``data.tokenizer.type`` here), each with what it reads:

    SentencePieceTokenizer  a sentencepiece ``.model`` (``model``); default: the bundled one.
                            Also ``GPTSentencePieceTokenizer`` and ``sentencepiece``.
    HuggingFaceTokenizer    a ``tokenizer.json`` or a tokenizer directory (``model``); also
                            ``huggingface``. A directory without tokenizer.json needs transformers.
    GPT2BPETokenizer        GPT-2's ``vocab.json`` + ``merges.txt`` (``vocab_file``, ``merge_file``),
                            byte-level BPE through the ``tokenizers`` library.
    TikTokenizer            a tiktoken vocabulary (``model``): Megatron's JSON list of
                            {rank, token_bytes, token_str} or a ``.tiktoken`` file of
                            "base64 rank" lines; needs the ``tiktoken`` package. As in Megatron,
                            ``tiktoken_num_special_tokens`` ids come first (<unk>, <s>, </s>, fillers).

``eod`` is the token appended after every document at preprocessing time; ``pad`` is the
tokenizer's pad id, or ``eod`` when it has none (Megatron's convention). ``files`` are what the
tokenizer was read from, hashed into the record that preprocessing writes beside its data
(``data/record.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Protocol

from megatron_lite.data.errors import DataError
from megatron_lite.messages import first_line

# The sentencepiece BPE model (4096 pieces) trained on the bundled corpus; see corpus/README.md.
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "corpus" / "kjv_bpe4096.model"

# Megatron's name of each type -> ours; the lowercase names are this project's older spelling.
TOKENIZER_TYPES = {
    "SentencePieceTokenizer": "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer",
    "sentencepiece": "SentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
    "huggingface": "HuggingFaceTokenizer",
    "GPT2BPETokenizer": "GPT2BPETokenizer",
    "TikTokenizer": "TikTokenizer",
}
# Megatron's two tiktoken pre-tokenisation patterns (--tiktoken-pattern v1 | v2).
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or used; ``str(err)`` is one line naming the file."""


class Tokenizer(Protocol):
    kind: str  # the canonical type name (a key's value of TOKENIZER_TYPES)
    path: Path  # the main file, which identifies the tokenizer in cache keys
    files: list[Path]  # every file it was read from
    spec: dict[str, Any]  # load_tokenizer's arguments that rebuild it (worker processes)
    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 over the tokenizer's files, in order (its identity in data records)."""
    digest = hashlib.sha256()
    for path in tokenizer.files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece model file (BPE or unigram). ``eod`` is its ``</s>`` (eos) id, as in
    Megatron's GPTSentencePieceTokenizer."""

    kind = "SentencePieceTokenizer"

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = _existing_file(model_path, "tokenizer model")
        self.files = [self.path]
        self.spec = {"kind": self.kind, "model": str(self.path)}
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(
                f"{self.path}: not a sentencepiece model ({first_line(err)}); "
                "check data.tokenizer.model and data.tokenizer.type"
            ) from None
        self.vocab_size: int = self._sp.GetPieceSize()
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"{self.path}: the model has no </s> (eos) piece to use as end of document"
            )
        self.eod: int = self._sp.eos_id()
        self.pad: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


# Names that HuggingFace tokenizers commonly give their end-of-document token, most specific first.
_HF_EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_HF_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class _TokenizersLibrary:
    """What every tokenizer backed by a ``tokenizers.Tokenizer`` shares: ids, eod, pad."""

    def _finish(self, tok, eod_name: Optional[str] = None) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        names = ((eod_name,) if eod_name else ()) + _HF_EOD_NAMES
        eod = _first_known_id(tok, names)
        if eod is None:
            raise TokenizerError(f"{self.path}: no end-of-document token among {', '.join(names)}")
        self.eod = eod
        pad = _first_known_id(tok, _HF_PAD_NAMES)
        self.pad = eod if pad is None else pad

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` itself (HF export saves it as tokenizer.json)."""
        return self._tok

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _tokenizers_library(what: str):
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{what} needs the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


class HuggingFaceTokenizer(_TokenizersLibrary):
    """A HuggingFace tokenizer: a ``tokenizer.json`` file, or a directory holding one (its
    ``tokenizer_config.json`` names the eos token), or, through transformers, a directory with
    only the slow tokenizer's files. ``eod``: the configured eos token, else a known name."""

    kind = "HuggingFaceTokenizer"

    def __init__(self, path: str | Path):
        tokenizers = _tokenizers_library("data.tokenizer.type=HuggingFaceTokenizer")
        given = Path(path)
        self.spec = {"kind": self.kind, "model": str(given)}
        eos = None
        if given.is_dir():
            config = given / "tokenizer_config.json"
            eos = _configured_eos(config) if config.is_file() else None
            if not (given / "tokenizer.json").is_file():
                self._from_transformers(given, eos)
                return
            self.path = given / "tokenizer.json"
            self.files = [self.path]
        else:
            self.path = _existing_file(given, "tokenizer file")
            self.files = [self.path]
        try:
            tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 - the library raises its own exception type
            raise TokenizerError(
                f"{self.path}: not a HuggingFace tokenizer.json ({first_line(err)})"
            ) from None
        self._finish(tok, eos)

    def _from_transformers(self, directory: Path, eos: Optional[str]) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(
                f"{directory}: no tokenizer.json there, and reading the other tokenizer files needs "
                "transformers (pip install transformers)"
            ) from None
        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - transformers raises many types
            raise TokenizerError(f"{directory}: not a HuggingFace tokenizer directory ({first_line(err)})") from None
        if getattr(hf, "backend_tokenizer", None) is None:
            raise TokenizerError(f"{directory}: transformers has no fast tokenizer for it; save a tokenizer.json")
        self.path = directory
        self.files = sorted(p for p in directory.iterdir() if p.is_file() and "token" in p.name.lower())
        self._finish(hf.backend_tokenizer, eos or hf.eos_token)


class GPT2BPETokenizer(_TokenizersLibrary):
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt`` (Megatron's GPT2BPETokenizer:
    the same pre-tokenisation regex and byte mapping; eod is ``<|endoftext|>``)."""

    kind = "GPT2BPETokenizer"

    def __init__(self, vocab_file: Optional[str | Path], merge_file: Optional[str | Path]):
        tokenizers = _tokenizers_library("data.tokenizer.type=GPT2BPETokenizer")
        if vocab_file is None or merge_file is None:
            raise TokenizerError(
                "GPT2BPETokenizer needs data.tokenizer.vocab_file (vocab.json) and "
                "data.tokenizer.merge_file (merges.txt) (--vocab-file/--merge-file)"
            )
        self.path = _existing_file(vocab_file, "vocabulary", key="data.tokenizer.vocab_file")
        merges = _existing_file(merge_file, "merges", key="data.tokenizer.merge_file")
        self.files = [self.path, merges]
        self.spec = {"kind": self.kind, "vocab_file": str(self.path), "merge_file": str(merges)}
        try:
            model = tokenizers.models.BPE.from_file(str(self.path), str(merges))
        except Exception as err:  # noqa: BLE001 - the library raises its own exception type
            raise TokenizerError(
                f"{self.path}, {merges}: not a GPT-2 vocab.json/merges.txt pair ({first_line(err)})"
            ) from None
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        self._finish(tok, "<|endoftext|>")


class TikTokenizer:
    """Megatron's TikTokenizer: ``num_special_tokens`` special ids first (<unk> 0, <s> 1, </s> 2,
    then ``<SPECIAL_k>`` fillers), the BPE ranks after them; eod is ``</s>``."""

    kind = "TikTokenizer"

    def __init__(self, path: str | Path, pattern: str = "v2", num_special_tokens: int = 1000):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise TokenizerError(
                "data.tokenizer.type=TikTokenizer needs the `tiktoken` package: pip install tiktoken"
            ) from None
        self.path = _existing_file(path, "tiktoken vocabulary")
        self.files = [self.path]
        self.spec = {"kind": self.kind, "model": str(self.path), "tiktoken_pattern": pattern,
                     "tiktoken_num_special_tokens": num_special_tokens}
        if pattern not in TIKTOKEN_PATTERNS:
            raise TokenizerError(f"data.tokenizer.tiktoken_pattern: {pattern!r} is not one of v1, v2")
        if num_special_tokens < len(TIKTOKEN_SPECIAL_TOKENS):
            raise TokenizerError(
                f"data.tokenizer.tiktoken_num_special_tokens: {num_special_tokens} leaves no room for "
                f"{', '.join(TIKTOKEN_SPECIAL_TOKENS)}; use at least {len(TIKTOKEN_SPECIAL_TOKENS)}"
            )
        try:
            ranks = _nemo_ranks(self.path) if self.path.suffix == ".json" else load_tiktoken_bpe(str(self.path))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{self.path}: not a tiktoken vocabulary ({first_line(err)})") from None
        specials = list(TIKTOKEN_SPECIAL_TOKENS) + [
            f"<SPECIAL_{i}>" for i in range(len(TIKTOKEN_SPECIAL_TOKENS), num_special_tokens)
        ]
        self._model = tiktoken.Encoding(
            name=self.path.stem, pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={token: rank + num_special_tokens for token, rank in ranks.items()},
            special_tokens={token: i for i, token in enumerate(specials)},
        )
        self.vocab_size = num_special_tokens + len(ranks)
        self.eod = specials.index("</s>")
        self.pad = self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._model.encode_ordinary(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._model.decode([int(i) for i in ids])


def _nemo_ranks(path: Path) -> dict[bytes, int]:
    """Megatron/NeMo's tiktoken JSON: a list of {"rank", "token_bytes" (base64), "token_str"}."""
    import base64

    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError("expected a JSON list of {rank, token_bytes, token_str}")
    return {base64.b64decode(e["token_bytes"]): int(e["rank"]) for e in entries}


def _configured_eos(config: Path) -> Optional[str]:
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _existing_file(path: str | Path, what: str, key: str = "data.tokenizer.model") -> Path:
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path}: a directory, not a {what} file; check {key}")
    if not path.is_file():
        raise TokenizerError(f"{path}: {what} not found; check {key}")
    return path


def _first_known_id(tok, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None




def canonical_type(kind: str) -> str:
    """Megatron's name for ``kind`` (any accepted spelling); TokenizerError for an unknown one."""
    if kind not in TOKENIZER_TYPES:
        names = ", ".join(dict.fromkeys(TOKENIZER_TYPES.values()))
        raise TokenizerError(f"data.tokenizer.type: {kind!r} is not one of {names}")
    return TOKENIZER_TYPES[kind]


def load_tokenizer(
    kind: str, model: Optional[str | Path] = None, vocab_file: Optional[str | Path] = None,
    merge_file: Optional[str | Path] = None, tiktoken_pattern: str = "v2",
    tiktoken_num_special_tokens: int = 1000,
) -> Tokenizer:
    """The tokenizer of type ``kind`` (see the module docstring) from its files; ``model`` None
    with a sentencepiece type: the bundled tokenizer."""
    kind = canonical_type(kind)
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(BUNDLED_TOKENIZER if model is None else model)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if model is None:
        what = "a tokenizer.json or a tokenizer directory" if kind == "HuggingFaceTokenizer" else "a tiktoken file"
        raise TokenizerError(f"data.tokenizer.model: {kind} needs the path of {what}")
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(model)
    return TikTokenizer(model, tiktoken_pattern, tiktoken_num_special_tokens)


def build_tokenizer(tokenizer_cfg) -> Tokenizer:
    """The tokenizer a ``config.TokenizerConfig`` names."""
    c = tokenizer_cfg
    return load_tokenizer(c.type, c.model, c.vocab_file, c.merge_file, c.tiktoken_pattern, c.tiktoken_num_special_tokens)


def rebuild_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    """A tokenizer from another's ``spec`` (how preprocessing workers get their own copy)."""
    spec = dict(spec)
    return load_tokenizer(spec.pop("kind"), **spec)
