"""``megatron_lite.generate``: greedy decoding with the KV cache equals HF ``generate`` (greedy) on the
exported model, token for token, stopping where HF stops, for every family of tests/hf_models.py; the
CLI continues a text prompt as HF does
with the exported tokenizer; a prompt fed in pieces through the cache gives the one-shot logits."""

import pytest
import torch
from hf_models import FAMILIES, SEQ, VOCAB, random_tokens, save_hf_model

transformers = pytest.importorskip("transformers")

from megatron_lite.checkpoint.hf import load_model, main  # noqa: E402
from megatron_lite.generate import generate  # noqa: E402
from megatron_lite.model.transformer import KVCache  # noqa: E402

NEW_TOKENS = 48
# The decoding mechanics (cache, CLI, sampling) are family-independent: tested on these two.
MECHANICS = pytest.mark.parametrize("exported", ["llama", "gpt2"], indirect=True)


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """(checkpoint imported from a HF model, that checkpoint exported again, loaded by transformers)."""
    root = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, root / "hf")
    assert main(["import", "--hf", str(root / "hf"), "--output", str(root / "ckpt"), "--seq-length", str(SEQ)]) == 0
    assert main(["export", "--load", str(root / "ckpt"), "--output", str(root / "export")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(root / "export").eval()
    return root / "ckpt", root / "export", hf_model


def _hf_greedy(hf_model, prompt, **kwargs):
    ids = torch.tensor([prompt])  # an explicit mask: HF would mask prompt tokens equal to pad_token_id
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("exported", FAMILIES, indirect=True)
def test_greedy_equals_hf_generate_token_for_token(exported):
    ckpt, _, hf_model = exported
    _, model = load_model(ckpt)
    prompt = random_tokens((40,), 5).tolist()
    ours = generate(model, prompt, NEW_TOKENS, greedy=True)
    reference = _hf_greedy(hf_model, prompt, eos_token_id=None, pad_token_id=0)
    print(f"{model.cfg.hf_model_type}: {sum(a == b for a, b in zip(ours, reference))}/{len(reference)} tokens "
          f"equal, {len(set(ours))} distinct")
    assert ours == reference and len(set(ours)) > 10
    stop = ours[20]  # stop at a token it produces: both end there, the stop token included
    assert generate(model, prompt, NEW_TOKENS, stop_ids=(stop,), greedy=True) == _hf_greedy(
        hf_model, prompt, eos_token_id=stop, pad_token_id=0) == ours[: ours.index(stop) + 1]


@MECHANICS
def test_cli_continues_a_text_prompt_like_hf(exported, capsys):
    from megatron_lite.generate import main as generate_main

    ckpt, export_dir, hf_model = exported
    prompt = "In the beginning"
    assert generate_main(["--load", str(ckpt), "--prompt", prompt, "--greedy", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    reference = _hf_greedy(hf_model, ids)  # stops at the exported generation_config's eos (end of document)
    if reference[-1] == tokenizer.eos_token_id:
        reference = reference[:-1]
    assert out.rstrip("\n") == tokenizer.decode(ids + reference)
    assert "generate: " in err and "tokens in" in err


@MECHANICS
def test_prompt_in_pieces_through_the_cache_gives_one_shot_logits(exported):
    _, model = load_model(exported[0])
    ids = random_tokens((2, 64), 9)
    with torch.no_grad():
        whole = model(ids)
        caches = [KVCache() for _ in model.layers]
        pieces = torch.cat([model(ids[:, a:b], kv_caches=caches) for a, b in ((0, 30), (30, 31), (31, 64))], dim=1)
    assert caches[0].length == 64
    pieces, whole = pieces[..., :VOCAB], whole[..., :VOCAB]  # the padding rows are -inf in both
    assert ((pieces - whole).abs().max() / whole.abs().max()).item() < 1e-5


@MECHANICS
def test_sampling_controls_and_bad_input(exported, capsys):
    from megatron_lite.generate import main as generate_main

    ckpt = str(exported[0])
    _, model = load_model(ckpt)
    prompt = random_tokens((10,), 11).tolist()
    greedy = generate(model, prompt, 16, greedy=True)
    assert generate(model, prompt, 16, top_k=1, temperature=0.7) == greedy  # top-1 sampling is greedy
    sampled = [generate(model, prompt, 16, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]  # the seed decides
    assert len(generate(model, prompt, 10_000, greedy=True)) == SEQ - len(prompt)  # stops at seq_length
    for argv, message in ((["--temperature", "0"], "--temperature must be positive"),
                          (["--prompt", "word " * 400], f"the model's seq_length is {SEQ}")):
        assert generate_main(["--load", ckpt, "--prompt", "x", *argv]) == 2
        assert message in capsys.readouterr().err
