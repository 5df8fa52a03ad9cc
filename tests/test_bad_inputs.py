"""Broken inputs through the real entry point and command-line tools, each one as a user would type it.

Every case must exit non-zero with exactly one line on stderr that names the offending key or file,
no Python traceback, and leave every input file as it was (contents, mtime, no file removed). The
cases run as subprocesses, a few at a time, once per module; each test checks one case.
Set BAD_INPUTS_TABLE=path.md to write the table of messages (docs/failures.md, "Bad input").
"""

import gzip
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDatasetWriter

REPO = Path(__file__).resolve().parent.parent
CASE_TIMEOUT_S = 300  # a hang guard only: every case takes a few seconds (minutes on a loaded machine)
TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "training.micro_batch_size=1", "training.global_batch_size=2", "training.train_iters=1",
    "training.eval_iters=0",
]
SH_TINY = ["parallel=single", *TINY, "training.global_batch_size=3"]  # the 3 ranks _run_case launches


def _train(*overrides, config_dir=None):
    flags = ["--config-dir", config_dir] if config_dir else []  # Hydra's flags go before the overrides
    return ["-m", "megatron_lite.train", *flags, *TINY, *overrides]


def _config(world_size, *overrides):
    return ["-m", "megatron_lite.config", "--world-size", str(world_size), *overrides]


