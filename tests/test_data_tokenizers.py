"""Megatron-LM's data CLI and tokenizer types, the data records preprocessing writes, and the
start-up check of data against the model's tokenizer.

The tokenizers are made here from the bundled corpus (no downloads): a GPT-2-style byte-level BPE
(vocab.json + merges.txt) checked against an independent implementation (tiktoken's BPE with the
same ranks and GPT-2's pattern), a HuggingFace tokenizer directory, Megatron's tiktoken formats.
"""

import base64
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import DataError, IndexedDataset, IndexedDatasetWriter, load_tokenizer
from megatron_lite.data.builder import build_datasets
from megatron_lite.data.record import check_data, max_token_id, read_record, record_path
from megatron_lite.data.tokenizer import BUNDLED_TOKENIZER

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "megatron_lite/data/corpus/kjv.jsonl.xz"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = ["In the beginning God created the heaven and the earth.", "  spaces\tand\nnewlines  ",
         "Unicode: naïve café — 日本語 ✓", "numbers 12345 and punctuation!?;", "'s 've 'll don't"]


def _chapters(n: int) -> list[str]:
    with lzma.open(CORPUS, "rt") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (vocab.json spells tokens with it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """vocab.json + merges.txt of a 600-token byte-level BPE trained on the corpus's first chapters."""
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("gpt2")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(_chapters(60), vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(d))
    return d / "vocab.json", d / "merges.txt"


def test_gpt2_bpe_matches_an_independent_bpe(gpt2_files):
    """GPT2BPETokenizer (vocab.json + merges.txt through the tokenizers library) gives the ids of
    tiktoken's BPE with the same ranks and GPT-2's pre-tokenisation regex; eod is <|endoftext|>."""
    tiktoken = pytest.importorskip("tiktoken")
    vocab_file, merge_file = gpt2_files
    tok = load_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    vocab = json.loads(vocab_file.read_text())
    assert tok.vocab_size == len(vocab) and tok.eod == vocab["<|endoftext|>"]
    back = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes(back[c] for c in token): i for token, i in vocab.items() if token != "<|endoftext|>"}
    reference = tiktoken.Encoding("gpt2-like", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS + _chapters(3):
        assert tok.tokenize(text) == reference.encode_ordinary(text), text[:40]
        assert tok.detokenize(tok.tokenize(text)) == text


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_megatron_preprocess_command_line(gpt2_files, tmp_path):
    """Megatron's tools/preprocess_data.py flags, as a user copies them: two --json-keys give two
    datasets (documents in input order, eod appended), each with its record."""
    vocab_file, merge_file = gpt2_files
    docs = [{"text": t, "title": f"chapter {i}"} for i, t in enumerate(TEXTS * 3)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    done = _run("-m", "megatron_lite.data.preprocess", "--input", "in.jsonl", "--output-prefix", "out/corpus",
                "--json-keys", "text", "title", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab_file),
                "--merge-file", str(merge_file), "--append-eod", "--workers", "2", "--partitions", "1",
                "--log-interval", "100", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    print(done.stdout.strip())
    tok = load_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    for key in ("text", "title"):
        prefix = tmp_path / f"out/corpus_{key}_document"
        ds = IndexedDataset(prefix)
        assert [list(ds[i]) for i in range(len(ds))] == [tok.tokenize(d[key]) + [tok.eod] for d in docs]
        record = read_record(prefix)
        assert record["json_key"] == key and record["tokenizer"]["type"] == "GPT2BPETokenizer"
        assert record["tokenizer"]["vocab_size"] == tok.vocab_size and record["tokenizer"]["eod"] == tok.eod
        assert record["max_token_id"] == int(np.max(ds.all_tokens())) and record["documents"] == len(docs)


def test_huggingface_directory_and_its_eos(gpt2_files, tmp_path):
    """--tokenizer-model takes a HF tokenizer directory (its tokenizer_config.json names the eos)
    or the tokenizer.json in it, with the same ids; a directory with only the slow tokenizer's files
    goes through transformers."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab_file, merge_file = gpt2_files
    fast = tokenizers.ByteLevelBPETokenizer(str(vocab_file), str(merge_file))
    fast.add_special_tokens(["<|endoftext|>", "<|eot|>"])
    directory = tmp_path / "hf"
    directory.mkdir()
    fast.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    from_dir = load_tokenizer("HuggingFaceTokenizer", directory)
    from_file = load_tokenizer("huggingface", directory / "tokenizer.json")
    assert from_dir.eod == fast.token_to_id("<|eot|>") and from_file.eod == fast.token_to_id("<|endoftext|>")
    assert all(from_dir.tokenize(t) == from_file.tokenize(t) for t in TEXTS)
    transformers = pytest.importorskip("transformers")
    slow_dir = tmp_path / "slow"
    slow_dir.mkdir()
    for f in (vocab_file, merge_file):
        (slow_dir / f.name).write_bytes(f.read_bytes())
    (slow_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "add_prefix_space": False}))
    (slow_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    via = load_tokenizer("HuggingFaceTokenizer", slow_dir)
    gpt2 = load_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert via.eod == gpt2.eod and all(via.tokenize(t) == gpt2.tokenize(t) for t in TEXTS), transformers.__version__


def _tiktoken_files(gpt2_files, d: Path) -> tuple[Path, Path]:
    """The BPE's ranks as a .tiktoken file and as Megatron/NeMo's JSON list."""
    vocab = json.loads(gpt2_files[0].read_text())
    back = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = sorted((i, bytes(back[c] for c in t)) for t, i in vocab.items() if t != "<|endoftext|>")
    plain = d / "bpe.tiktoken"
    plain.write_text("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in ranks))
    nemo = d / "bpe.json"
    nemo.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": ""}
                                for i, b in ranks]))
    return plain, nemo


def test_tiktokenizer_as_megatron_numbers_it(gpt2_files, tmp_path):
    """TikTokenizer: Megatron's layout (1000 special ids first, </s> = 2 the eod, BPE ranks after),
    from either file format, through the preprocess command line too."""
    pytest.importorskip("tiktoken")
    plain, nemo = _tiktoken_files(gpt2_files, tmp_path)
    a = load_tokenizer("TikTokenizer", plain, tiktoken_pattern="v2")
    b = load_tokenizer("TikTokenizer", nemo, tiktoken_pattern="v2")
    assert a.eod == 2 and a.vocab_size == 1000 + len(json.loads(nemo.read_text()))
    for text in TEXTS:
        ids = a.tokenize(text)
        assert ids == b.tokenize(text) and min(ids) >= 1000 and a.detokenize(ids) == text
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    done = _run("-m", "megatron_lite.data.preprocess", "--input", "in.jsonl", "--output-prefix", "tt",
                "--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(nemo), "--tiktoken-pattern", "v2",
                "--tiktoken-num-special-tokens", "1000", "--append-eod", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ds = IndexedDataset(tmp_path / "tt_text_document")
    assert list(ds[0]) == a.tokenize(TEXTS[0]) + [2]


def test_parquet_input_equals_jsonl(tmp_path):
    """Parquet columns (pyarrow) give the very datasets the same documents give as JSONL."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from megatron_lite.data.preprocess import preprocess

    chapters = _chapters(20)
    pq.write_table(pa.table({"text": chapters, "id": list(range(20))}), tmp_path / "in.parquet", row_group_size=7)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chapters))
    a, _ = preprocess(tmp_path / "in.parquet", tmp_path / "pq", workers=2)
    b, _ = preprocess(tmp_path / "in.jsonl", tmp_path / "js", workers=1)
    assert Path(f"{a}.bin").read_bytes() == Path(f"{b}.bin").read_bytes()
    assert Path(f"{a}.idx").read_bytes() == Path(f"{b}.idx").read_bytes()
    with pytest.raises(DataError, match="no column 'body'"):
        preprocess(tmp_path / "in.parquet", tmp_path / "x", json_key="body")


