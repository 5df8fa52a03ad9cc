"""The configuration schema and its validation.

The schema is a tree of dataclasses registered with Hydra's ConfigStore as ``megatron_lite_schema``;
``configs/config.yaml`` lists it first in its defaults, so every YAML file and command-line override is
type-checked against it and an unknown key is an error. ``validate(cfg, world_size)`` then checks the
combinations no type can express (divisibility, batch arithmetic, schedule constraints) before any
process group exists, and returns the derived ``ParallelDims`` that the rest of the code uses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import package_dir
from .pipeline import schedules, stages

CONFIG_DIR = package_dir("configs")


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` is one line naming the key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


# Each field's allowed values sit next to it, as dataclass metadata that ``_check_fields`` reads.
def choice(default: str, *others: str) -> Any:
    """A string field whose value must be ``default`` or one of ``others``."""
    return field(default=default, metadata={"choices": (default, *others)})


def positive(default: Any) -> Any:
    """A number that must be > 0 when set (None passes: it means "derive it")."""
    return field(default=default, metadata={"bound": "positive"})


def non_negative(default: Any) -> Any:
    """A number that must be >= 0 when set."""
    return field(default=default, metadata={"bound": "non_negative"})


@dataclass
class RopeScalingConfig:
    """Llama 3.x RoPE frequency scaling (HF ``rope_scaling`` / ``rope_parameters`` with
    ``rope_type: llama3``; the formula is in ``model/rotary.py``). ``type: null``: unscaled RoPE."""

    type: Optional[str] = choice(None, "llama3")  # type: ignore[arg-type]
    factor: float = positive(8.0)
    low_freq_factor: float = positive(1.0)
    high_freq_factor: float = positive(4.0)
    original_max_position_embeddings: int = positive(8192)  # the context length of pretraining


@dataclass
class MoEConfig:
    """Mixture of experts (megatron_lite/moe/, docs/moe.md): Megatron-LM's ``--moe-*`` options without
    the prefix. ``num_experts: null`` is a dense model and every other key is ignored."""

    num_experts: Optional[int] = positive(None)
    router_topk: int = positive(2)  # experts per token
    ffn_hidden_size: Optional[int] = positive(None)  # per expert; None: model.ffn_hidden_size
    # Which layers are MoE: layer i when i >= first_dense_layers and i % layer_freq == 0.
    layer_freq: int = positive(1)
    first_dense_layers: int = non_negative(0)
    shared_expert_ffn_hidden_size: Optional[int] = positive(None)  # None: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output × sigmoid(x·w)
    score_function: str = choice("softmax", "sigmoid")
    pre_softmax: bool = False  # softmax over all experts, then top-k (else top-k logits, then softmax)
    topk_scaling_factor: Optional[float] = positive(None)  # the chosen probabilities × this
    # Group-limited routing (DeepSeek-V3): experts in num_groups groups, tokens choose among the
    # group_topk best groups.
    num_groups: Optional[int] = positive(None)
    group_topk: Optional[int] = positive(None)
    load_balancing: str = choice("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
    aux_loss_coeff: float = non_negative(0.0)
    z_loss_coeff: Optional[float] = non_negative(None)
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the choice
    # only, moved by bias_update_rate · sign(mean count − count) after every step.
    expert_bias: bool = False
    bias_update_rate: float = non_negative(1e-3)
    capacity_factor: Optional[float] = positive(None)  # None: dropless
    drop_policy: str = choice("probs", "position")  # which tokens over capacity are dropped
    pad_to_capacity: bool = False  # every expert gets exactly its capacity (padding rows)
    token_dispatcher: str = choice("alltoall", "allgather")


@dataclass
class ModelConfig:
    """Shape and math of the GPT. Sizes are of the full (unsharded) model."""

    num_layers: int = positive(4)
    hidden_size: int = positive(128)
    num_attention_heads: int = positive(4)
    num_query_groups: Optional[int] = positive(None)  # None: one KV head per query head (MHA); 1: MQA
    ffn_hidden_size: Optional[int] = positive(None)  # None: 4 × hidden_size
    seq_length: int = positive(128)
    vocab_size: Optional[int] = positive(None)  # None: the tokenizer's size; padded to 128 × TP either way
    make_vocab_size_divisible_by: int = positive(128)
    normalization: str = choice("layernorm", "rmsnorm")
    norm_epsilon: float = non_negative(1e-5)
    activation: str = choice("gelu", "swiglu")
    position_embedding: str = choice("learned", "rope")
    rope_theta: float = positive(10000.0)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Per-head dimension (Megatron's --kv-channels, HF's head_dim). None: hidden_size / heads.
    kv_channels: Optional[int] = positive(None)
    add_bias_linear: bool = True  # GPT-2 has biases in every linear layer, LLaMA none
    # Megatron's --add-qkv-bias: a bias on the q, k, v projection even without add_bias_linear (Qwen2);
    # the output projection keeps add_bias_linear's choice.
    add_qkv_bias: bool = False
    # Megatron's --qk-layernorm: normalise queries and keys (model.normalization, norm_epsilon) before
    # RoPE. qk_layernorm_mode head: each head's d dimensions, one weight [d] for all heads (Qwen3,
    # Megatron); projection: the whole q (n·d) and k (g·d) projection at once (OLMoE, OLMo 2), RMSNorm.
    qk_layernorm: bool = False
    qk_layernorm_mode: str = choice("head", "projection")
    # HF's sliding_window (Mistral). megatron_lite attends over the whole sequence, so a window is only
    # accepted when it is at least seq_length (then it changes nothing); kept for the HF export.
    sliding_window: Optional[int] = positive(None)
    # The HF family (config.json's model_type) an imported model came from, written back by the export;
    # null: inferred from the shape (checkpoint/hf.py). Set by the import, rarely by hand.
    hf_model_type: Optional[str] = choice(  # type: ignore[arg-type]
        None, "llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = non_negative(0.02)
    kernel_backend: str = choice("auto", "torch", "csrc", "te", "apex")
    # sdpa: torch's scaled_dot_product_attention; explicit: QKᵀ, fused causal softmax, dropout, ·V.
    # auto: sdpa without dropout, explicit with it (its dropout masks follow the TP-aware RNG).
    attention_backend: str = choice("auto", "sdpa", "explicit")
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ParallelConfig:
    """Parallel degrees. The data-parallel size is derived: world_size / (TP × CP × PP)."""

    tensor_model_parallel_size: int = positive(1)
    # Context parallelism: each sequence split over this many ranks (zigzag chunks, ring attention).
    context_parallel_size: int = positive(1)
    pipeline_model_parallel_size: int = positive(1)
    virtual_pipeline_model_parallel_size: Optional[int] = positive(None)  # None: no interleaving
    # auto: interleaved when virtual stages are set, else 1f1b. zb1p (ZB-H1) and zbv (ZB-V: two
    # chunks per rank in the V placement, virtual size null or 2) split each backward into its
    # input and weight halves (docs/parallelism.md).
    pipeline_schedule: str = choice("auto", *schedules.SCHEDULES)
    # Uneven stages (pipeline/stages.py): the layers of each of the PP×VPP chunks in model order, the
    # embedding's chunk first (e.g. [1, 2, 2, 1]); or the layers of the first and/or the last chunk,
    # the other chunks splitting the rest equally (Megatron's --decoder-first/last-pipeline-num-layers;
    # per stage when VPP is 1). null: equal chunks.
    pipeline_layout: Optional[list[int]] = None
    decoder_first_pipeline_num_layers: Optional[int] = non_negative(None)
    decoder_last_pipeline_num_layers: Optional[int] = non_negative(None)
    sequence_parallel: bool = False
    pipeline_trace: Optional[str] = None  # path: write the executed pipeline timeline as JSON there
    distributed_timeout_minutes: Optional[float] = positive(None)  # None: 10 on GPU, 2 on CPU
    # Mixture of experts (Megatron's parallel folding): within each pipeline stage the TP × CP × DP
    # ranks also form an expert grid ETP × EP × EDP; EP splits the experts, ETP each expert's matrices.
    expert_model_parallel_size: int = positive(1)
    expert_tensor_parallel_size: int = positive(1)


@dataclass
class TrainingConfig:
    micro_batch_size: int = positive(2)
    global_batch_size: int = positive(16)
    train_iters: int = positive(100)
    seed: int = 1234
    precision: str = choice("fp32", "bf16", "fp16")
    # FP8 GEMMs in the transformer blocks' linears (docs/fp8.md), on top of ``precision`` (bf16 on a
    # GPU, fp32 for the CPU tests): null (off) | e4m3 (every GEMM operand in e4m3) | hybrid (e4m3
    # forward, e5m2 gradients). The embedding, the output layer and the router stay in ``precision``.
    fp8_format: Optional[str] = choice(None, "e4m3", "hybrid")
    # tensorwise: current scaling, one scale per tensor from its amax | delayed: the scale from the
    # amax history of earlier iterations | rowwise: one scale per row | blockwise: DeepSeek-V3's
    # 1×128 activation / gradient and 128×128 weight blocks.
    fp8_recipe: str = choice("tensorwise", "delayed", "rowwise", "blockwise")
    fp8_amax_history_len: int = positive(1024)  # delayed: iterations of amax kept
    fp8_amax_compute_algo: str = choice("max", "most_recent")  # delayed: the history's amax
    fp8_margin: int = non_negative(0)  # scale = fp8_max / (amax · 2^margin)
    # Keep the first num_layers_at_start_in_bf16 and last num_layers_at_end_in_bf16 transformer
    # layers out of FP8 (in ``precision``), Megatron's --first-last-layers-bf16.
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = non_negative(1)
    num_layers_at_end_in_bf16: int = non_negative(1)
    eval_interval: int = positive(50)
    eval_iters: int = non_negative(5)
    exit_duration_mins: Optional[float] = None
    # Activation recomputation (Korthikanti et al. 2022): selective recomputes the attention core
    # (QKᵀ, softmax, dropout, ·V); full recomputes whole layers, in groups of recompute_num_layers
    # (only each group's input is kept).
    recompute: str = choice("none", "selective", "full")
    recompute_num_layers: int = positive(1)
    # fp16 loss scaling: a constant scale when loss_scale is set, else dynamic (Megatron's defaults).
    loss_scale: Optional[float] = positive(None)
    initial_loss_scale: float = positive(2.0**32)
    min_loss_scale: float = positive(1.0)
    loss_scale_window: int = positive(1000)
    hysteresis: int = positive(2)
    # A step whose gradients hold inf/NaN on any rank is skipped everywhere; this many in a row stop
    # the run (exit code 3) rather than train on. fp16's warm-up search for a loss scale (skips before
    # the first applied step, while the scale can still halve) does not count.
    max_skipped_steps: int = positive(10)
    # Hang watchdog: a step running longer than this many seconds ends the rank (exit code 4) with a
    # line naming the schedule action and the collective it waits in. None: max(10 × the median of
    # the first 3 steps, 60 s), and parallel.distributed_timeout_minutes until those are timed.
    step_timeout: Optional[float] = positive(None)
    # Batch-size ramp-up (Megatron's --rampup-batch-size): [start, increment, ramp_samples]. The
    # global batch starts at ``start`` and grows by ``increment`` in equal steps over the first
    # ``ramp_samples`` consumed samples, up to global_batch_size; ``start`` and ``increment`` must be
    # multiples of micro_batch_size × DP. Each of the train_iters iterations reads its current batch.
    rampup_batch_size: Optional[list[int]] = None


@dataclass
class OptimizerConfig:
    lr: float = non_negative(1e-3)
    min_lr: float = non_negative(1e-4)
    weight_decay: float = non_negative(0.1)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = non_negative(1e-8)
    clip_grad: float = non_negative(1.0)  # 0 disables clipping
    lr_warmup_iters: int = non_negative(0)
    lr_decay_iters: Optional[int] = positive(None)  # None: training.train_iters
    lr_decay_style: str = choice("cosine", "constant", "linear", "wsd")
    # wsd (warmup-stable-decay): the LR stays at optimizer.lr until this many iterations before
    # lr_decay_iters, then falls linearly to min_lr. None: the last 10 % of the decay iterations.
    lr_wsd_decay_iters: Optional[int] = positive(None)
    use_distributed_optimizer: bool = False  # ZeRO-1: Adam states and fp32 master weights sharded over DP
    # Start each gradient bucket's DP reduction during the backward of the last microbatch.
    # None: on when the DP group runs NCCL (the reduction runs on its own stream, hidden behind the
    # backward, as torch DDP always does), off on gloo (there it competes with the backward for the
    # cores and was measured not to pay: docs/performance.md).
    overlap_grad_reduce: Optional[bool] = None
    grad_bucket_elements: int = positive(40_000_000)  # gradient elements per DP-reduction bucket
    # Distributed optimizer: all-gather the updated parameters in the background, each bucket waited
    # for by the first forward that uses it.
    overlap_param_gather: bool = False
    # On resume, a learning-rate schedule (lr, min_lr, warmup, decay style and end: lr_decay_iters or
    # training.train_iters) other than the checkpoint's is an error; true takes this run's
    # (Megatron's --override-opt_param-scheduler).
    override_opt_param_scheduler: bool = False


@dataclass
class TokenizerConfig:
    """Megatron-LM's tokenizer types and files (data/tokenizer.py says what each reads)."""

    # SentencePieceTokenizer | HuggingFaceTokenizer | GPT2BPETokenizer | TikTokenizer
    # (also GPTSentencePieceTokenizer, and the older sentencepiece | huggingface)
    type: str = choice("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer",
                       "GPT2BPETokenizer", "TikTokenizer", "sentencepiece", "huggingface")
    # a .model, a tokenizer.json or HF tokenizer directory, a tiktoken file. None: the bundled one
    model: Optional[str] = None
    vocab_file: Optional[str] = None  # GPT2BPETokenizer: vocab.json
    merge_file: Optional[str] = None  # GPT2BPETokenizer: merges.txt
    tiktoken_pattern: str = choice("v2", "v1")  # TikTokenizer: Megatron's pre-tokenisation pattern
    tiktoken_num_special_tokens: int = positive(1000)  # TikTokenizer: special ids before the BPE ranks


