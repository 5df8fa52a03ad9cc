"""Config composition and validate(): one row per rule, with the message asserted."""

import pytest

from megatron_lite.config import ConfigError, load_config, padded_vocab_size, validate


def test_default_config_composes_and_validates():
    cfg = load_config()
    dims = validate(cfg, world_size=8)
    assert (dims.tp, dims.pp, dims.dp, dims.vpp) == (1, 1, 8, 1)
    assert dims.num_microbatches == 1 and dims.pipeline_schedule == "1f1b"


def test_main_job_layout():
    dims = validate(load_config(["parallel=tp2_pp2_dp2"]), world_size=8)
    assert (dims.tp, dims.pp, dims.dp, dims.vpp) == (2, 2, 2, 2)
    assert dims.pipeline_schedule == "interleaved" and dims.num_microbatches == 4
    assert dims.sequence_parallel


@pytest.mark.parametrize("model", ["gpt_tiny", "llama_tiny", "gpt2_124m", "gpt_1p5b", "llama_1b"])
def test_shipped_models_validate(model):
    validate(load_config([f"model={model}"]), world_size=1)


# (overrides, world size, key named in the error, a fragment of the message)
BAD = [
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 6,
     "parallel.tensor_model_parallel_size", "world size 6 is not divisible by TP×PP = 2×2 = 4"),
    (["model.hidden_size=130"], 1, "model.hidden_size", "130 is not divisible by model.num_attention_heads=4"),
    (["model.num_attention_heads=8", "model.num_query_groups=3"], 1, "model.num_query_groups",
     "not divisible by 3 query groups"),
    (["model.num_attention_heads=4", "parallel.tensor_model_parallel_size=8"], 8,
     "parallel.tensor_model_parallel_size", "num_attention_heads=4 is not divisible by TP=8"),
    (["model=llama_tiny", "parallel.tensor_model_parallel_size=4"], 4, "model.num_query_groups",
     "2 query groups are not divisible by TP=4"),
    (["parallel.pipeline_model_parallel_size=3"], 3, "model.num_layers",
     "4 layers do not split into PP×VPP = 3×1 = 3"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"], 2,
     "model.num_layers", "PP×VPP = 2×4 = 8"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], 1,
     "parallel.virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size=1"),
    (["training.global_batch_size=10", "training.micro_batch_size=2"], 4, "training.global_batch_size",
     "10 is not divisible by micro_batch_size × data-parallel size = 2×4 = 8"),
    (["parallel.pipeline_model_parallel_size=4", "parallel.virtual_pipeline_model_parallel_size=1",
      "training.global_batch_size=4", "training.micro_batch_size=2"], 4, "training.global_batch_size",
     "multiple of PP=4, got 2"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "training.global_batch_size=6", "training.micro_batch_size=2"], 2, "training.global_batch_size",
     "multiple of PP=2, got 3"),
    (["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true", "model.seq_length=130"], 4,
     "model.seq_length", "130 is not divisible by TP=4"),
    (["model.num_layers=0"], 1, "model.num_layers", "must be positive, got 0"),
    (["training.micro_batch_size=-2"], 1, "training.micro_batch_size", "must be positive, got -2"),
    (["parallel.tensor_model_parallel_size=0"], 1, "parallel.tensor_model_parallel_size", "must be positive"),
    (["optimizer.lr=-1"], 1, "optimizer.lr", "must not be negative"),
    (["model.dropout=1.5"], 1, "model.dropout", "must be in [0, 1)"),
    (["model.normalization=batchnorm"], 1, "model.normalization", "'batchnorm' is not one of layernorm, rmsnorm"),
    (["parallel.pipeline_schedule=zigzag"], 1, "parallel.pipeline_schedule", "is not one of"),
    (["training.precision=fp8"], 1, "training.precision", "is not one of fp32, bf16, fp16"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_schedule=interleaved"], 2,
     "parallel.pipeline_schedule", "interleaved needs parallel.virtual_pipeline_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "parallel.pipeline_schedule=1f1b"], 2, "parallel.pipeline_schedule", "1f1b cannot run virtual stages"),
    (["model.position_embedding=rope", "model.hidden_size=12", "model.num_attention_heads=4"], 1,
     "model.position_embedding", "even head dimension"),
    (["model.ffn_hidden_size=130", "parallel.tensor_model_parallel_size=4"], 4, "model.ffn_hidden_size",
     "130 is not divisible by TP=4"),
    (["optimizer.min_lr=1.0", "optimizer.lr=0.1"], 1, "optimizer.min_lr", "exceeds optimizer.lr"),
    (["checkpoint.async_save=true"], 1, "checkpoint.async_save", "needs checkpoint.save"),
    (["model.qk_layernorm=true", "model.qk_layernorm_mode=projection"], 1, "model.qk_layernorm_mode",
     "projection normalises with RMSNorm only"),
    (["model.qk_layernorm_mode=whole"], 1, "model.qk_layernorm_mode", "'whole' is not one of head, projection"),
    (["model.sliding_window=64", "model.seq_length=128"], 1, "model.sliding_window",
     "64 is shorter than model.seq_length=128"),
    (["model.hf_model_type=deepseek_v3"], 1, "model.hf_model_type", "is not one of null, llama, mistral"),
]


@pytest.mark.parametrize("overrides,world,key,fragment", BAD, ids=[b[2] + ":" + b[0][-1] for b in BAD])
def test_validate_rejects(overrides, world, key, fragment):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    message = str(err.value)
    assert err.value.key == key
    assert message.startswith(key) and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["model.hiden_size=64"], "hiden_size"),  # a misspelt key
        (["+model.foo=1"], "foo"),  # an unknown key added
        (["model.num_layers=four"], "num_layers"),  # a wrong type
        (["model=gpt_giant"], "gpt_giant"),  # a missing group option
    ],
)
def test_unknown_keys_and_types_are_one_line_errors(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_plain_dict():
    with pytest.raises(ConfigError, match="bogus"):
        validate({"model": {"bogus": 1}}, world_size=1)


def test_sequence_parallel_without_tp_warns_and_is_ignored():
    cfg = load_config(["parallel.sequence_parallel=true"])
    with pytest.warns(UserWarning, match="sequence_parallel is ignored"):
        dims = validate(cfg, world_size=2)
    assert dims.sequence_parallel is False


def test_vocab_padding():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 4) == 50688
    assert padded_vocab_size(8000, 128, 2) == 8192