def _foreign(prefix: Path, top: int) -> None:
    """A dataset without a record (as Megatron-LM's tools write it), token ids up to ``top``."""
    writer = IndexedDatasetWriter(prefix, np.int32)
    rng = np.random.default_rng(0)
    for _ in range(30):
        writer.add_document(rng.integers(0, top, size=50))
    writer.add_document([top])
    writer.finalize()


def test_data_checked_against_the_tokenizer(gpt2_files, tmp_path):
    """A record from another tokenizer, and foreign data with ids beyond the model's vocabulary,
    each stop with one line naming the files and both vocabularies; a foreign dataset's scan is
    cached beside its index and redone when the files change."""
    from megatron_lite.data.preprocess import preprocess

    bundled = load_tokenizer("SentencePieceTokenizer")
    gpt2 = load_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _chapters(5)))
    ours, _ = preprocess(tmp_path / "in.jsonl", tmp_path / "ours")
    check_data([ours], bundled, bundled.vocab_size, tmp_path / "cache")  # made by it: passes
    with pytest.raises(DataError) as err:
        check_data([ours], gpt2, gpt2.vocab_size, tmp_path / "cache")
    line = str(err.value)
    print(line)
    assert "\n" not in line and str(BUNDLED_TOKENIZER) in line and str(gpt2_files[0]) in line
    assert "(4096 ids, eod 2)" in line and f"({gpt2.vocab_size} ids" in line

    foreign = tmp_path / "megatron_text_document"
    _foreign(foreign, 5000)
    with pytest.raises(DataError) as err:
        check_data([str(foreign)], bundled, bundled.vocab_size, tmp_path / "cache")
    line = str(err.value)
    print(line)
    assert "token ids up to 5000 (a scan of the .bin)" in line and "vocabulary has 4096 ids" in line
    assert "model.vocab_size to at least 5001" in line
    cache = Path(f"{foreign}.scan.json")
    assert json.loads(cache.read_text())["max_token_id"] == 5000
    check_data([str(foreign)], bundled, 5001, tmp_path / "cache")  # the cached scan, and it fits
    _foreign(foreign, 6000)  # rewritten: new sizes and times, the cache no longer applies
    assert max_token_id(foreign, tmp_path / "cache") == 6000
    assert record_path(foreign).exists() is False