@dataclass
class DataConfig:
    # Prefixes of .bin/.idx pairs, optionally weighted as Megatron writes them: [0.3, a, 0.7, b].
    # None: the bundled public-domain corpus.
    paths: Optional[list[Any]] = None
    split: str = "969,30,1"
    # Per-split data instead of paths + split (Megatron's --train/valid/test-data-path), each in the
    # paths syntax; a split left None is not built (no validation or no test evaluation).
    train_paths: Optional[list[Any]] = None
    valid_paths: Optional[list[Any]] = None
    test_paths: Optional[list[Any]] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = non_negative(0)
    cache_dir: Optional[str] = None  # None: ~/.cache/megatron_lite
    # Synthetic tokens (Megatron's --mock-data): every split is uniform random ids below the model's
    # vocabulary, seeded by training.seed; no corpus is read. For throughput and smoke runs.
    mock: bool = False


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory: iter_NNNNNNN/ checkpoints + latest_checkpointed_iteration.txt
    # Directory to resume from; null: checkpoint.save (without a tracker there, a fresh start).
    # Named explicitly, it must hold a checkpoint.
    load: Optional[str] = None
    load_iteration: Optional[int] = non_negative(None)  # None: the tracker's (latest complete) iteration
    save_interval: Optional[int] = positive(None)  # None: save only at the end and when stopping early
    async_save: bool = False  # copy to host memory, write in a background thread
    keep_last: Optional[int] = positive(None)  # None: keep every checkpoint; docs/checkpoints.md (Pruning)
    # Fine-tuning controls (Megatron's names): finetune loads the weights only (iteration, optimizer,
    # random generators and data position start fresh); load_optimizer / load_rng = false skip those.
    finetune: bool = False
    load_optimizer: bool = True
    load_rng: bool = True
    # Take the model from the checkpoint (Megatron's --use-checkpoint-args): every model.* key but the
    # run's own choices (dropout, kernel and attention backends, init_std, make_vocab_size_divisible_by);
    # seq_length and data.tokenizer too, unless the command line sets them.
    use_checkpoint_model_config: bool = False


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "megatron_lite"
    mode: str = choice("offline", "online", "disabled")
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = positive(10)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False


