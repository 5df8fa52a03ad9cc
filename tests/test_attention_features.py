"""The attention features the HF families need, in TP 2 (sequence parallel) × CP 2 × PP 2 against one
rank (float32, 3 iterations): losses, gradient norms and validation loss within 1e-6, final
parameters within 1e-5.

- ``model.add_qkv_bias`` with ``model.qk_layernorm`` per head (Qwen2's biases, Qwen3's norm): the
  bias is split over TP with the heads; the norm weight [d] sees only this rank's heads, so its
  gradient is summed over TP;
- ``model.qk_layernorm_mode=projection`` (OLMoE): RMSNorm over the whole q and k projection, whose
  mean square is summed over TP and whose weight is split over TP.
"""

import pytest
from test_context_parallel import COMMON, LOSS_TOLERANCE, PARAM_TOLERANCE
from test_training import _train, read_metrics, rel

LLAMA = ["model=llama_tiny", "model.num_query_groups=2", "model.ffn_hidden_size=64"] + COMMON
MODELS = {
    "qkv_bias_head_norm": LLAMA + ["model.add_qkv_bias=true", "model.qk_layernorm=true"],
    "projection_norm": LLAMA + ["model.qk_layernorm=true", "model.qk_layernorm_mode=projection"],
}
LAYOUT = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
          "parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]


@pytest.mark.parametrize("model", list(MODELS))
def test_tp_sp_cp_pp_match_single_rank(ranks, tmp_path, model):
    reference = ranks(1).run(_train, MODELS[model] + [f"logging.dir={tmp_path / 'one'}"])[0]
    params = ranks(8).run(_train, MODELS[model] + LAYOUT + [f"logging.dir={tmp_path / 'eight'}"])[0]
    (ref_train, ref_valid), (train, valid) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
    assert params.keys() == reference.keys() and "layers.1.attention.k_norm.weight" in params
    errors = {
        "loss": rel([r["loss"] for r in train], [r["loss"] for r in ref_train]),
        "grad_norm": rel([r["grad_norm"] for r in train], [r["grad_norm"] for r in ref_train]),
        "valid": rel([r["loss"] for r in valid], [r["loss"] for r in ref_valid]),
    }
    param_err = max(rel(params[k], reference[k]) for k in params)
    print(f"{model}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f", params {param_err:.1e}")
    assert max(errors.values()) <= LOSS_TOLERANCE and param_err <= PARAM_TOLERANCE
