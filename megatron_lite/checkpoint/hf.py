"""HuggingFace interop for checkpoints, with the weight-name mapping of ``megatron_lite.model.hf``.

    python -m megatron_lite.checkpoint.hf export --load DIR [--iteration N] --output HF_DIR [--max-shard-size 5GB]
    python -m megatron_lite.checkpoint.hf import --hf HF_DIR --output DIR [--seq-length N] [overrides ...]

export: a checkpoint (any layout it was saved in) -> a directory that ``transformers`` loads with
``AutoModelForCausalLM`` (the family the model was imported from, ``model.hf_model_type``, else the
first that fits its shape: ``model/hf.py``) and ``AutoTokenizer``: config.json (with bos/eos_token_id), generation_config.json (``generate`` stops
at end of document), the weights without vocabulary padding (model.safetensors, or shards of at most
``--max-shard-size`` with model.safetensors.index.json), tokenizer.json (a sentencepiece model is
converted to the ``tokenizers`` format, and copied as tokenizer.model too) and tokenizer_config.json.

import: a HF directory of a family ``model/hf.py`` declares (llama, mistral, qwen2, qwen3, gpt2, and
the MoE families mixtral, qwen3_moe, qwen2_moe, olmoe) -> a checkpoint at iteration 0 without optimizer state,
which training loads in any layout (``checkpoint.load=DIR``). config.json is read through
``transformers.AutoConfig``; a feature megatron_lite does not implement is refused in one line. The
HF tokenizer is copied into DIR/tokenizer/ and named in the stored config. ``--seq-length`` is the
length to train at (default: max_position_embeddings, at most 4096), not the model's limit. Hydra
overrides after the arguments set other keys of the stored config. An MoE import and export print
how HF's router_aux_loss_coef converts to model.moe.aux_loss_coeff (``model.hf.aux_loss_coeff_from_hf``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..config import Config, ConfigError, load_config, padded_vocab_size, to_config, to_yaml, validate
from ..data.errors import DataError
from ..data.tokenizer import BUNDLED_TOKENIZER, Tokenizer, build_tokenizer, canonical_type, load_tokenizer
from ..model import GPTChunk, build_gpt
from ..model.hf import (DEFAULT_IMPORT_SEQ_LENGTH, aux_loss_note, from_hf, hf_config, hf_keys,  # noqa: F401
                        model_settings, rope_settings, to_hf)
from .manager import save_weights
from .sharded import ShardedState, persistent_buffers
from .storage import CONFIG, CheckpointError, find_checkpoint, read_tensors

DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# Our vocabulary-sized tensors: export writes only the tokenizer's rows.
_VOCAB_TENSORS = ("embedding.weight", "output")
# Buffers some HF versions save with the weights; they are derived, not learned.
_DERIVED_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def require(package: str):
    """Import ``package`` (transformers, safetensors, tokenizers) or raise one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise CheckpointError(
            f"HuggingFace import/export needs the {package} package: pip install 'megatron-lite[hf]'"
        ) from None


def load_model(load: str | Path, iteration: Optional[int] = None) -> tuple[Config, GPTChunk]:
    """The saved config and the whole model (one chunk, TP = 1, fp32) of a checkpoint, in eval mode.

    ``cfg.model.vocab_size`` is the tokenizer's vocabulary (the model's rows beyond it are padding).
    """
    info = find_checkpoint(load, iteration)
    if info is None:
        raise CheckpointError(f"{Path(load) / 'latest_checkpointed_iteration.txt'}: missing; pass --iteration")
    cfg = to_config(OmegaConf.create((info.path / CONFIG).read_text()))
    cfg.model.vocab_size = info.meta["model"]["vocab_size"]
    model = build_gpt(cfg.model, info.meta["padded_vocab_size"], unpadded_vocab_size=cfg.model.vocab_size).float()
    sharded = ShardedState(list(model.named_parameters()), named_buffers=persistent_buffers([model]))
    with warnings.catch_warnings():  # one process without a process group is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        read_tensors(sharded.model_targets(info), info)
    sharded.finish_load()
    return cfg, model.eval()