@dataclass
class ProfilingConfig:
    """torch.profiler traces and CUDA memory snapshots (Megatron's --profile, --profile-step-start/end,
    --profile-ranks, --record-memory-history), written to ``${logging.dir}/profile/``."""

    enabled: bool = False
    step_start: int = positive(2)  # the first traced iteration (1-based; the first one includes warm-up)
    step_end: int = positive(3)  # the last traced iteration (inclusive)
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that trace
    # On a GPU: record allocations over the traced iterations and dump a snapshot for
    # https://pytorch.org/memory_viz (ignored on the CPU).
    memory_snapshot: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)


def register_schema() -> None:
    """Register ``Config`` with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="megatron_lite_schema", node=Config)


def load_config(overrides: Sequence[str] = ()) -> Config:
    """Compose ``configs/config.yaml`` with Hydra overrides, outside of a Hydra app (tests, tools).

    Raises ConfigError (one line) for an unknown key, a wrong type or a missing group option.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", _one_line(err)) from None
    return to_config(cfg)


def to_config(cfg: Config | DictConfig | dict) -> Config:
    """Turn a DictConfig or plain dict into a checked ``Config``; unknown keys raise ConfigError."""
    if isinstance(cfg, Config):
        return cfg
    try:
        if isinstance(cfg, DictConfig):
            # A plain container: merging a typed node would carry keys added with ``+key=``.
            cfg = OmegaConf.to_container(_without_hydra(cfg), resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(str(key), _one_line(err)) from None


def _without_hydra(cfg: DictConfig) -> DictConfig:
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    return cfg


def _one_line(err: BaseException) -> str:
    """The first line of an OmegaConf/Hydra message and of its cause, plus the key they name (and
    the override text that did not parse)."""
    override = getattr(err, "override", None)  # hydra's OverrideParseException
    parts = [f"override {override!r}:"] if override else []
    for e in (err, err.__cause__):
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] if e is not None else []
        head = 2 if lines and lines[0].endswith(":") else 1  # "... while composing config:" + why
        # Hydra's remedies ("1. To use it as a list, use key=[value1,value2]", "Did you mean ...") stay.
        keep = [ln for ln in lines[head:] if ln.startswith("full_key:") or _is_remedy(ln)]
        if keep and _is_remedy(keep[0]) and lines[head - 1][-1:] not in ":.":
            lines[head - 1] += ":"
        parts += lines[:head] + keep
    full_key = next((ln.split(":", 1)[1].strip() for ln in parts if ln.startswith("full_key:")), None)
    suggestion = did_you_mean(full_key) if full_key else None
    if suggestion:
        parts.append(f"did you mean {suggestion}?")
    return " ".join(dict.fromkeys(parts))  # a cause often repeats the first line