# (case id, command after the interpreter ("sh" = scripts/pretrain_gpt.sh), strings the line must hold).
# {d} is the inputs directory. The comment says what is broken.
CASES = [
    # Configuration, through the validation CLI the launch scripts run first.
    ("unknown key", _config(1, "model.hidden_sise=64"), ["model.hidden_sise"]),
    ("wrong type", _config(1, "training.micro_batch_size=two"), ["training.micro_batch_size"]),
    ("unknown config group option", _config(1, "model=gpt_huge"), ["model/gpt_huge"]),
    ("malformed override", _config(1, "optimizer.lr=[0.1,"), ["optimizer.lr"]),
    ("TP×PP does not divide the world", _config(4, "parallel.tensor_model_parallel_size=3"),
     ["parallel.tensor_model_parallel_size"]),
    ("TP does not divide the heads", _config(8, "parallel.tensor_model_parallel_size=8"),
     ["parallel.tensor_model_parallel_size"]),
    ("VPP without PP", _config(1, "parallel.virtual_pipeline_model_parallel_size=2"),
     ["parallel.virtual_pipeline_model_parallel_size"]),
    ("layers do not split over PP", _config(2, "parallel.pipeline_model_parallel_size=2", "model.num_layers=3"),
     ["model.num_layers"]),
    ("pipeline layout does not cover the layers",
     _config(2, "parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layout=[1,2]"),
     ["parallel.pipeline_layout"]),
    ("zbv with other than 2 chunks per rank",
     _config(2, "parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=zbv",
             "parallel.virtual_pipeline_model_parallel_size=3", "model.num_layers=6"),
     ["parallel.virtual_pipeline_model_parallel_size"]),
    ("global batch not a multiple of micro batch × DP",
     _config(4, "training.global_batch_size=6", "training.micro_batch_size=4"), ["training.global_batch_size"]),
    ("interleaving with too few microbatches",
     _config(4, "parallel.pipeline_model_parallel_size=4", "parallel.virtual_pipeline_model_parallel_size=2",
             "model.num_layers=8", "training.global_batch_size=6", "training.micro_batch_size=1"),
     ["training.global_batch_size"]),
    ("negative learning rate", _config(1, "optimizer.lr=-0.1"), ["optimizer.lr"]),
    ("unknown precision", _config(1, "training.precision=fp8"), ["training.precision"]),
    ("zero step timeout", _config(1, "training.step_timeout=0"), ["training.step_timeout"]),
    ("zero world size", _config(0), ["world_size"]),
    # The training entry point: Hydra composition errors, then data and files.
    ("malformed YAML file", _train("model=broken", config_dir="{d}/configs"), ["broken.yaml", "malformed YAML"]),
    ("wrong type in a YAML file", _train("model=wrongtype", config_dir="{d}/configs"), ["model.hidden_size"]),
    ("unknown key (train)", _train("training.iters=5"), ["training.iters"]),
    ("data path does not exist", _train("data.paths=[{d}/missing_text_document]"), ["{d}/missing_text_document.idx"]),
    ("corrupt .idx (bad magic)", _train("data.paths=[{d}/badmagic]"), ["{d}/badmagic.idx", "magic"]),
    ("truncated .idx", _train("data.paths=[{d}/truncidx]"), ["{d}/truncidx.idx", "truncated"]),
    ("truncated .bin", _train("data.paths=[{d}/truncbin]"), ["{d}/truncbin.bin", "truncated"]),
    ("odd data.paths weights", _train("data.paths=[0.5,{d}/good,0.5]"), ["data.paths"]),
    ("malformed data.split", _train("data.split='a,b'"), ["data.split"]),
    ("tokenizer file does not exist", _train("data.tokenizer.model={d}/missing.model"), ["{d}/missing.model"]),
    ("non-sentencepiece tokenizer file", _train("data.tokenizer.model={d}/notsp.model"),
     ["{d}/notsp.model", "not a sentencepiece model"]),
    ("tokenizer path is a directory", _train("data.tokenizer.model={d}/tokdir"), ["{d}/tokdir", "a directory"]),
    ("huggingface type on a sentencepiece file", _train("data.tokenizer.type=huggingface",
                                                        "data.tokenizer.model={d}/notsp.model"), ["{d}/notsp.model"]),
    ("unreadable tokenizer file (chmod 000)", _train("data.tokenizer.model={d}/unreadable.model"),
     ["{d}/unreadable.model"]),
    ("logging.dir under a regular file", _train("logging.dir={d}/afile/run"), ["{d}/afile"]),
    ("ambiguous override (unquoted list)", _train("data.split=98,2,0"), ["data.split=98,2,0", "quote the value"]),
    # The data against the model's tokenizer, checked before any process group exists.
    ("data made by another tokenizer", _train("data.paths=[{d}/othertok]"),
     ["{d}/othertok.bin/.idx", "{d}/other_tokenizer.json", "kjv_bpe4096.model", "(4096 ids"]),
    ("token ids beyond the model's vocabulary", _train("data.paths=[{d}/bigids]"),
     ["{d}/bigids.bin", "token ids up to 5000", "4096 ids", "model.vocab_size"]),
    ("model.vocab_size below the tokenizer's", _train("model.vocab_size=1000"), ["model.vocab_size", "4096"]),
    ("GPT2BPETokenizer without its files", _train("data.tokenizer.type=GPT2BPETokenizer"),
     ["data.tokenizer.vocab_file", "data.tokenizer.merge_file"]),
    # The data tools.
    ("preprocess: input does not exist",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/missing.jsonl", "--output-prefix", "{out}/x"],
     ["{d}/missing.jsonl"]),
    ("preprocess: malformed JSON line",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/bad.jsonl", "--output-prefix", "{out}/x"],
     ["{d}/bad.jsonl:2"]),
    ("preprocess: missing JSON key",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/nokey.jsonl", "--output-prefix", "{out}/x"],
     ["{d}/nokey.jsonl:1", "--json-key"]),
    ("preprocess: truncated .gz",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/trunc.jsonl.gz", "--output-prefix", "{out}/x"],
     ["{d}/trunc.jsonl.gz", "truncated"]),
    ("preprocess: non-sentencepiece tokenizer",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/ok.jsonl", "--tokenizer-model", "{d}/notsp.model",
      "--output-prefix", "{out}/x"], ["{d}/notsp.model"]),
    ("preprocess: --split-sentences",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/ok.jsonl", "--output-prefix", "{out}/x", "--split-sentences"],
     ["--split-sentences"]),
    ("preprocess: GPT2BPETokenizer without --merge-file",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/ok.jsonl", "--output-prefix", "{out}/x",
      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{d}/other_tokenizer.json"], ["--merge-file"]),
    ("preprocess: output prefix under a regular file",
     ["-m", "megatron_lite.data.preprocess", "--input", "{d}/ok.jsonl", "--output-prefix", "{d}/afile/x"],
     ["{d}/afile", "--output-prefix"]),
    ("train_tokenizer: malformed JSON line",
     ["-m", "megatron_lite.data.train_tokenizer", "--input", "{d}/bad.jsonl", "--output", "{out}/tok",
      "--vocab-size", "300"], ["{d}/bad.jsonl:2"]),
    ("train_tokenizer: vocabulary too small",
     ["-m", "megatron_lite.data.train_tokenizer", "--input", "{d}/ok.jsonl", "--output", "{out}/tok",
      "--vocab-size", "100"], ["--vocab-size"]),
    # Layout and schedule tools.
    ("layout: TP does not divide the world", ["-m", "megatron_lite.parallel.layout", "--world-size", "6", "--tp", "4"],
     ["world size 6", "TP"]),
    ("simulate: unknown schedule", ["-m", "megatron_lite.pipeline.simulate", "--schedule", "zigzag"], ["zigzag"]),
    ("simulate: interleaved with m not a multiple of p",
     ["-m", "megatron_lite.pipeline.simulate", "--pp", "4", "--vpp", "2", "--microbatches", "3"], ["m=3"]),
    ("simulate: trace file does not exist", ["-m", "megatron_lite.pipeline.simulate", "--trace", "{d}/none.json"],
     ["{d}/none.json"]),
    ("simulate: trace file is not JSON", ["-m", "megatron_lite.pipeline.simulate", "--trace", "{d}/bad.jsonl"],
     ["{d}/bad.jsonl", "not JSON"]),
    # The launch script validates before torchrun starts any rank.
    ("pretrain_gpt.sh: TP does not divide 3 ranks", ["sh", "parallel.tensor_model_parallel_size=2"],
     ["parallel.tensor_model_parallel_size", "world size 3"]),
    # The launcher's checks before any rank starts (no logging.dir is created: the inputs stay as they were).
    ("pretrain_gpt.sh: data path does not exist",
     ["sh", *SH_TINY, "data.paths=[{d}/missing]", "logging.dir={d}/shrun"], ["{d}/missing.idx"]),
    ("pretrain_gpt.sh: explicit checkpoint.load does not exist",
     ["sh", *SH_TINY, "checkpoint.load={d}/nockpt", "logging.dir={d}/shrun"],
     ["checkpoint.load={d}/nockpt", "no such directory"]),
]
CASE_IDS = [case[0] for case in CASES]
ROOT = os.geteuid() == 0


