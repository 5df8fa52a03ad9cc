"""Sharded checkpoints: exact resume in the same layout, resharded resume in other TP/PP/VPP/DP layouts,
asynchronous = synchronous content, crash safety, preemption, one-line errors for bad checkpoints.

The model is LLaMA-style with tied embeddings (SwiGLU's stride-2 fc1, GQA, the tied output copy on the
last pipeline stage). float32, dropout 0 where layouts are compared.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import REPO, read_metrics, rel

from megatron_lite.checkpoint.storage import CheckpointError, find_checkpoint, read_full, write_checkpoint

TOLERANCE = 1e-5
BASE = [
    "model=llama_tiny", "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=8",
    "model.num_query_groups=4", "model.ffn_hidden_size=96", "model.seq_length=16", "model.tie_embeddings=true",
    "training.micro_batch_size=2", "training.global_batch_size=16",
    "training.train_iters=6", "training.eval_interval=100", "training.eval_iters=0",
    "optimizer.lr_warmup_iters=2", "optimizer.eps=1e-4", "logging.log_interval=100",
]
TP2_PP2_DP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
               "parallel.sequence_parallel=true"]
RESHARDED = {
    "tp1_pp4_vpp1_dp2": (8, ["parallel.pipeline_model_parallel_size=4"]),
    "tp4_pp1_dp2": (8, ["parallel.tensor_model_parallel_size=4"]),
    "tp1_pp2_vpp2_dp4": (8, ["parallel.pipeline_model_parallel_size=2",
                             "parallel.virtual_pipeline_model_parallel_size=2"]),
    "single_rank": (1, []),
}


def _train(overrides: list[str]) -> None:
    from megatron_lite.config import load_config
    from megatron_lite.train import run

    run(load_config(overrides), overrides).state.destroy()


def _load_and_gather(overrides: list[str]) -> dict | None:
    """Load (train_iters = the saved iteration: no step) and return the full parameters on rank 0."""
    from megatron_lite.checkpoint.gather import gather_full_state_dict
    from megatron_lite.config import load_config
    from megatron_lite.train import run

    trainer = run(load_config(overrides))
    full = gather_full_state_dict(trainer.chunks, trainer.state)
    trainer.state.destroy()
    return full if trainer.state.rank == 0 else None


def losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir)[0]}


@pytest.fixture(scope="module")
def saved(ranks, tmp_path_factory):
    """TP2×PP2×DP2 (sequence parallel) for 6 iterations, saving asynchronously at 3 and 6."""
    root = tmp_path_factory.mktemp("saved")
    ranks(8).run(_train, BASE + TP2_PP2_DP2 + [
        f"logging.dir={root / 'run'}", f"checkpoint.save={root / 'ckpt'}", "checkpoint.save_interval=3",
        "checkpoint.async_save=true",
    ])
    return root


def test_layout_of_saved_checkpoint(saved):
    ckpt = saved / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["iter_0000003", "iter_0000006", "latest_checkpointed_iteration.txt"]
    info = find_checkpoint(ckpt)
    trainer = {k: v for k, v in info.meta["trainer"].items() if k != "lr_schedule"}  # test_run_controls checks it
    assert info.iteration == 6 and trainer == {"iteration": 6, "consumed_samples": 96, "skipped_iterations": 0}
    assert sorted(p.name for p in info.path.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(8)]
    assert "training:" in (info.path / "config.yaml").read_text()
    # Unsharded names and shapes: SwiGLU's fc1 as [gate; up] blocks, the padded vocabulary of TP=2.
    assert info.shape("model/layers.3.mlp.fc1.weight") == (2, 96, 64)
    assert info.shape("model/embedding.weight") == (4096, 64)
    assert info.shape("optimizer/layers.0.attention.qkv.weight/exp_avg") == (128, 64)
    assert "model/output_weight" not in info.keys()
    assert {k.split("/")[1] for k in info.keys() if k.startswith("rng/")} == {f"rank{r}" for r in range(8)}


def test_resume_same_layout_is_bit_identical(ranks, saved, tmp_path):
    """Resume at 3 in the same layout, saving synchronously: losses 4–6 equal to the last bit, and the
    final checkpoint equals the uninterrupted run's asynchronous one tensor for tensor."""
    ranks(8).run(_train, BASE + TP2_PP2_DP2 + [
        f"logging.dir={tmp_path / 'run'}", f"checkpoint.load={saved / 'ckpt'}", "checkpoint.load_iteration=3",
        f"checkpoint.save={tmp_path / 'ckpt'}",
    ])
    ref, got = losses(saved / "run"), losses(tmp_path / "run")
    assert sorted(got) == [4, 5, 6]
    assert all(got[i] == ref[i] for i in got), (got, ref)
    a, b = read_full(find_checkpoint(saved / "ckpt")), read_full(find_checkpoint(tmp_path / "ckpt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_distributed_optimizer_resume(ranks, tmp_path):
    """ZeRO-1 optimizer state saved by parameter name: TP2×PP2×DP2 resumes bit-identically, and a
    TP1×PP4×DP2 run with the plain optimizer continues within 1e-5."""
    zero = BASE + TP2_PP2_DP2 + ["optimizer.use_distributed_optimizer=true"]
    ranks(8).run(_train, zero + [f"logging.dir={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                 "checkpoint.save_interval=3"])
    load = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=3"]
    ranks(8).run(_train, zero + load + [f"logging.dir={tmp_path / 'b'}"])
    ranks(8).run(_train, BASE + RESHARDED["tp1_pp4_vpp1_dp2"][1] + load + [f"logging.dir={tmp_path / 'c'}"])
    a, b, c = (losses(tmp_path / x) for x in "abc")
    assert sorted(b) == [4, 5, 6] and all(a[i] == b[i] for i in b), (a, b)
    assert rel([c[i] for i in b], [a[i] for i in b]) < TOLERANCE


@pytest.mark.parametrize("layout", list(RESHARDED))
def test_resume_in_another_layout(ranks, saved, tmp_path, layout):
    world, overrides = RESHARDED[layout]
    ranks(world).run(_train, BASE + overrides + [
        f"logging.dir={tmp_path}", f"checkpoint.load={saved / 'ckpt'}", "checkpoint.load_iteration=3",
    ])
    ref, got = losses(saved / "run"), losses(tmp_path)
    assert sorted(got) == [4, 5, 6]
    err = rel([got[i] for i in got], [ref[i] for i in got])
    print(f"{layout}: loss error {err:.1e}")
    assert err < TOLERANCE


@pytest.mark.parametrize("what", ["dropout", "bf16", "fp16"])
def test_single_rank_resume_is_bit_identical(ranks, tmp_path, what):
    """dropout: the resumed run draws the same masks (model RNG restored); bf16: the fp32 master
    weights come back from the optimizer state, not from the rounded bf16 parameters; fp16: the
    dynamic loss scale (here growing every iteration) comes back too."""
    extra = {"dropout": ["model.dropout=0.2"], "bf16": ["training.precision=bf16"],
             "fp16": ["training.precision=fp16", "training.loss_scale_window=1", "training.initial_loss_scale=1024"]}[what]
    base = BASE + extra + ["training.train_iters=4"]
    ranks(1).run(_train, base + [f"logging.dir={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                 "checkpoint.save_interval=2"])
    ranks(1).run(_train, base + [f"logging.dir={tmp_path / 'b'}", f"checkpoint.load={tmp_path / 'ckpt'}",
                                 "checkpoint.load_iteration=2"])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [3, 4] and all(a[i] == b[i] for i in b), (a, b)
    scales = [r.get("loss_scale") for r in read_metrics(tmp_path / "b")[0]]
    assert scales == [r.get("loss_scale") for r in read_metrics(tmp_path / "a")[0]][2:]


def test_generators_of_another_device_type_are_skipped_in_one_line():
    """A checkpoint saved on a GPU resumed on the CPU (the other way round is the same check): the
    torch, numpy and Python generators are restored; the model's CUDA dropout generators (16-byte
    Philox states) and the CUDA generator cannot be, and are named instead of a bare RuntimeError."""
    import random

    import numpy as np

    from megatron_lite.checkpoint.sharded import restore_rng, rng_tensors
    from megatron_lite.tensor_parallel.random import ModelRNG

    model_rng = ModelRNG(7)
    saved = rng_tensors(0, model_rng)
    expected = (torch.rand(3), np.random.rand(), random.random())
    philox = torch.zeros(16, dtype=torch.uint8)  # what torch.cuda generators' get_state() returns
    saved.update({"rng/rank0/model.default": philox, "rng/rank0/model.tensor_parallel": philox,
                  "rng/rank0/cuda": philox})
    seeded = ModelRNG(8)
    skipped = restore_rng(0, saved, seeded)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]  # the host generators came back
    assert skipped == ["the model's dropout generators (saved on a GPU, this run's are cpu)",
                       "the CUDA generator (no GPU here)"]
    assert torch.equal(seeded.default.get_state(), ModelRNG(8).default.get_state())  # kept its seeded state
    assert restore_rng(0, rng_tensors(0, model_rng), ModelRNG(8)) == []


def test_keep_last_and_fresh_start(ranks, tmp_path):
    """keep_last prunes after the new save; a load directory without a tracker starts from scratch."""
    ranks(1).run(_train, BASE + [
        "training.train_iters=3", f"logging.dir={tmp_path}", f"checkpoint.save={tmp_path / 'ckpt'}",
        f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.save_interval=1", "checkpoint.keep_last=2",
    ])
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_keep_last_after_resuming_an_older_iteration(ranks, tmp_path):
    """Saved at 2, 4, 6; resumed at 2 with keep_last=2, the final save at 3 (off the interval) is kept
    with what the tracker names, the abandoned 4 and 6 are kept outside the count, and the next start
    resumes at 3 (before: 3 was pruned as the oldest iteration and the start failed)."""
    ckpt = tmp_path / "ckpt"
    # lr_decay_iters fixed: the shorter and longer runs keep the checkpoint's learning-rate schedule.
    run = BASE + ["training.global_batch_size=4", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                  "checkpoint.save_interval=2", "optimizer.lr_decay_iters=6"]
    ranks(1).run(_train, run + [f"logging.dir={tmp_path / 'a'}"])
    ranks(1).run(_train, run + [f"logging.dir={tmp_path / 'b'}", "training.train_iters=3",
                                "checkpoint.load_iteration=2", "checkpoint.keep_last=2"])
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [f"iter_000000{i}" for i in (2, 3, 4, 6)]
    ranks(1).run(_train, run + [f"logging.dir={tmp_path / 'c'}", "training.train_iters=4", "checkpoint.keep_last=2"])
    assert sorted(losses(tmp_path / "b")) == [3] and sorted(losses(tmp_path / "c")) == [4]
    # 4 was saved again (the abandoned 4 replaced); 3 and 4 are the two newest of this line; 6 waits.
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [f"iter_000000{i}" for i in (3, 4, 6)]


def test_pruning_keeps_the_tracker_and_passes_an_abandoned_branch(tmp_path):
    """keep_last counts in write order and never removes the tracker's checkpoint or a later
    iteration: an abandoned branch (4, 6 after a resume at 2) is replaced or pruned as the new run
    passes it."""
    root = tmp_path / "ckpt"

    def save(iteration: int, keep_last: int = 2) -> list[int]:
        write_checkpoint({"model/w": torch.full((2,), float(iteration))}, {}, "", root, iteration, keep_last=keep_last)
        assert find_checkpoint(root).iteration == iteration
        return sorted(int(p.name[5:]) for p in root.glob("iter_*"))

    for i in (2, 4, 6):
        save(i, keep_last=None)
    assert save(3) == [2, 3, 4, 6]
    assert save(5) == [3, 5, 6]  # the abandoned 4, passed, is older than 3 in write order: pruned
    assert save(7) == [5, 7]  # so is 6 once passed
    assert save(1, keep_last=1) == [1, 5, 7]  # a resume at 0: everything later is kept


def test_other_vocabulary_padding(ranks, tmp_path):
    """A vocabulary of 4100 tokens is padded to 4224 rows at TP=1 and 4352 at TP=2: loading keeps
    every saved row and zero-fills the new padding rows; the other parameters load unchanged."""
    vocab = BASE + ["model.vocab_size=4100", "training.train_iters=1", f"logging.dir={tmp_path}"]
    ranks(1).run(_train, vocab + [f"checkpoint.save={tmp_path / 'ckpt'}"])
    full = ranks(2).run(_load_and_gather, vocab + ["parallel.tensor_model_parallel_size=2",
                                                   f"checkpoint.load={tmp_path / 'ckpt'}"])[0]
    saved = read_full(find_checkpoint(tmp_path / "ckpt"), "model/")
    embedding = full.pop("embedding.weight")
    assert embedding.shape == (4352, 64) and saved["model/embedding.weight"].shape == (4224, 64)
    assert torch.equal(embedding[:4224], saved.pop("model/embedding.weight")) and not embedding[4224:].any()
    assert {"model/" + k for k in full} == saved.keys()
    for key, value in full.items():
        assert torch.equal(value.reshape(saved["model/" + key].shape), saved["model/" + key]), key


def test_exit_duration_saves_and_stops(ranks, tmp_path):
    ranks(1).run(_train, BASE + ["training.exit_duration_mins=0", f"logging.dir={tmp_path}",
                                 f"checkpoint.save={tmp_path / 'ckpt'}"])
    assert sorted(losses(tmp_path)) == [1]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# Bad checkpoints --------------------------------------------------------------------------------
@pytest.fixture
def damaged(saved, tmp_path):
    """A copy of the saved checkpoints to damage."""
    return Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))


def _error(root, iteration=None) -> str:
    with pytest.raises(CheckpointError) as err:
        find_checkpoint(root, iteration)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_checkpoints_one_line_errors(damaged):
    it6 = damaged / "iter_0000006"
    (it6 / "__5_0.distcp").unlink()
    assert _error(damaged) == f"{it6 / '__5_0.distcp'}: missing shard (listed in {it6 / '.metadata'})"
    it3 = damaged / "iter_0000003"
    with open(it3 / "__2_0.distcp", "r+b") as f:
        f.truncate(1000)
    assert _error(damaged, 3).startswith(f"{it3 / '__2_0.distcp'}: truncated: 1000 bytes, the index needs ")
    meta = json.loads((it3 / "meta.json").read_text())
    (it3 / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    assert _error(damaged, 3) == f"{it3 / 'meta.json'}: unknown checkpoint version 99; this code reads version 1"
    (damaged / "latest_checkpointed_iteration.txt").write_text("9\n")
    assert _error(damaged) == (f"{damaged / 'latest_checkpointed_iteration.txt'}: names iteration 9 but "
                               f"{damaged / 'iter_0000009'} does not exist")
    assert _error(damaged, 5).startswith(f"{damaged / 'iter_0000005'}: no such checkpoint (found: iter_0000003, ")


def _pickled_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that calls ``module``'s attribute ``name`` (dotted: reached through the
    module's own imports) on ``arg``."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s.encode())]) + s.encode()  # SHORT_BINUNICODE
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."  # STACK_GLOBAL, TUPLE1, REDUCE


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.system"),  # the module imports os
    ("torch.distributed.checkpoint.metadata", "torch.load"),
    ("torch", "os.system"), ("builtins", "eval"), ("os", "system"),
])
def test_crafted_dcp_index_is_refused_without_side_effects(tmp_path, module, name):
    """A .metadata naming anything but DCP's metadata classes (and torch sizes, dtypes, layouts) is
    refused before the name is looked up: nothing runs, one line names the file."""
    root = tmp_path / "ckpt"
    write_checkpoint({"model/w": torch.ones(2, 3)}, {}, "", root, 1)
    assert find_checkpoint(root).shape("model/w") == (2, 3)  # a real index passes the allow-list
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    index = root / "iter_0000001" / ".metadata"
    index.write_bytes(_pickled_call(module, name, command))
    message = _error(root)
    assert message.startswith(f"{index}: unreadable DCP index (UnpicklingError: {module}.{name} is not allowed")
    assert not marker.exists()


def test_other_model_shape_exits_2_with_one_line(saved, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lite.train", *BASE, "model.ffn_hidden_size=128",
         f"checkpoint.load={saved / 'ckpt'}", f"logging.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"checkpoint error: {saved / 'ckpt' / 'iter_0000006' / 'meta.json'}: model.ffn_hidden_size is 96 in the "
        "checkpoint but 128 in this config; load it with the same model shape"
    )


# Crash safety and preemption ----------------------------------------------------------------------
KILL_SCRIPT = """
import sys, torch
from megatron_lite.checkpoint.storage import write_checkpoint
tensors = {f"model/w{i}": torch.full((1024, 1024), float(i)) for i in range(int(sys.argv[3]))}
write_checkpoint(tensors, {}, "", sys.argv[1], int(sys.argv[2]))
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, capsys):
    """A 400 MB save killed with SIGKILL mid-write: the tracker and the previous checkpoint stay
    valid, the partial directory is ignored with a message and removed by the next save."""
    root = tmp_path / "ckpt"
    small = {"model/w": torch.arange(12.0).reshape(3, 4)}
    write_checkpoint(small, {}, "", root, 1)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), "2", "100"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    data = root / "iter_0000002.tmp" / "__0_0.distcp"
    deadline = time.time() + 120
    while time.time() < deadline and not (data.exists() and data.stat().st_size > 10 * 2**20):
        assert proc.poll() is None, "the save finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (root / "iter_0000002").exists()
    capsys.readouterr()
    info = find_checkpoint(root)
    assert f"ignoring {root / 'iter_0000002.tmp'}: an interrupted save" in capsys.readouterr().out
    assert info.iteration == 1 and torch.equal(read_full(info)["model/w"], small["model/w"])
    write_checkpoint(small, {}, "", root, 3)
    assert not (root / "iter_0000002.tmp").exists()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_preemption_signal_on_one_rank_saves_and_exits_0(tmp_path):
    """SIGUSR1 to rank 1 only (of 2, under torchrun): both ranks stop after the same iteration, save
    it, and the job exits with status 0; training resumes from there."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = BASE + ["training.train_iters=1000", f"logging.dir={run_dir}", f"checkpoint.save={ckpt}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megatron_lite.train", *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    workers = _children(proc.pid)
    rank1 = next(p for p in workers if "RANK=1" in Path(f"/proc/{p}/environ").read_text().split("\0"))
    os.kill(rank1, signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(losses(run_dir))
    assert "stopping at iteration" in err and "signal SIGUSR1" in err
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    assert 2 <= stopped < 1000


# HuggingFace export / import ----------------------------------------------------------------------
GPT2 = ["model=gpt_tiny", "model.num_layers=2", "model.hidden_size=64", "model.seq_length=16",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=1",
        "training.eval_iters=0", "logging.log_interval=100"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_export_import_round_trip(ranks, saved, tmp_path, arch):
    """export -> transformers loads it with our logits (1e-4); import -> the same parameters again,
    and a checkpoint that trains in another layout (TP=2) with a fresh optimizer."""
    transformers = pytest.importorskip("transformers")
    from megatron_lite.checkpoint.hf import load_model, main

    ckpt, overrides = saved / "ckpt", BASE
    if arch == "gpt2":
        ckpt, overrides = tmp_path / "ckpt", GPT2
        ranks(1).run(_train, GPT2 + [f"logging.dir={tmp_path}", f"checkpoint.save={ckpt}"])
    assert main(["export", "--load", str(ckpt), "--output", str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf_model).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    _, ours = load_model(ckpt)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf_model(ids).logits, ours.eval()(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{arch} export: logits error {err:.1e}")
    assert err < 1e-4

    imported = tmp_path / "imported"
    assert main(["import", "--hf", str(tmp_path / "hf"), "--output", str(imported)]) == 0
    _, back = load_model(imported)
    with torch.no_grad():
        assert ((back.eval()(ids) - ref).abs().max() / ref.abs().max()).item() < 1e-4
    a, b = read_full(find_checkpoint(ckpt), "model/"), read_full(find_checkpoint(imported), "model/")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run_dir = tmp_path / "from_hf"
    ranks(2).run(_train, overrides + ["parallel.tensor_model_parallel_size=2", "training.train_iters=1",
                                      f"logging.dir={run_dir}", f"checkpoint.load={imported}"])
    assert list(losses(run_dir)) == [1]