def did_you_mean(key: str) -> Optional[str]:
    """The schema key closest to a misspelt dotted ``key`` (``training.trian_iters`` ->
    ``training.train_iters``), or None when ``key`` exists or nothing is close."""
    import difflib

    node: Any = Config
    path: list[str] = []
    for part in key.split("."):
        if not is_dataclass(node):
            return None  # below a leaf (a list or dict value): not a schema key
        names = {f.name: f for f in fields(node)}
        if part not in names:
            close = difflib.get_close_matches(part, list(names), n=1, cutoff=0.6)
            return ".".join(path + close[:1]) if close else None
        path.append(part)
        f = names[part]
        node = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
    return None


def _is_remedy(line: str) -> bool:
    return line[:1].isdigit() and line[1:3] == ". " or line.startswith("Did you mean")


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees after validation: every size the code needs, derived once.

    world_size = tp × cp × dp × pp.
    """

    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int  # virtual stages per pipeline rank; 1 without interleaving
    cp: int
    num_microbatches: int  # per DP replica and iteration
    sequence_parallel: bool
    pipeline_schedule: str  # gpipe | 1f1b | interleaved | zb1p | zbv (``auto`` resolved)
    chunk_layers: tuple[int, ...] = ()  # layers of each global chunk in model order (pipeline/stages.py)
    ep: int = 1  # expert-parallel size (the expert grid ETP × EP × EDP folds TP × CP × DP)
    etp: int = 1  # expert-tensor-parallel size
    experts: bool = False  # an MoE model (model.moe.num_experts set)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: TP·CP·DP / (ETP·EP), the replicas of each expert."""
        return self.tp * self.cp * self.dp // (self.etp * self.ep)


def head_dim(m: ModelConfig) -> int:
    """The per-head dimension d: ``kv_channels``, else hidden_size / num_attention_heads."""
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate(cfg: Config | DictConfig | dict, world_size: int) -> ParallelDims:
    """Check ``cfg`` for a launch on ``world_size`` ranks; return the derived parallel sizes.

    Runs before any process group exists. Raises ConfigError with one line naming the offending key
    and the fix. ``sequence_parallel`` with TP = 1 only warns and is ignored.
    """
    cfg = to_config(cfg)
    if cfg.training.precision == "fp8":  # Megatron-LM's --fp8-format is a separate switch too
        raise ConfigError("training.precision", "'fp8' is not one of fp32, bf16, fp16: FP8 is training.fp8_format="
                          "hybrid (or e4m3) on top of precision bf16 (fp32 on a CPU); see docs/fp8.md")
    _check_fields(cfg)
    if world_size <= 0:
        raise ConfigError("world_size", f"must be positive, got {world_size}")
    p = cfg.parallel
    tp, cp, pp = p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size
    dp = _check_world(world_size, tp, cp, pp)
    _check_model_shape(cfg.model, tp)
    microbatches = _check_batch(cfg.training, dp)
    vpp, schedule, chunk_layers = _check_pipeline(cfg, pp, dp, microbatches)
    _check_rampup(cfg.training, dp, schedule, pp, vpp)
    _check_profiling(cfg, world_size)
    sequence_parallel = _check_sequence_parallel(cfg, tp)
    _check_context_parallel(cfg.model, cp, tp if sequence_parallel else 1)
    ep, etp = _check_moe(cfg, tp, cp, dp, sequence_parallel)
    _check_flags(cfg)
    _check_fp8(cfg, tp, cp)
    return ParallelDims(
        world_size=world_size,
        tp=tp,
        pp=pp,
        dp=dp,
        vpp=vpp,
        cp=cp,
        num_microbatches=microbatches,
        sequence_parallel=sequence_parallel,
        pipeline_schedule=schedule,
        chunk_layers=chunk_layers,
        ep=ep,
        etp=etp,
        experts=cfg.model.moe.num_experts is not None,
    )