# Export --------------------------------------------------------------------------------------------
def export(
    load: str | Path, output: str | Path, iteration: Optional[int] = None, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write ``output`` as a HF model directory; returns it."""
    transformers = require("transformers")
    max_shard_bytes = parse_size(max_shard_size)
    cfg, model = load_model(load, iteration)
    vocab = cfg.model.vocab_size
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach()[:vocab] if k in _VOCAB_TENSORS else v.detach() for k, v in model.state_dict().items()}
    hf_state = to_hf(state, cfg.model)  # a tied lm_head is left out: HF ties it to the embedding on load
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    _export_tokenizer(tokenizer, cfg.data.tokenizer.model, cfg.model.seq_length, output)  # refusals first
    # Documents are separated by eod alone (no bos is ever inserted), so eod is bos as well (GPT-2's way).
    config = hf_config(cfg.model, vocab, bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod)
    config.to_json_file(str(output / "config.json"))
    if cfg.model.moe.num_experts is not None:
        print(aux_loss_note(cfg.model, config.router_aux_loss_coef))
    transformers.GenerationConfig(
        bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad
    ).save_pretrained(str(output))
    save_safetensors(hf_state, output, max_shard_bytes)
    return output


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``10KB`` (powers of 1000, as transformers reads them) or a number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise CheckpointError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB or a number of bytes")
    unit = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[(match.group(2) or "").upper()]
    return int(float(match.group(1)) * unit)


def save_safetensors(state: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> list[Path]:
    """``state`` as model.safetensors, or, above ``max_shard_bytes``, as model-0000k-of-0000n.safetensors
    shards (consecutive tensors, none split) with model.safetensors.index.json; returns the files."""
    from_safetensors = require("safetensors.torch")
    for stale in output.glob("model*.safetensors*"):
        stale.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for name, shard in zip(names, shards):
        from_safetensors.save_file(shard, str(output / name), metadata={"format": "pt"})
    return [output / name for name in names]


def sentencepiece_to_tokenizers(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece BPE model (byte
    fallback, the ▁ word prefix), as HF's LLaMA tokenizers do; merges are ranked by the merged piece's
    score, which is sentencepiece's merge order. (One difference: the text "</s>" becomes the control
    token there, and stays characters in sentencepiece.)"""
    import sentencepiece as spm

    tokenizers = require("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]
    if any(sp.GetScore(i) != int(sp.GetScore(i)) for i in range(n)):  # BPE scores are −(merge rank)
        raise CheckpointError(f"{model_path}: a unigram sentencepiece model; HF export converts BPE models only")
    merges = []
    for i in range(n):
        if i in special or sp.IsByte(i) or sp.IsUnused(i):
            continue
        piece = sp.IdToPiece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in merges],
        unk_token=sp.IdToPiece(sp.unk_id()), byte_fallback=True, fuse_unk=True,
    ))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(sp.IdToPiece(i), special=True, normalized=False) for i in special])
    return tok


def _export_tokenizer(tokenizer: Tokenizer, model_path: Optional[str], seq_length: int, output: Path) -> None:
    """tokenizer.json (+ tokenizer.model for sentencepiece) and tokenizer_config.json for AutoTokenizer;
    ``model_path``: data.tokenizer.model (None: the bundled sentencepiece model)."""
    if tokenizer.kind == "SentencePieceTokenizer":
        source = Path(model_path or BUNDLED_TOKENIZER)
        hf_tok = sentencepiece_to_tokenizers(source)
        shutil.copyfile(source, output / "tokenizer.model")
    elif hasattr(tokenizer, "backend"):  # HuggingFaceTokenizer, GPT2BPETokenizer
        hf_tok = tokenizer.backend
    else:
        raise CheckpointError(f"data.tokenizer.type={tokenizer.kind}: HF export writes sentencepiece and "
                              "tokenizers-library tokenizers only; export a tokenizer.json separately")
    hf_tok.save(str(output / "tokenizer.json"))
    eod, pad = hf_tok.id_to_token(tokenizer.eod), hf_tok.id_to_token(tokenizer.pad)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_length, "bos_token": eod,
        "eos_token": eod, "pad_token": pad, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (output / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


# Import --------------------------------------------------------------------------------------------
def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    transformers = require("transformers")
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir / 'config.json'}: missing; is this a HF model directory?")
    try:
        return transformers.AutoConfig.from_pretrained(str(hf_dir)).to_dict()
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{hf_dir / 'config.json'}: transformers cannot read it ({first})") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files (the index's, else every *.safetensors), as float32."""
    safetensors = require("safetensors.torch")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in hf_dir.glob("*.bin")]
        hint = f" ({', '.join(pickled)} would need pickle: save it with safe_serialization=True)" if pickled else ""
        raise CheckpointError(f"{hf_dir}: no *.safetensors files{hint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (named by {index.name})")
        state.update({k: v.float() for k, v in safetensors.load_file(str(file)).items()})
    return state


