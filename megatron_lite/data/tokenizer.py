"""Tokenizers behind one interface: ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``pad``.

Two kinds: a sentencepiece model (the default, LLaMA-family and our bundled one) and a HuggingFace
``tokenizers`` JSON file. ``eod`` is the token appended after every document at preprocessing time;
``pad`` is the tokenizer's pad id, or ``eod`` when the model has none (Megatron's convention).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

from megatron_lite.data.errors import DataError
from megatron_lite.messages import first_line

# The sentencepiece BPE model (4096 pieces) trained on the bundled corpus; see corpus/README.md.
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "corpus" / "kjv_bpe4096.model"


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or used; ``str(err)`` is one line naming the file."""


class Tokenizer(Protocol):
    path: Path  # the model file, which identifies the tokenizer in cache keys
    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model file (BPE or unigram). ``eod`` is its ``</s>`` (eos) id."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = _existing_file(model_path, "tokenizer model")
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


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` from the HuggingFace ``tokenizers`` library (GPT-2, LLaMA-3, ...)."""

    def __init__(self, json_path: str | Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(
                "data.tokenizer.type=huggingface needs the `tokenizers` package: "
                "pip install tokenizers"
            ) from None
        self.path = _existing_file(json_path, "tokenizer file")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 - the library raises its own exception type
            raise TokenizerError(
                f"{self.path}: not a HuggingFace tokenizer.json ({first_line(err)})"
            ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = _first_known_id(self._tok, _HF_EOD_NAMES)
        if eod is None:
            raise TokenizerError(
                f"{self.path}: no end-of-document token among {', '.join(_HF_EOD_NAMES)}"
            )
        self.eod = eod
        pad = _first_known_id(self._tok, _HF_PAD_NAMES)
        self.pad = eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"{path}: a directory, not a {what} file; check data.tokenizer.model")
    if not path.is_file():
        raise TokenizerError(f"{path}: {what} not found; check data.tokenizer.model")
    return path


def _first_known_id(tok, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None




def load_tokenizer(
    kind: str, model: Optional[str | Path]
) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """``kind`` is ``sentencepiece`` or ``huggingface``; ``model`` None: the bundled tokenizer."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer(BUNDLED_TOKENIZER if model is None else model)
    if kind == "huggingface":
        if model is None:
            raise TokenizerError(
                "data.tokenizer.model: a huggingface tokenizer needs the path of its tokenizer.json"
            )
        return HuggingFaceTokenizer(model)
    raise TokenizerError(f"data.tokenizer.type: {kind!r} is not one of sentencepiece, huggingface")


def build_tokenizer(tokenizer_cfg) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """The tokenizer a ``config.TokenizerConfig`` names (``type``, ``model``; None: bundled)."""
    return load_tokenizer(tokenizer_cfg.type, tokenizer_cfg.model)
