"""Tiny HuggingFace models that transformers itself builds and saves (random weights), with a byte-level
BPE tokenizer: the inputs of the import/export and generate tests, one per family.

Every LLaMA-style family has GQA (4 query heads, 2 KV heads). ``llama``: head_dim 32 ≠ hidden/heads,
Llama-3 RoPE scaling with an original context of 32 positions (so positions 128-255 are far beyond
it), θ = 500,000, tied embeddings. ``qwen2``: q, k, v biases (HF starts them at zero; here random, so
a bias dropped or put on the wrong head changes the result), θ = 10⁶, tied. ``qwen3``: per-head q/k
RMSNorm with random weights around 2 (sharper attention: a missing or misplaced norm changes the
result), head_dim 32, untied. ``mistral``: a sliding window of exactly the test's sequence (accepted:
it spans the training sequence), untied. ``gpt2``: 256 learned positions. The MoE families
(``MOE_FAMILIES``) have 4 experts, top-2, routers doubled (sharper routing: a wrong score function,
renormalisation or expert order changes the result): ``mixtral`` (renormalised top-k), ``qwen3_moe``
(per-head q/k norm, top-k renormalised: norm_topk_prob), ``qwen2_moe`` (q, k, v biases, the top-k
probabilities as they are, a gated shared expert, layer 0 dense: mlp_only_layers [0]) and
``olmoe`` (q/k norm over the whole projection). Vocabulary 300, which megatron_lite pads (to 384 or
512). initializer_range 0.3 makes greedy decoding vary instead of repeating one token. Also the
helpers that train a checkpoint's first step on 4 ranks (``first_step_loss``, ``tiny_dataset``).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
SEQ = 256
EOD = "<|endoftext|>"
TEXT = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep."]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
FAMILIES = ("llama", "gpt2", "qwen2", "qwen3", "mistral", *MOE_FAMILIES)
_MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=32768, tie_word_embeddings=False)
_LLAMA_STYLE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, initializer_range=0.3, bos_token_id=0, eos_token_id=0)
_SETTINGS = {
    "llama": dict(head_dim=32, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                  tie_word_embeddings=True),
    "qwen2": dict(max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "mistral": dict(max_position_embeddings=32768, sliding_window=SEQ, rope_theta=1e6, tie_word_embeddings=False),
    "mixtral": dict(_MOE, num_local_experts=4, intermediate_size=32, rope_theta=1e6),
    "qwen3_moe": dict(_MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32),
    "olmoe": dict(_MOE, num_experts=4, intermediate_size=32, pad_token_id=None),
    "qwen2_moe": dict(_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      mlp_only_layers=[0]),
}


def hf_config(arch: str):
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0,
        )
    return transformers.AutoConfig.for_model(arch, **{**_LLAMA_STYLE, **_SETTINGS[arch]})


def save_hf_model(arch: str, directory: Path):
    """Build, perturb (HF sets norms to ones and zeros, biases to zeros) and save the model and
    tokenizer; returns the model in eval mode with eager attention."""
    import tokenizers
    import transformers

    torch.manual_seed(FAMILIES.index(arch))
    model = perturb(transformers.AutoModelForCausalLM.from_config(hf_config(arch)).eval())
    model.save_pretrained(directory)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOD], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 10, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD).save_pretrained(directory)
    model.config._attn_implementation = "eager"
    return model


def random_tokens(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def perturb(model):
    """HF starts norms at ones (and zeros), biases at zero: random values make a dropped or misplaced
    norm or bias visible. q/k norms around 2 sharpen the attention. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "q_norm" in name or "k_norm" in name:
                p.mul_(2.0)
            if "_proj.bias" in name:
                p.add_(0.5 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):  # the router
                p.mul_(2.0)
    return model


def tiny_dataset(prefix: Path, seq: int) -> str:
    """An indexed dataset of 8 random documents of ``seq`` tokens (a trainer needs one to start)."""
    import numpy as np

    from megatron_lite.data.indexed_dataset import IndexedDatasetWriter

    writer = IndexedDatasetWriter(prefix, np.uint16)
    for k in range(8):
        writer.add_document(random_tokens((seq,), 100 + k).numpy())
    writer.finalize()
    return str(prefix)


def first_step_loss(ckpt: str, data_prefix: str, tokens: torch.Tensor, save: str, layout: list[str], far: int) -> float:
    """On 4 ranks: the checkpoint ``ckpt`` in TP 2 (SP) × ``layout`` (PP 2, or EP 2 over DP 2), one
    training step on ``tokens`` [2, s + 1] with the loss on positions >= ``far`` (learning rate 0),
    saved to ``save`` in that layout; returns the reported loss (NaN off the logging rank)."""
    from omegaconf import OmegaConf

    from megatron_lite.checkpoint.storage import find_checkpoint
    from megatron_lite.config import to_config, validate
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training.trainer import Trainer

    stored = OmegaConf.load(find_checkpoint(ckpt).path / "config.yaml")
    overrides = OmegaConf.from_dotlist([
        "parallel.tensor_model_parallel_size=2", *layout, "parallel.sequence_parallel=true",
        "training.micro_batch_size=1", "training.global_batch_size=2",
        "training.train_iters=1", "training.eval_iters=0", f"checkpoint.load={ckpt}", f"data.paths=[{data_prefix}]",
        "data.split=1,0,0", "optimizer.lr=0.0", "optimizer.min_lr=0.0", f"checkpoint.save={save}",
    ])
    cfg = to_config(OmegaConf.merge(stored, overrides))
    dims = validate(cfg, 4)
    state = ParallelState.from_dims(dims)
    trainer = Trainer(cfg, dims, state)
    assert trainer.resume()
    mask = torch.zeros(tokens.shape[1] - 1)
    mask[far:] = 1.0
    trainer.train_data = [{"tokens": t[:-1], "labels": t[1:], "loss_mask": mask} for t in tokens]
    loss = trainer.train_step()["loss"]
    trainer.checkpointer.finish(trainer.iteration)
    state.destroy()
    return loss