def test_per_split_paths(tmp_path):
    """data.train_paths / valid_paths / test_paths: each split reads all documents of its own
    prefixes (Megatron's --train/valid/test-data-path); a split not given is not built."""
    from megatron_lite.config import DataConfig

    prefixes = {}
    for name, low in (("a", 10), ("b", 1000), ("c", 3000)):
        writer = IndexedDatasetWriter(tmp_path / name, np.uint16)
        rng = np.random.default_rng(low)
        for _ in range(20):
            writer.add_document(rng.integers(low, low + 100, size=40))
        writer.finalize()
        prefixes[name] = str(tmp_path / name)
    tok = load_tokenizer("SentencePieceTokenizer")
    cfg = DataConfig(train_paths=[prefixes["a"]], valid_paths=[0.5, prefixes["b"], 0.5, prefixes["c"]],
                     cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(cfg, tok, 16, 1, (40, 40, 8))
    assert test is None
    train_ids = np.concatenate([train[i]["tokens"].numpy() for i in range(40)])
    valid_ids = np.concatenate([valid[i]["tokens"].numpy() for i in range(40)])
    assert train_ids.min() >= 10 and train_ids.max() < 110
    assert valid_ids.min() >= 1000 and (valid_ids >= 3000).any() and (valid_ids < 1100).any()
    with pytest.raises(DataError, match="data.paths: set together with"):
        build_datasets(DataConfig(paths=[prefixes["a"]], train_paths=[prefixes["a"]]), tok, 16, 1, (1, 0, 0))
    with pytest.raises(DataError, match="data.train_paths: needed"):
        build_datasets(DataConfig(valid_paths=[prefixes["a"]]), tok, 16, 1, (1, 1, 0))