def _hf_tokenizer(hf_dir: Path) -> Optional[tuple[str, str]]:
    """(data.tokenizer.type, what data.tokenizer.model names in the copy) of the HF directory's
    tokenizer: the directory for a tokenizer.json (its tokenizer_config.json names the eos), a lone
    sentencepiece tokenizer.model; None without either."""
    if (hf_dir / "tokenizer.json").is_file():
        return "HuggingFaceTokenizer", ""
    if (hf_dir / "tokenizer.model").is_file():
        return "SentencePieceTokenizer", "tokenizer.model"
    return None


def import_(
    hf_dir: str | Path, output: str | Path, overrides: Sequence[str] = (), seq_length: Optional[int] = None
) -> Path:
    """Write a checkpoint (iteration 0, model only) of the HF model in ``hf_dir``; returns its directory."""
    hf_dir, output = Path(hf_dir), Path(output)
    hf = _read_hf_config(hf_dir)
    preset, keys = model_settings(hf, seq_length)
    model_keys = [f"model.{k}={json.dumps(v)}" for k, v in keys.items()]
    tokenizer = _hf_tokenizer(hf_dir)  # copied to output/tokenizer/ once the checkpoint is written
    copied = None if tokenizer is None else (output / "tokenizer" / tokenizer[1]).resolve()
    tokenizer_keys = [] if tokenizer is None else [f"data.tokenizer.type={tokenizer[0]}", f"data.tokenizer.model={copied}"]
    cfg = load_config([f"model={preset}", *model_keys, *tokenizer_keys, *overrides])
    validate(cfg, 1)
    if "moe.aux_loss_coeff" in keys:
        print(aux_loss_note(cfg.model, hf.get("router_aux_loss_coef") or 0.0))
    # An unusable tokenizer fails now, in one line (the HF one is read where it is still).
    if copied is not None and cfg.data.tokenizer.model == str(copied):
        load_tokenizer(cfg.data.tokenizer.type, hf_dir / tokenizer[1])
    else:
        build_tokenizer(cfg.data.tokenizer)
    hf_state = read_hf_weights(hf_dir)
    try:
        ours = from_hf(hf_state, cfg.model)
    except KeyError as err:
        raise CheckpointError(f"{hf_dir}: tensor {err.args[0]} is missing from the safetensors files") from None
    unused = set(hf_state) - hf_keys(cfg.model) - {"lm_head.weight"}
    unused = sorted(k for k in unused if not k.endswith(_DERIVED_BUFFERS))
    if unused:
        raise CheckpointError(f"{hf_dir}: tensor {unused[0]} has no counterpart in megatron_lite's model")
    if "position_embedding" in ours:  # learned positions: the first seq_length rows
        ours["position_embedding"] = ours["position_embedding"][: cfg.model.seq_length]
    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1)
    model = build_gpt(cfg.model, padded, unpadded_vocab_size=vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()[: ours[name].shape[0]].copy_(ours[name])  # extra vocabulary rows: zero padding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        path = save_weights(output, 0, list(model.named_parameters()), cfg.model, vocab, padded, to_yaml(cfg))
    if tokenizer is not None:
        (output / "tokenizer").mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, output / "tokenizer" / name)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-lite-hf", description="HuggingFace import/export")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> HF model directory")
    exp.add_argument("--load", required=True, help="checkpoint directory (checkpoint.save of the run)")
    exp.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    exp.add_argument("--output", required=True, help="HF model directory to write")
    exp.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                     help=f"largest safetensors file (default {DEFAULT_MAX_SHARD_SIZE}); beyond it, shards + index")
    imp = sub.add_parser("import", help="HF model directory -> checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    imp.add_argument("--output", required=True, help="checkpoint directory to write (load it with checkpoint.load)")
    imp.add_argument("--seq-length", type=int, default=None,
                     help=f"training sequence length (default: the model's limit, at most {DEFAULT_IMPORT_SEQ_LENGTH})")
    imp.add_argument("overrides", nargs="*", help="Hydra overrides for the stored config")
    args = parser.parse_args(argv)
    if args.command == "export":
        return write_or_refuse(lambda: export(args.load, args.output, args.iteration, args.max_shard_size))
    return write_or_refuse(lambda: import_(args.hf, args.output, args.overrides, args.seq_length))


def write_or_refuse(write: Callable[[], Path]) -> int:
    """A command's exit code: 0 after printing ``wrote PATH``, 2 after one ``error:`` line."""
    try:
        path = write()
    except (CheckpointError, ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