def _skipped(case_id: str) -> bool:
    return ROOT and case_id.startswith("unreadable")


def _write_inputs(d: Path) -> None:
    """The user's files every case reads: a small valid dataset and broken variants of each input."""
    writer = IndexedDatasetWriter(d / "good", np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.add_document(rng.integers(4, 4000, size=60))
    writer.finalize()
    idx, bin_ = (d / "good.idx").read_bytes(), (d / "good.bin").read_bytes()
    (d / "badmagic.idx").write_bytes(b"NOTMMIDX!" + idx[9:])
    (d / "badmagic.bin").write_bytes(bin_)
    (d / "truncidx.idx").write_bytes(idx[: len(idx) // 2])
    (d / "truncidx.bin").write_bytes(bin_)
    (d / "truncbin.idx").write_bytes(idx)
    (d / "truncbin.bin").write_bytes(bin_[: len(bin_) // 2])
    configs = d / "configs" / "model"
    configs.mkdir(parents=True)
    (configs / "broken.yaml").write_text("num_layers: 2\nhidden_size: [64,\n")
    (configs / "wrongtype.yaml").write_text("num_layers: 2\nhidden_size: big\n")
    (d / "ok.jsonl").write_text('{"text": "In the beginning"}\n')
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "nokey.jsonl").write_text('{"body": "no text field"}\n')
    (d / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:30])
    (d / "notsp.model").write_text("this is not a sentencepiece model\n")
    (d / "tokdir").mkdir()
    (d / "afile").write_text("a regular file\n")
    _write_foreign_tokenizer_data(d)
    unreadable = d / "unreadable.model"
    unreadable.write_bytes((REPO / "megatron_lite/data/corpus/kjv_bpe4096.model").read_bytes())
    unreadable.chmod(0)


def _write_foreign_tokenizer_data(d: Path) -> None:
    """``othertok``: data with the record of a 300-id HF tokenizer; ``bigids``: data without a
    record (as Megatron-LM writes it) holding ids up to 5000."""
    import tokenizers

    from megatron_lite.data.record import write_record
    from megatron_lite.data.tokenizer import load_tokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False)
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20, trainer)
    tok.save(str(d / "other_tokenizer.json"))
    other = load_tokenizer("HuggingFaceTokenizer", d / "other_tokenizer.json")
    for name, top in (("othertok", other.vocab_size - 1), ("bigids", 5000)):
        writer = IndexedDatasetWriter(d / name, np.uint16)
        rng = np.random.default_rng(1)
        for _ in range(40):
            writer.add_document(rng.integers(0, top, size=60))
        writer.add_document([top])
        writer.finalize()
    write_record(d / "othertok", other, json_key="text", max_token_id=other.vocab_size - 1)


def _snapshot(d: Path) -> dict[str, tuple]:
    """Every file and directory under ``d``: (size, mtime_ns, sha256) or "dir". ``*.scan.json`` and
    its lock are left out: the cache of a dataset's largest token id that the start-up check writes
    beside it."""
    snap = {}
    for path in sorted(p for p in d.rglob("*") if ".scan.json" not in p.name):
        if path.is_dir():
            snap[str(path.relative_to(d))] = ("dir",)
        else:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            snap[str(path.relative_to(d))] = (stat.st_size, stat.st_mtime_ns, digest)
    return snap


def _run_case(n: int, command: list[str], d: Path, out: Path, work: Path) -> tuple[int, str, str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "NPROC_PER_NODE": "3"}
    args = [a.format(d=d, out=out) for a in command]
    if args[0] == "sh":
        argv = ["bash", str(REPO / "scripts/pretrain_gpt.sh"), *args[1:]]
    else:
        argv = [sys.executable, *args]
    if "megatron_lite.train" in args:  # each run logs (and Hydra writes) in its own directory
        argv.append(f"data.cache_dir={work / 'cache'}")
        if not any(a.startswith("logging.dir=") for a in args):
            argv.append(f"logging.dir={work / f'run{n}'}")
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case (3 at a time); returns ({case id: (code, stdout, stderr, seconds)}, snapshots)."""
    d, out, work = (tmp_path_factory.mktemp(name) for name in ("inputs", "outputs", "work"))
    _write_inputs(d)
    before = _snapshot(d)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case_id: pool.submit(_run_case, n, command, d, out, work)
                   for n, (case_id, command, _) in enumerate(CASES) if not _skipped(case_id)}
        results = {case_id: f.result() for case_id, f in futures.items()}
    after = _snapshot(d)
    table = os.environ.get("BAD_INPUTS_TABLE")
    if table:
        rows = [f"| {cid} | {r[0]} | `{r[2].strip().replace(str(d), '…').replace('|', '/')}` |"
                for cid, r in results.items()]
        Path(table).write_text("| broken input | exit | message |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n")
    return results, d, out, before, after


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_line_naming_the_culprit(outcomes, case):
    results, d, out, _, _ = outcomes
    case_id, _, names = case
    if _skipped(case_id):
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    code, stdout, stderr, seconds = results[case_id]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0, f"exit 0\n{stdout[-2000:]}"
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{stderr[-3000:]}"
    for name in names:
        assert name.format(d=d, out=out) in lines[0], lines[0]


def test_no_input_file_changed_and_no_partial_output(outcomes):
    _, _, out, before, after = outcomes
    assert after == before
    assert not list(out.iterdir()), "a failed tool left output files behind"
