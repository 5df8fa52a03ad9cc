"""The attention features the HF families need, in TP 2 (sequence parallel) × CP 2 × PP 2 against one
rank (3 iterations): in float32 losses, gradient norms and validation loss within 1e-6, final
parameters within 1e-5; in bf16 (both models' features at once) losses within 1e-4 and gradient norms
within 1e-3 (as in the CP bf16 test, parameters are not compared: the QKV bias starts at zero, and
where bf16 rounding turns a near-zero gradient's sign, Adam moves an element by ±lr either way).

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
    "qkv_bias_projection_norm_bf16": LLAMA + ["model.add_qkv_bias=true", "model.qk_layernorm=true",
                                             "model.qk_layernorm_mode=projection", "training.precision=bf16"],
}
# (losses and validation, gradient norm, parameters or None): relative to the largest value
TOLERANCES = {"fp32": (LOSS_TOLERANCE, LOSS_TOLERANCE, PARAM_TOLERANCE), "bf16": (1e-4, 1e-3, None)}
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
    loss_tol, norm_tol, param_tol = TOLERANCES["bf16" if model.endswith("bf16") else "fp32"]
    assert max(errors["loss"], errors["valid"]) <= loss_tol and errors["grad_norm"] <= norm_tol
    assert param_tol is None or param_err <= param_tol