def _check_fields(node: Any, prefix: str = "") -> None:
    """Every field's own rule (``choice`` / ``positive`` / ``non_negative`` metadata), in schema order."""
    for f in fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if is_dataclass(value):
            _check_fields(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            names = ", ".join("null" if c is None else c for c in f.metadata["choices"])
            raise ConfigError(key, f"{value!r} is not one of {names}")
        elif value is not None and f.metadata.get("bound") == "positive" and value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
        elif value is not None and f.metadata.get("bound") == "non_negative" and value < 0:
            raise ConfigError(key, f"must not be negative, got {value}")


def _check_world(world_size: int, tp: int, cp: int, pp: int) -> int:
    """The data-parallel size the world leaves after TP × CP × PP."""
    if world_size % (tp * cp * pp):
        layout = f"TP×PP = {tp}×{pp}" if cp == 1 else f"TP×CP×PP = {tp}×{cp}×{pp}"
        raise ConfigError(
            "parallel.tensor_model_parallel_size" if cp == 1 else "parallel.context_parallel_size",
            f"world size {world_size} is not divisible by {layout} = {tp * cp * pp}; "
            f"launch a multiple of {tp * cp * pp} ranks or change the {'TP/PP' if cp == 1 else 'TP/CP/PP'} sizes",
        )
    return world_size // (tp * cp * pp)


def _check_model_shape(m: ModelConfig, tp: int) -> None:
    """Heads, query groups and FFN width split over TP; RoPE needs an even head dimension and
    its scaling needs RoPE."""
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout}")
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    if m.kv_channels is None and m.hidden_size % heads:
        raise ConfigError(
            "model.hidden_size",
            f"{m.hidden_size} is not divisible by model.num_attention_heads={heads}; "
            f"use a multiple of {heads}",
        )
    if heads % groups:
        raise ConfigError(
            "model.num_query_groups",
            f"model.num_attention_heads={heads} is not divisible by {groups} query groups; "
            f"use one of {_divisors(heads)}",
        )
    if heads % tp:
        raise ConfigError(
            "parallel.tensor_model_parallel_size",
            f"model.num_attention_heads={heads} is not divisible by TP={tp}; "
            f"use a TP size among {_divisors(heads)}",
        )
    if groups % tp:
        raise ConfigError(
            "model.num_query_groups",
            f"{groups} query groups are not divisible by TP={tp} (each TP rank needs whole KV "
            f"heads); use a multiple of {tp} query groups or a TP size among {_divisors(groups)}",
        )
    if m.position_embedding == "rope" and head_dim(m) % 2:
        raise ConfigError(
            "model.position_embedding",
            f"rope needs an even head dimension, got {head_dim(m)}; change hidden_size or kv_channels",
        )
    scaling = m.rope_scaling
    if scaling.type is not None and m.position_embedding != "rope":
        raise ConfigError("model.rope_scaling.type", f"{scaling.type} scales RoPE; set it to null with learned positions")
    if scaling.type is not None and scaling.low_freq_factor >= scaling.high_freq_factor:
        raise ConfigError(
            "model.rope_scaling.high_freq_factor",
            f"{scaling.high_freq_factor} must exceed low_freq_factor={scaling.low_freq_factor}",
        )
    if m.qk_layernorm and m.qk_layernorm_mode == "projection" and m.normalization != "rmsnorm":
        raise ConfigError("model.qk_layernorm_mode", "projection normalises with RMSNorm only; set "
                          "model.normalization=rmsnorm or model.qk_layernorm_mode=head")
    if m.sliding_window is not None and m.sliding_window < m.seq_length:
        raise ConfigError(
            "model.sliding_window",
            f"{m.sliding_window} is shorter than model.seq_length={m.seq_length}: megatron_lite has no "
            f"sliding-window attention; use model.seq_length <= {m.sliding_window}",
        )
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % tp:
        raise ConfigError(
            "model.ffn_hidden_size", f"{ffn} is not divisible by TP={tp}; use a multiple of {tp}"
        )


def _check_batch(t: TrainingConfig, dp: int) -> int:
    """The number of microbatches per DP replica and iteration."""
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    if gbs % (mbs * dp):
        raise ConfigError(
            "training.global_batch_size",
            f"{gbs} is not divisible by micro_batch_size × data-parallel size = {mbs}×{dp} = "
            f"{mbs * dp}; use a multiple of {mbs * dp}",
        )
    return gbs // (mbs * dp)


