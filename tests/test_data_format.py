"""Tokenizers, JSONL → .bin/.idx preprocessing, the MMIDIDX format, and errors for bad input."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import DataError, IndexedDataset, IndexedDatasetWriter, load_tokenizer
from megatron_lite.data.corpus import BUNDLED_CORPUS
from megatron_lite.data.jsonl import iter_documents
from megatron_lite.data.preprocess import main as preprocess_main
from megatron_lite.data.preprocess import preprocess
from megatron_lite.data.train_tokenizer import main as train_tokenizer_main

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void;\nand darkness was upon the face of the deep.",
    "Unicode and bytes: naïve café — 数据 😀 tab\there.",
    "x",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("sentencepiece", None)


def test_bundled_tokenizer_round_trips_any_text(tok):
    assert tok.vocab_size == 4096 and tok.eod == 2 and tok.pad == 3
    for text in TEXTS:
        assert tok.detokenize(tok.tokenize(text)) == text
    first = next(iter_documents(BUNDLED_CORPUS, "text"))
    assert first.startswith("In the beginning God created the heaven and the earth.")
    assert len(tok.tokenize(first)) < len(first) / 3  # a trained BPE, not bytes


def test_preprocess_round_trip_with_one_and_two_workers(tmp_path, tok):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS * 150)]
    source = write_jsonl(tmp_path / "docs.jsonl.gz", records)
    prefixes = []
    for workers in (1, 2):
        prefix, stats = preprocess(source, tmp_path / f"w{workers}", workers=workers)
        assert stats.documents == len(TEXTS) * 150
        prefixes.append(prefix)
    ds = IndexedDataset(prefixes[0])
    assert ds.dtype == np.uint16 and len(ds) == len(TEXTS) * 150
    for i in range(len(ds)):
        assert ds[i].tolist() == tok.tokenize(TEXTS[i % len(TEXTS)]) + [tok.eod]
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(ds) + 1))
    for suffix in (".bin", ".idx"):  # the worker pool changes nothing, byte for byte
        assert Path(prefixes[0] + suffix).read_bytes() == Path(prefixes[1] + suffix).read_bytes()


def test_reads_a_file_written_from_the_format_description(tmp_path):
    """An independent MMIDIDX writer (int32 tokens, documents of several sequences, as Megatron's
    --split-sentences writes them) following the documented layout byte by byte."""
    sequences = [[5, 6, 7], [70000, 1], [9], [], [1, 2, 3, 4]]
    documents = [0, 2, 3, 5]
    with open(tmp_path / "ext.bin", "wb") as out:
        for seq in sequences:
            out.write(struct.pack(f"<{len(seq)}i", *seq))
    lengths = [len(s) for s in sequences]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 4
    with open(tmp_path / "ext.idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
        out.write(struct.pack("<QQ", len(sequences), len(documents)))
        out.write(struct.pack(f"<{len(lengths)}i", *lengths))
        out.write(struct.pack(f"<{len(pointers)}q", *pointers.tolist()))
        out.write(struct.pack(f"<{len(documents)}q", *documents))
    ds = IndexedDataset(tmp_path / "ext")
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    assert ds.document_indices.tolist() == documents
    assert ds.get(4, 1, 2).tolist() == [2, 3]
    # And our writer produces exactly these bytes for the same sequences (one per document).
    writer = IndexedDatasetWriter(tmp_path / "ours", np.int32)
    for seq in sequences:
        writer.add_document(seq)
    writer.finalize()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ext.bin").read_bytes()
    ours_idx = (tmp_path / "ours.idx").read_bytes()
    ext_idx = (tmp_path / "ext.idx").read_bytes()
    header_and_arrays = 9 + 8 + 1 + 16 + 12 * len(sequences)
    assert ours_idx[:26] == ext_idx[:26]  # magic, version, dtype, sequence count
    assert ours_idx[34:header_and_arrays] == ext_idx[34:header_and_arrays]  # lengths and pointers


def test_production_32k_sentencepiece_tokenizer(tmp_path):
    """LLaMA-family 32k sentencepiece model (mistral_common's tokenizer.model.v1, Apache-2.0)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--timeout", "15", "--retries", "1", "mistral_common", "-d", str(tmp_path)]
    try:
        download = subprocess.run(command, capture_output=True, text=True, timeout=90)
        reason = download.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        reason = "pip took over 90 s"
    wheels = list(tmp_path.glob("mistral_common-*.whl"))
    if not wheels:
        pytest.skip(f"could not pip download mistral_common (no network?): {reason}")
    member = "mistral_common/data/tokenizer.model.v1"
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            pytest.skip(f"{wheels[0].name} no longer ships {member}")
        model = tmp_path / "tokenizer.model.v1"
        model.write_bytes(wheel.read(member))
    tok = load_tokenizer("sentencepiece", model)
    assert tok.vocab_size == 32000 and tok.eod == 2 and tok.pad == tok.eod  # no pad piece: eod
    rare = "Zürich → 東京 🦙"
    ids = tok.tokenize(rare)
    assert any(tok._sp.IdToPiece(i).startswith("<0x") for i in ids)  # byte fallback used
    assert tok.detokenize(ids) == rare
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS + [rare]])
    prefix, _ = preprocess(source, tmp_path / "llama", tokenizer_model=model, append_eod=False)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16  # 32000 ids fit in uint16
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) for t in TEXTS + [rare]]
    assert max(int(ds[i].max()) for i in range(len(ds))) > 29000  # high ids survive uint16


