"""Dense-to-MoE upcycling (megatron_lite/checkpoint/upcycle.py): the upcycled model's logits at step 0
equal the dense model's (1e-6), with whole copies of the MLP (G = 1) and with granular upcycling (each
copy split into G = 2 finer experts, top-k and scaling arranged to match), with dense first layers
and sigmoid routing; the upcycled checkpoint trains in TP 2 × EP 2 (SP) with the dense model's loss;
what upcycling cannot keep equal is refused in one line."""

import pytest
import torch

from megatron_lite.checkpoint.hf import load_model
from megatron_lite.checkpoint.manager import save_weights
from megatron_lite.checkpoint.upcycle import main
from megatron_lite.config import load_config, to_yaml
from megatron_lite.model import build_gpt

VOCAB = 256


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A random dense Llama-style checkpoint (2 layers, SwiGLU ffn 96)."""
    path = tmp_path_factory.mktemp("dense")
    cfg = load_config(["model=llama_tiny", "model.num_layers=2", "model.seq_length=32", "model.ffn_hidden_size=96",
                       f"model.vocab_size={VOCAB}", "model.init_std=0.2"])
    torch.manual_seed(0)
    model = build_gpt(cfg.model, VOCAB)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_weights(path, 0, list(model.named_parameters()), cfg.model, VOCAB, VOCAB, to_yaml(cfg))
    return path


CASES = {
    "copies": (["model.moe.num_experts=4", "model.moe.router_topk=2"], 1),
    "granular": (["model.moe.num_experts=8", "model.moe.router_topk=4"], 2),
    "granular_sigmoid_first_dense": (["model.moe.num_experts=6", "model.moe.router_topk=6", "model.moe.score_function=sigmoid",
                                      "model.moe.first_dense_layers=1"], 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upcycled_logits_equal_the_dense_ones(dense, tmp_path, case):
    overrides, granularity = CASES[case]
    assert main(["--load", str(dense), "--output", str(tmp_path / "moe"), "--granularity", str(granularity),
                 *overrides]) == 0
    _, before = load_model(dense)
    cfg, after = load_model(tmp_path / "moe")
    moe = cfg.model.moe
    assert moe.ffn_hidden_size == 96 // granularity and moe.topk_scaling_factor == (granularity if granularity > 1 else None)
    experts = after.get_submodule("layers.1.mlp.experts")
    assert experts.fc1.weight.shape[0] == moe.num_experts
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = before(ids), after(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{case}: upcycled vs dense logits, max error / max |logit| {err:.1e}")
    assert err < 1e-6
    if case == "copies":  # a Llama's upcycled checkpoint exports as a Mixtral
        from megatron_lite.model.hf import family

        assert family(cfg.model).model_type == "mixtral"
    with torch.no_grad():
        experts.fc2.weight[0].mul_(2.0)  # the test can fail: one expert changed changes the logits
        assert ((after(ids) - ref).abs().max() / ref.abs().max()).item() > 1e-3


def test_upcycled_checkpoint_trains_in_tp2_ep2_with_the_dense_loss(ranks, dense, tmp_path):
    import torch.nn.functional as F
    from hf_models import first_step_loss, tiny_dataset

    overrides, granularity = CASES["granular"]
    assert main(["--load", str(dense), "--output", str(tmp_path / "moe"), "--granularity", str(granularity),
                 *overrides]) == 0
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = load_model(dense)[1](tokens[:, :-1])
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    losses = ranks(4).run(first_step_loss, str(tmp_path / "moe"), tiny_dataset(tmp_path / "data", 32), tokens,
                          str(tmp_path / "saved"), ["parallel.expert_model_parallel_size=2"], 0)
    ours = next(x for x in losses if x == x)
    print(f"dense loss {reference:.6f}, upcycled (G = 2) in TP2xEP2 {ours:.6f}")
    assert abs(ours - reference) < 1e-5 * reference


@pytest.mark.parametrize("overrides,granularity,message", [
    (["model.moe.num_experts=4", "model.moe.pre_softmax=true"], 1, "model.moe.pre_softmax: the chosen probabilities do not sum to one"),
    (["model.moe.num_experts=4", "model.moe.router_topk=1"], 2, "model.moe.router_topk: 1 is not a multiple of --granularity 2"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=1.0"], 1, "model.moe.capacity_factor: dropped tokens"),
    ([], 1, "model.moe.num_experts: is required"),
])
def test_what_upcycling_cannot_keep_equal_is_one_line(dense, tmp_path, capsys, overrides, granularity, message):
    assert main(["--load", str(dense), "--output", str(tmp_path / "moe"), "--granularity", str(granularity), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "moe").exists()