def _check_pipeline(cfg: Config, pp: int, dp: int, microbatches: int) -> tuple[int, str, tuple[int, ...]]:
    """Virtual stages per rank, the schedule (``auto`` resolved) and the layers of every chunk; the
    schedule's own size rules come from ``pipeline/schedules.py:check_sizes`` and the layout's from
    ``pipeline/stages.py:chunk_layers``, here given the config key and the fix."""
    p = cfg.parallel
    vpp_set = p.virtual_pipeline_model_parallel_size
    if vpp_set is not None and pp == 1:
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size",
            "is set but pipeline_model_parallel_size=1; set it to null or use PP > 1",
        )
    # A null virtual size means "no interleaving", also for auto; a set one (even 1) means interleaving.
    schedule = p.pipeline_schedule
    if schedule == "auto":
        schedule = "interleaved" if vpp_set is not None else "1f1b"
    if schedule == "interleaved" and vpp_set is None:
        raise ConfigError(
            "parallel.pipeline_schedule",
            "interleaved needs parallel.virtual_pipeline_model_parallel_size (e.g. 2)",
        )
    if schedule == "zbv" and vpp_set not in (None, 2):
        raise ConfigError(
            "parallel.virtual_pipeline_model_parallel_size",
            f"zbv runs exactly 2 chunks per rank (the V placement), got {vpp_set}; set it to 2 or null",
        )
    if schedule not in ("interleaved", "zbv") and vpp_set is not None:
        raise ConfigError(
            "parallel.pipeline_schedule",
            f"{schedule} cannot run virtual stages; use interleaved (or auto) or set "
            "virtual_pipeline_model_parallel_size to null",
        )
    vpp = 2 if schedule == "zbv" else vpp_set or 1
    try:
        layers = stages.chunk_layers(cfg.model.num_layers, pp, vpp, p.pipeline_layout,
                                     p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
    except stages.LayoutError as err:
        raise ConfigError(err.key, str(err)) from None
    try:
        schedules.check_sizes(schedule, pp, vpp, microbatches)
    except schedules.ScheduleSizeError as err:
        if err.size != "m":
            raise ConfigError("parallel.pipeline_schedule", str(err)) from None
        mbs, gbs = cfg.training.micro_batch_size, cfg.training.global_batch_size
        raise ConfigError(
            "training.global_batch_size",
            f"{err.requirement}, got {microbatches} (= {gbs} / ({mbs}×{dp})); use a global batch "
            f"size that is a multiple of "
            f"{mbs * dp * err.multiple}",
        ) from None
    return vpp, schedule, layers


def _check_rampup(t: TrainingConfig, dp: int, schedule: str, pp: int, vpp: int) -> None:
    """Every global batch size of the ramp splits into whole microbatches the schedule can run."""
    from .training.rampup import BatchRampup  # no torch

    key = "training.rampup_batch_size"
    try:
        ramp = BatchRampup.from_config(t.rampup_batch_size, t.global_batch_size)
    except ValueError as err:
        raise ConfigError(key, str(err)) from None
    if ramp is None:
        return
    step = t.micro_batch_size * dp
    if ramp.start % step or ramp.increment % step:
        raise ConfigError(key, f"start {ramp.start} and increment {ramp.increment} must be multiples of "
                               f"micro_batch_size × data-parallel size = {t.micro_batch_size}×{dp} = {step}")
    for size in ramp.sizes():
        m = size // step
        try:
            schedules.check_sizes(schedule, pp, vpp, m)
        except schedules.ScheduleSizeError as err:
            raise ConfigError(key, f"the global batch of {size} samples has {m} microbatch{'es' * (m != 1)}: "
                                   f"{err.requirement}; use a start and increment that are multiples of "
                                   f"{step * err.multiple}") from None


def _check_profiling(cfg: Config, world_size: int) -> None:
    p = cfg.profiling
    if not p.enabled:
        return
    if p.step_end < p.step_start:
        raise ConfigError("profiling.step_end", f"{p.step_end} is before profiling.step_start={p.step_start}")
    if p.step_start > cfg.training.train_iters:
        raise ConfigError("profiling.step_start", f"{p.step_start} is past training.train_iters="
                                                  f"{cfg.training.train_iters}; trace an earlier iteration")
    outside = [r for r in p.ranks if not 0 <= r < world_size]
    if outside or not p.ranks:
        raise ConfigError("profiling.ranks", f"{list(p.ranks)} must name ranks in [0, {world_size})")


def _check_sequence_parallel(cfg: Config, tp: int) -> bool:
    """Whether sequence parallelism takes effect (it needs TP > 1 and a sequence split over TP)."""
    if not cfg.parallel.sequence_parallel:
        return False
    if tp == 1:
        warnings.warn(
            "parallel.sequence_parallel is ignored with tensor_model_parallel_size=1", stacklevel=3
        )
        return False
    if cfg.model.seq_length % tp:
        raise ConfigError(
            "model.seq_length",
            f"{cfg.model.seq_length} is not divisible by TP={tp}, which sequence parallelism needs; "
            f"use a multiple of {tp}",
        )
    return True


def _check_flags(cfg: Config) -> None:
    """Options that need another option."""
    o = cfg.optimizer
    if o.min_lr > o.lr:
        raise ConfigError("optimizer.min_lr", f"{o.min_lr} exceeds optimizer.lr={o.lr}; lower it")
    if o.overlap_param_gather and not o.use_distributed_optimizer:
        raise ConfigError(
            "optimizer.overlap_param_gather", "needs optimizer.use_distributed_optimizer=true"
        )
    c = cfg.checkpoint
    if c.async_save and not c.save:
        raise ConfigError("checkpoint.async_save", "needs checkpoint.save (a directory)")
    for key in ("finetune", "use_checkpoint_model_config"):
        if getattr(c, key) and not c.load:
            raise ConfigError(f"checkpoint.{key}", "needs checkpoint.load (the checkpoint directory)")


def _check_fp8(cfg: Config, tp: int, cp: int) -> None:
    """FP8's combinations (docs/fp8.md): a base precision it composes with, and the blockwise
    recipe's 128-element blocks inside each rank's shard of every GEMM operand."""
    t, m = cfg.training, cfg.model
    if t.fp8_format is None:
        return
    if t.precision == "fp16":
        raise ConfigError("training.fp8_format", "composes with training.precision bf16 or fp32, not fp16; "
                          "set training.precision=bf16")
    if t.first_last_layers_bf16 and t.num_layers_at_start_in_bf16 + t.num_layers_at_end_in_bf16 >= m.num_layers:
        raise ConfigError("training.num_layers_at_start_in_bf16",
                          f"{t.num_layers_at_start_in_bf16} + num_layers_at_end_in_bf16={t.num_layers_at_end_in_bf16} "
                          f"leave none of the {m.num_layers} layers in FP8; lower them or set first_last_layers_bf16=false")
    if t.fp8_recipe != "blockwise":
        return
    n, g = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    d = head_dim(m)
    fc1 = 2 * ffn if m.activation == "swiglu" else ffn
    tokens = m.seq_length // (2 * cp) if cp > 1 else m.seq_length  # the CP split's zigzag chunks
    for what, size in (("model.hidden_size", m.hidden_size), ("QKV output features", (n + 2 * g) * d // tp),
                       ("attention output input features", n * d // tp), ("fc1 output features", fc1 // tp),
                       ("model.ffn_hidden_size / TP", ffn // tp), ("model.seq_length per CP chunk", tokens)):
        if size % 128:
            raise ConfigError("training.fp8_recipe",
                              f"blockwise needs 128-element blocks, but {what} is {size} on each rank; "
                              "use tensorwise or rowwise, or sizes that are multiples of 128 per rank")


def moe_layers(m: ModelConfig) -> list[bool]:
    """Which of the model's layers are MoE layers (``model.moe``: first_dense_layers, layer_freq)."""
    moe = m.moe
    if moe.num_experts is None:
        return [False] * m.num_layers
    return [i >= moe.first_dense_layers and i % moe.layer_freq == 0 for i in range(m.num_layers)]


def _check_moe(cfg: Config, tp: int, cp: int, dp: int, sequence_parallel: bool) -> tuple[int, int]:
    """The expert grid (EP, ETP) folded into TP × CP × DP, and the routing options' consistency."""
    p, m, moe = cfg.parallel, cfg.model, cfg.model.moe
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    E = moe.num_experts
    if E is None:
        if ep > 1 or etp > 1:
            key = "expert_model_parallel_size" if ep > 1 else "expert_tensor_parallel_size"
            raise ConfigError(f"parallel.{key}", "needs an MoE model; set model.moe.num_experts or set it to 1")
        return 1, 1
    if E % ep:
        raise ConfigError("parallel.expert_model_parallel_size",
                          f"{ep} does not divide model.moe.num_experts={E}; use one of {_divisors(E)}")
    if (tp * cp * dp) % (etp * ep):
        raise ConfigError("parallel.expert_model_parallel_size",
                          f"ETP×EP = {etp}×{ep} does not divide TP×CP×DP = {tp}×{cp}×{dp} = {tp * cp * dp} "
                          "(the expert grid folds into the same ranks); change EP/ETP or the world size")
    if tp > 1 and not sequence_parallel:
        raise ConfigError("parallel.sequence_parallel",
                          f"MoE with TP={tp} needs sequence parallelism (as in Megatron-LM); set it to true")
    if moe.router_topk > E:
        raise ConfigError("model.moe.router_topk", f"{moe.router_topk} exceeds num_experts={E}; use at most {E}")
    ffn = moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % etp:
        raise ConfigError("model.moe.ffn_hidden_size",
                          f"{ffn} is not divisible by expert_tensor_parallel_size={etp}; use a multiple of {etp}")
    if moe.shared_expert_ffn_hidden_size is not None and moe.shared_expert_ffn_hidden_size % tp:
        raise ConfigError("model.moe.shared_expert_ffn_hidden_size",
                          f"{moe.shared_expert_ffn_hidden_size} is not divisible by TP={tp}; use a multiple of {tp}")
    if moe.shared_expert_gate and moe.shared_expert_ffn_hidden_size is None:
        raise ConfigError("model.moe.shared_expert_gate", "needs model.moe.shared_expert_ffn_hidden_size")
    if moe.first_dense_layers >= m.num_layers:
        raise ConfigError("model.moe.first_dense_layers",
                          f"{moe.first_dense_layers} leaves no MoE layer of {m.num_layers}; lower it")
    if (moe.num_groups is None) != (moe.group_topk is None):
        raise ConfigError("model.moe.group_topk", "group-limited routing needs both num_groups and group_topk")
    if moe.num_groups is not None:
        if E % moe.num_groups:
            raise ConfigError("model.moe.num_groups", f"{moe.num_groups} does not divide num_experts={E}; "
                              f"use one of {_divisors(E)}")
        if moe.group_topk > moe.num_groups:
            raise ConfigError("model.moe.group_topk", f"{moe.group_topk} exceeds num_groups={moe.num_groups}")
        if moe.router_topk % moe.group_topk or moe.router_topk // moe.group_topk > E // moe.num_groups:
            raise ConfigError("model.moe.group_topk",
                              f"router_topk={moe.router_topk} must be a multiple of group_topk={moe.group_topk} "
                              f"with at most {E // moe.num_groups} experts per group")
    if moe.expert_bias and moe.score_function == "softmax" and not moe.pre_softmax:
        raise ConfigError("model.moe.expert_bias",
                          "biases probabilities: use score_function=sigmoid or pre_softmax=true")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ConfigError("model.moe.pad_to_capacity", "needs model.moe.capacity_factor")
    if moe.router_topk == 1 and moe.score_function == "softmax" and not moe.pre_softmax:
        raise ConfigError("model.moe.pre_softmax",
                          "top-1 softmax over the chosen logit is always 1 (no router gradient); set it to true")
    return ep, etp


def _check_context_parallel(m: ModelConfig, cp: int, sp_tp: int) -> None:
    """CP rank i holds chunks i and 2c−1−i of 2c (and under SP its s/c tokens split over TP)."""
    if cp == 1:
        return
    if m.seq_length % (2 * cp):
        raise ConfigError(
            "model.seq_length",
            f"{m.seq_length} is not divisible by 2 × context_parallel_size = {2 * cp} (each CP rank "
            f"holds 2 of {2 * cp} chunks); use a multiple of {2 * cp}",
        )
    if (m.seq_length // cp) % sp_tp:
        need = math.lcm(2 * cp, cp * sp_tp)
        raise ConfigError(
            "model.seq_length",
            f"{m.seq_length} / CP={cp} = {m.seq_length // cp} tokens per CP rank do not split over TP={sp_tp} "
            f"for sequence parallelism; use a multiple of {need}",
        )
    if m.dropout > 0:
        raise ConfigError(
            "model.dropout",
            f"{m.dropout} with context_parallel_size={cp}: ring attention has no attention dropout; "
            "set model.dropout=0 or context_parallel_size=1",
        )


# Model keys that are the run's own choice, not the checkpoint's. seq_length is the checkpoint's
# unless the command line sets it (always for learned position embeddings, a parameter shape).
RUN_MODEL_KEYS = ("seq_length", "dropout", "kernel_backend", "attention_backend", "init_std",
                  "make_vocab_size_divisible_by")
# data.tokenizer keys a checkpoint's config hands on with its model (paths among them relocated).
TOKENIZER_PATH_KEYS = ("model", "vocab_file", "merge_file")


def overridden_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys a list of Hydra overrides sets (``+key=``, ``++key=`` and ``~key`` included)."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


def with_checkpoint_model_config(cfg: Config, overrides: Sequence[str] = ()
                                 ) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """``cfg`` with its model read from the checkpoint ``checkpoint.load`` names
    (``checkpoint.use_checkpoint_model_config``, Megatron's ``--use-checkpoint-args``), and the keys
    that changed: {key: (ours, saved)}.

    Taken from the checkpoint: every architecture key (meta.json's model config, config.yaml's model
    section for checkpoints that lack it); ``model.seq_length`` unless ``overrides`` (the command
    line) set it; and ``data.tokenizer`` (the tokenizer the model was made or imported with; a path
    that moved with the checkpoint directory is found under its ``tokenizer/``) unless ``overrides``
    name any ``data.tokenizer.*`` key."""
    from .checkpoint.storage import CONFIG, CheckpointError, find_checkpoint  # storage reads no config

    c = cfg.checkpoint
    info = find_checkpoint(c.load, c.load_iteration) if c.load else None
    if info is None:
        raise CheckpointError(f"{Path(c.load or '.') / 'latest_checkpointed_iteration.txt'}: no checkpoint to take "
                              "the model config from (checkpoint.use_checkpoint_model_config)")
    stored = OmegaConf.load(info.path / CONFIG) if (info.path / CONFIG).is_file() else None
    saved = info.meta.get("model_config")
    if saved is None:
        saved = dict(OmegaConf.to_container(stored)["model"])
        saved["vocab_size"] = info.meta["model"]["vocab_size"]
    given = overridden_keys(overrides)
    seq_length_ours = "model.seq_length" in given and saved.get("position_embedding") != "learned"
    names = {f.name for f in fields(ModelConfig)}
    taken = {k: v for k, v in saved.items()
             if k in names and (k not in RUN_MODEL_KEYS or (k == "seq_length" and not seq_length_ours))}
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.model), taken))  # nested dataclasses too
    changed = {k: (getattr(cfg.model, k), getattr(model, k)) for k in taken
               if getattr(cfg.model, k) != getattr(model, k)}
    data = cfg.data
    if stored is not None and "tokenizer" in stored.get("data", {}) and not any(
            k.startswith("data.tokenizer") for k in given):
        saved_tokenizer = OmegaConf.to_container(stored.data.tokenizer)
        for key in TOKENIZER_PATH_KEYS:
            saved_tokenizer[key] = _moved_with(saved_tokenizer.get(key), Path(c.load))
        tokenizer = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(data.tokenizer), saved_tokenizer))
        changed.update({f"data.tokenizer.{k}": (getattr(data.tokenizer, k), getattr(tokenizer, k))
                        for k in saved_tokenizer if getattr(data.tokenizer, k) != getattr(tokenizer, k)})
        data = replace(data, tokenizer=tokenizer)
    return replace(cfg, model=model, data=data), changed


def _moved_with(path: Optional[str], load: Path) -> Optional[str]:
    """``path`` (a stored tokenizer file), or where it is now when it is gone but the checkpoint
    directory ``load`` holds it under the same ``tokenizer/...`` tail (a copied or moved checkpoint)."""
    if path is None or Path(path).exists() or "tokenizer" not in Path(path).parts:
        return path
    parts = Path(path).parts
    tail = parts[len(parts) - 1 - parts[::-1].index("tokenizer"):]
    moved = Path(load, *tail)
    return str(moved) if moved.exists() else path


def _resumes(c: CheckpointConfig) -> bool:
    """Whether a first start would read a checkpoint (``checkpoint.load``, else ``checkpoint.save``)."""
    load = c.load or c.save
    return bool(load) and (c.load_iteration is not None or (Path(load) / "latest_checkpointed_iteration.txt").is_file())


def check_resume_schedule(cfg: Config) -> Optional[str]:
    """Before launch, the check the trainer makes on load: a resume keeps the checkpoint's
    learning-rate schedule unless ``optimizer.override_opt_param_scheduler`` (ConfigError; the line
    saying the override applies, or None). Nothing to check for a fresh start, fine-tuning, a resume
    without the optimizer state, or a checkpoint that predates stored schedules."""
    from .checkpoint.storage import find_checkpoint
    from .optim.lr_schedule import check_resumed_schedule, schedule_parameters

    c = cfg.checkpoint
    if c.finetune or not c.load_optimizer or not _resumes(c):
        return None
    info = find_checkpoint(c.load or c.save, c.load_iteration)
    saved = info.meta.get("trainer", {}).get("lr_schedule") if info else None
    if saved is None:
        return None
    return check_resumed_schedule(saved, schedule_parameters(cfg.optimizer, cfg.training.train_iters),
                                  cfg.optimizer.override_opt_param_scheduler)


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of ``multiple × tp``."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what checkpoints and run directories store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megatron_lite.config --world-size N [overrides]``: validate without launching.

    Prints the derived parallel sizes, or one line naming the offending key (exit code 2). The launch
    scripts run it before torchrun so that a bad config fails before any rank starts.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m megatron_lite.config")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--print-config", action="store_true", help="print the composed YAML")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2_124m")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        if _resumes(cfg.checkpoint):
            from .checkpoint.storage import CheckpointError  # torch: only when a checkpoint is read

            try:
                if cfg.checkpoint.use_checkpoint_model_config and cfg.checkpoint.load:
                    cfg, _ = with_checkpoint_model_config(cfg, args.overrides)
                check_resume_schedule(cfg)
            except CheckpointError as err:
                print(f"checkpoint error: {err}", file=sys.stderr)
                return 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dims = validate(cfg, args.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.print_config:
        print(to_yaml(cfg))
    print(
        f"ok: world {dims.world_size} = TP {dims.tp} × CP {dims.cp} × PP {dims.pp} × DP {dims.dp} (VPP {dims.vpp}), "
        f"{dims.num_microbatches} microbatches per iteration, schedule {dims.pipeline_schedule}"
        + (f"; experts ETP {dims.etp} × EP {dims.ep} × EDP {dims.edp}" if cfg.model.moe.num_experts else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
