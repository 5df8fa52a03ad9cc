"""The bundled corpus: the King James Bible (public domain), one document per chapter.

``megatron_lite/data/corpus/kjv.jsonl.xz`` (1,189 chapters, 4.1 MB of text, ~1.07 M tokens with
the bundled tokenizer) is tokenized on first use into the data cache, once per tokenizer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from megatron_lite.data.indexed_dataset import data_paths
from megatron_lite.data.tokenizer import Tokenizer

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus" / "kjv.jsonl.xz"


def bundled_corpus_prefix(tokenizer: Tokenizer, cache_dir: Path) -> str:
    """The .bin/.idx prefix of the bundled corpus in ``tokenizer``'s ids (made if missing)."""
    digest = hashlib.sha256(BUNDLED_CORPUS.read_bytes())
    digest.update(Path(tokenizer.path).read_bytes())
    output = cache_dir / f"kjv-{digest.hexdigest()[:16]}"
    prefix = f"{output}_text_document"
    if not all(path.is_file() for path in data_paths(prefix)):
        # Imported here: `python -m megatron_lite.data.preprocess` must not import itself twice.
        from megatron_lite.data.preprocess import preprocess

        preprocess(BUNDLED_CORPUS, output, tokenizer=tokenizer, json_key="text", append_eod=True)
    return prefix
