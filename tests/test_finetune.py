"""Fine-tuning controls (Megatron's names): checkpoint.finetune (weights only), checkpoint.load_optimizer
and checkpoint.load_rng = false, and checkpoint.use_checkpoint_model_config (the architecture read
from the checkpoint). Single rank, float32."""

import pytest
from test_checkpoint import BASE, _train, losses

from megatron_lite.checkpoint.storage import find_checkpoint, read_full
from megatron_lite.config import ConfigError, load_config, validate

TRAINED = ["optimizer.lr=3e-3", "training.train_iters=6"]


@pytest.fixture(scope="module")
def trained(ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    ranks(1).run(_train, BASE + TRAINED + [f"logging.dir={root / 'run'}", f"checkpoint.save={root / 'ckpt'}"])
    return root


def _optimizer_step(ckpt) -> float:
    return read_full(find_checkpoint(ckpt), "optimizer/embedding.weight/step")["optimizer/embedding.weight/step"].item()


def test_finetune_loads_weights_only(ranks, trained, tmp_path):
    ranks(1).run(_train, BASE + TRAINED + [
        "training.train_iters=2", "checkpoint.finetune=true", f"checkpoint.load={trained / 'ckpt'}",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.dir={tmp_path}",
    ])
    ref, got = losses(trained / "run"), losses(tmp_path)
    assert sorted(got) == [1, 2]  # the iteration starts at 0 again
    assert got[1] < ref[1] - 0.2  # the same first batch, now seen by the trained weights
    info = find_checkpoint(tmp_path / "ckpt")
    assert info.meta["trainer"]["consumed_samples"] == 2 * 16  # the data position started fresh
    assert _optimizer_step(tmp_path / "ckpt") == 2  # so did the optimizer (6 + 2 had it been loaded)


def test_without_optimizer_state(ranks, trained, tmp_path):
    ranks(1).run(_train, BASE + TRAINED + [
        "training.train_iters=7", "checkpoint.load_optimizer=false", f"checkpoint.load={trained / 'ckpt'}",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.dir={tmp_path}",
    ])
    assert sorted(losses(tmp_path)) == [7]  # the run continues at its iteration
    assert _optimizer_step(tmp_path / "ckpt") == 1  # with a fresh optimizer


def test_without_random_generators(ranks, tmp_path):
    """With dropout, a resume that skips the generators draws other masks than the uninterrupted run."""
    run = BASE + ["model.dropout=0.2", "training.train_iters=4"]
    ranks(1).run(_train, run + [f"logging.dir={tmp_path / 'a'}", f"checkpoint.save={tmp_path / 'ckpt'}",
                                "checkpoint.save_interval=2"])
    load = [f"checkpoint.load={tmp_path / 'ckpt'}", "checkpoint.load_iteration=2"]
    ranks(1).run(_train, run + load + [f"logging.dir={tmp_path / 'b'}"])
    ranks(1).run(_train, run + load + ["checkpoint.load_rng=false", f"logging.dir={tmp_path / 'c'}"])
    a, b, c = (losses(tmp_path / x) for x in "abc")
    assert all(b[i] == a[i] for i in (3, 4)) and all(c[i] != a[i] for i in (3, 4)), (a, b, c)


def test_model_config_from_the_checkpoint(trained):
    """Every architecture key comes from the checkpoint; the run's own choices stay (a RoPE model's
    sequence length set on the command line, dropout)."""
    from megatron_lite.config import with_checkpoint_model_config

    overrides = ["model=gpt_tiny", "model.seq_length=32", "model.dropout=0.1",
                 f"checkpoint.load={trained / 'ckpt'}", "checkpoint.use_checkpoint_model_config=true"]
    taken, changed = with_checkpoint_model_config(load_config(overrides), overrides)
    saved = load_config(BASE).model
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "normalization", "activation", "position_embedding", "add_bias_linear", "tie_embeddings"):
        assert getattr(taken.model, key) == getattr(saved, key), key
    assert taken.model.vocab_size == 4096 and taken.model.seq_length == 32 and taken.model.dropout == 0.1
    assert changed["position_embedding"] == ("learned", "rope") and "seq_length" not in changed
    validate(taken, 1)


@pytest.mark.parametrize("key", ["finetune", "use_checkpoint_model_config"])
def test_needs_a_checkpoint_to_load(key):
    with pytest.raises(ConfigError, match=f"checkpoint.{key}: needs checkpoint.load"):
        validate(load_config([f"checkpoint.{key}=true"]), 1)