def test_train_tokenizer_cli(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS * 20])
    args = ["--input", str(source), "--vocab-size", "300", "--output", str(tmp_path / "tok")]
    assert train_tokenizer_main(args) == 0
    tok = load_tokenizer("sentencepiece", tmp_path / "tok.model")
    assert tok.vocab_size == 300
    assert all(tok.detokenize(tok.tokenize(t)) == t for t in TEXTS)
    # A failed run (a malformed line after many good ones) writes nothing: the earlier files stay.
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in TEXTS * 20) + "{not json\n")
    args[1] = str(bad)
    assert train_tokenizer_main(args) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p != bad} == before


def _write_valid(tmp_path: Path) -> str:
    writer = IndexedDatasetWriter(tmp_path / "good", np.uint16)
    for doc in ([1, 2, 3], [4, 5], [6]):
        writer.add_document(doc)
    writer.finalize()
    return str(tmp_path / "good")


def test_corrupt_index_and_data_files_are_rejected(tmp_path):
    good = _write_valid(tmp_path)
    idx = Path(good + ".idx").read_bytes()
    binary = Path(good + ".bin").read_bytes()
    cases = {
        "magic": (b"NOTANIDX!" + idx[9:], binary, "bad magic"),
        "version": (idx[:9] + struct.pack("<Q", 2) + idx[17:], binary, "version 2"),
        "dtype": (idx[:17] + bytes([42]) + idx[18:], binary, "dtype code 42"),
        "short_idx": (idx[:-5], binary, "truncated"),
        "short_header": (idx[:20], binary, "truncated header"),
        "short_bin": (idx, binary[:-2], "shorter than its index"),
    }
    for name, (idx_bytes, bin_bytes, message) in cases.items():
        Path(tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        Path(tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        with pytest.raises(DataError, match=message) as err:
            IndexedDataset(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="missing.idx: not found"):
        IndexedDataset(tmp_path / "missing")


def test_bad_jsonl_and_tokenizer_inputs(tmp_path):
    out = tmp_path / "out"
    cases = [
        ([{"body": "no text key"}], {}, r"bad\.jsonl:1: no key 'text'"),
        ([{"text": "fine"}, {"text": ""}], {}, r"bad\.jsonl:2: empty document"),
        ([{"text": 7}], {}, "holds a int"),
    ]
    for records, kwargs, message in cases:
        source = write_jsonl(tmp_path / "bad.jsonl", records)
        with pytest.raises(DataError, match=message):
            preprocess(source, out, **kwargs)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a valid UTF-8 JSON line"):
        preprocess(tmp_path / "bad.jsonl", out)
    assert not list(tmp_path.glob("out*"))  # failures leave no half-written files
    source = write_jsonl(tmp_path / "skip.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    prefix, stats = preprocess(source, out, skip_empty=True)
    assert stats.documents == 2 and stats.skipped_empty == 1 and len(IndexedDataset(prefix)) == 2
    with pytest.raises(DataError, match="nothere.jsonl: input file not found"):
        preprocess(tmp_path / "nothere.jsonl", out)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model: not a sentencepiece model"):
        load_tokenizer("sentencepiece", tmp_path / "junk.model")
    with pytest.raises(DataError, match=r"absent\.model: tokenizer model not found"):
        load_tokenizer("sentencepiece", tmp_path / "absent.model")
    # The CLI turns them into one line on stderr and exit status 2.
    args = ["--input", str(tmp_path / "nothere.jsonl"), "--output-prefix", str(out)]
    assert preprocess_main(args) == 2


def test_huggingface_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="`tokenizers` is not installed")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(TEXTS * 10, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer("huggingface", tmp_path / "tokenizer.json")
    assert tok.eod == hf.token_to_id("<|endoftext|>") and tok.pad == tok.eod
    assert all(tok.detokenize(tok.tokenize(t)) == t for t in TEXTS)
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    prefix, _ = preprocess(source, tmp_path / "hf", tokenizer_model=tmp_path / "tokenizer.json",
                           tokenizer_type="huggingface", workers=2)
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) + [tok.eod] for t in TEXTS]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json: not a HuggingFace tokenizer.json"):
        load_tokenizer("huggingface", tmp_path / "bad.json")
