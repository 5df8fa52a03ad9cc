"""HuggingFace interop for checkpoints, with the weight-name mapping of ``megatron_lite.model.hf``.

    python -m megatron_lite.checkpoint.hf export --load DIR [--iteration N] --output HF_DIR
    python -m megatron_lite.checkpoint.hf import --hf HF_DIR --output DIR [overrides ...]

export: a checkpoint (any layout it was saved in) -> config.json + model.safetensors that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as LlamaForCausalLM (LLaMA-style models)
or GPT2LMHeadModel (GPT-2-style), plus the tokenizer (a sentencepiece model is copied as
tokenizer.model, a HF tokenizer.json as is, with a tokenizer_config.json). The vocabulary is the
checkpoint's padded one.

import: a HF directory of either architecture -> a checkpoint at iteration 0 without optimizer state,
which training loads in any layout (``checkpoint.load=DIR``; set ``model.vocab_size`` to the HF
vocabulary). Hydra overrides after the arguments set non-shape keys of the stored config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..config import Config, ConfigError, load_config, padded_vocab_size, to_config, to_yaml
from ..data.tokenizer import BUNDLED_TOKENIZER
from ..model import GPTChunk, build_gpt
from ..model.hf import family, from_hf, hf_config, to_hf
from .manager import model_signature
from .sharded import ShardedState
from .storage import CONFIG, CheckpointError, find_checkpoint, read_tensors, write_checkpoint

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def load_model(load: str | Path, iteration: Optional[int] = None) -> tuple[Config, GPTChunk]:
    """The saved config and the whole model (one chunk, TP = 1, fp32) of a checkpoint."""
    info = find_checkpoint(load, iteration)
    if info is None:
        raise CheckpointError(f"{Path(load) / 'latest_checkpointed_iteration.txt'}: missing; pass --iteration")
    cfg = to_config(OmegaConf.create((info.path / CONFIG).read_text()))
    model = build_gpt(cfg.model, info.meta["padded_vocab_size"]).float()
    sharded = ShardedState(list(model.named_parameters()))
    read_tensors(sharded.model_targets(info), info)
    sharded.finish_load()
    return cfg, model


def export(load: str | Path, output: str | Path, iteration: Optional[int] = None) -> Path:
    """Write ``output`` as a HF model directory; returns it."""
    cfg, model = load_model(load, iteration)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf({k: v.detach() for k, v in model.state_dict().items()}, cfg.model)
    if cfg.model.tie_embeddings:
        hf_state.pop("lm_head.weight")  # HF ties it to the input embedding on load
    config = hf_config(cfg.model, model.embedding.weight.shape[0])
    config.architectures = [ARCHITECTURES[family(cfg.model)]]
    config.to_json_file(str(output / "config.json"))
    from safetensors.torch import save_file

    save_file(hf_state, str(output / "model.safetensors"), metadata={"format": "pt"})
    _export_tokenizer(cfg, output)
    return output


def _export_tokenizer(cfg: Config, output: Path) -> None:
    tok = cfg.data.tokenizer
    if tok.type == "sentencepiece":
        shutil.copyfile(tok.model or BUNDLED_TOKENIZER, output / "tokenizer.model")
        settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}
    else:
        shutil.copyfile(tok.model, output / "tokenizer.json")
        settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    settings["model_max_length"] = cfg.model.seq_length
    (output / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def model_overrides(hf: dict) -> list[str]:
    """Hydra overrides describing the model of a HF config.json (LLaMA or GPT-2)."""
    kind = hf.get("model_type")
    if kind == "llama":
        keys = {
            "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
            "num_attention_heads": hf["num_attention_heads"],
            "num_query_groups": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "ffn_hidden_size": hf["intermediate_size"], "seq_length": hf["max_position_embeddings"],
            "norm_epsilon": hf["rms_norm_eps"], "rope_theta": hf.get("rope_theta", 10000.0),
            "tie_embeddings": hf.get("tie_word_embeddings", False),
        }
        return ["model=llama_tiny"] + [f"model.{k}={json.dumps(v)}" for k, v in keys.items()]
    if kind == "gpt2":
        keys = {
            "num_layers": hf["n_layer"], "hidden_size": hf["n_embd"], "num_attention_heads": hf["n_head"],
            "ffn_hidden_size": hf.get("n_inner") or 4 * hf["n_embd"], "seq_length": hf["n_positions"],
            "norm_epsilon": hf["layer_norm_epsilon"],
        }
        base = ["model=gpt_tiny", "model.num_query_groups=null"]
        return base + [f"model.{k}={json.dumps(v)}" for k, v in keys.items()]
    raise CheckpointError(f"model_type {kind!r} in config.json: import supports llama and gpt2")


def import_(hf_dir: str | Path, output: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Write a checkpoint (iteration 0, model only) of the HF model in ``hf_dir``; returns its directory."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise CheckpointError(f"{hf_dir / 'config.json'}: missing; is this a HF model directory?")
    hf = json.loads((hf_dir / "config.json").read_text())
    vocab = hf["vocab_size"]
    cfg = load_config([*model_overrides(hf), f"model.vocab_size={vocab}", *overrides])
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir}: no *.safetensors files")
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        hf_state.update(load_file(str(file)))
    ours = from_hf({k: v.float() for k, v in hf_state.items()}, cfg.model)
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1)
    model = build_gpt(cfg.model, padded)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()[: ours[name].shape[0]].copy_(ours[name])  # extra vocabulary rows: zero padding
    meta = {
        "trainer": {"iteration": 0, "consumed_samples": 0}, "model": model_signature(cfg.model, vocab),
        "padded_vocab_size": padded, "layout": {"tp": 1, "cp": 1, "pp": 1, "vpp": 1, "dp": 1},
    }
    tensors = ShardedState(list(model.named_parameters())).model_tensors()
    return write_checkpoint(tensors, meta, to_yaml(cfg), output, 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lite.checkpoint.hf")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> HF model directory")
    exp.add_argument("--load", required=True, help="checkpoint directory (checkpoint.save of the run)")
    exp.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    exp.add_argument("--output", required=True, help="HF model directory to write")
    imp = sub.add_parser("import", help="HF model directory -> checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    imp.add_argument("--output", required=True, help="checkpoint directory to write (load it with checkpoint.load)")
    imp.add_argument("overrides", nargs="*", help="Hydra overrides for the stored config")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            path = export(args.load, args.output, args.iteration)
        else:
            path = import_(args.hf, args.output, args.overrides)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
