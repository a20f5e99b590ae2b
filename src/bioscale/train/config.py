"""Typed configuration of a training run, and how a Hydra recipe plus ``key=value`` overrides become one.

The dataclasses below are the schema and the single source of truth: they are registered in Hydra's ``ConfigStore``
as ``bioscale_train``, every YAML recipe in ``bioscale/configs/`` starts from it (``defaults: [bioscale_train,
_self_]``), and OmegaConf's struct mode then rejects any key the schema does not define, naming it. Recipes are
composed with Hydra's compose API (:func:`load_config`), so Hydra neither changes the working directory nor takes over
logging; the result is converted back to a :class:`TrainConfig` instance, checked by :func:`validate_config`, and
written as ``config.yaml`` into the run directory by the trainer. Each component of the loop receives only its own
sub-config (``cfg.optimizer``, ``cfg.checkpoint``, ...).
"""

# ruff: noqa: UP045  (Optional[...] on purpose: see the comment above ModelConfig)
from __future__ import annotations

import importlib.resources
from collections import defaultdict
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from bioscale.data.config import DataConfig
from bioscale.data.images import ignored_image_settings
from bioscale.distributed.parallelize import AC_MODES, COMPILE_PRESETS, RESHARD_POLICIES
from bioscale.models.attention import ATTENTION_BACKENDS
from bioscale.models.flash_impl import AUTO as FLASH_AUTO
from bioscale.models.flash_impl import FLASH_IMPLS
from bioscale.precision.fp8 import FP8_RECIPES
from bioscale.train.profiling import PROFILER_MODES

SCHEMA_NAME = "bioscale_train"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("bf16", "fp32")
STRATEGIES = ("ddp", "fsdp2", "mfsdp")
REDUCE_DTYPES = ("fp32", "bf16")
SCHEDULER_KINDS = ("linear_warmup_linear_decay", "warmup_cosine")


def choice(default: Any, choices: tuple[str, ...]) -> Any:
    """A field whose value must be one of ``choices``: declared beside the field, checked for every field of every
    section by :func:`validate_config` (one place)."""
    return field(default=default, metadata={"choices": tuple(choices)})


# The override names of the seed recipes (and of bioscale before its config had one section per component), still
# accepted on the command line: old key -> new key. ``compile=true`` and ``activation_checkpointing=full`` name a whole
# section in the new schema, so they map to its switch.
ALIASES: dict[str, str] = {
    "fp8_config": "fp8",
    "fp8_layers": "fp8.layers",
    "quant_stats_config": "quant_stats",
    "cp_size": "parallelism.cp_size",
    "use_sequence_packing": "data.use_sequence_packing",
    "compile_presets": "compile.presets",
    "compile": "compile.enabled",
    "activation_checkpointing": "activation_checkpointing.mode",
}
# Aliases of whole sections: ``fp8_config.enabled`` -> ``fp8.enabled``. The others rename one key exactly (so that
# ``compile.enabled`` is not read as the alias ``compile`` plus ``.enabled``).
_SECTION_ALIASES = ("fp8_config", "quant_stats_config")


def resolve_aliases(
    overrides: list[str],
    aliases: dict[str, str] | None = None,
    section_aliases: tuple[str, ...] | None = None,
) -> list[str]:
    """``key=value`` overrides with the old key names rewritten to the sectioned schema's (default: the trainer's
    :data:`ALIASES`; fine-tuning passes its own). ``ValueError`` when two spellings of one setting are both given."""
    if aliases is None:
        aliases, section_aliases = ALIASES, _SECTION_ALIASES
    section_aliases = section_aliases or ()
    resolved = []
    spelled: dict[str, list[str]] = defaultdict(list)
    for override in overrides:
        prefix = override[: len(override) - len(override.lstrip("+~"))]
        body = override[len(prefix) :]
        key, sep, value = body.partition("=")
        new_key = aliases.get(key) if key not in section_aliases else None
        for section in section_aliases:
            if key == section or key.startswith(section + "."):
                new_key = aliases[section] + key[len(section) :]
        resolved.append(f"{prefix}{new_key}{sep}{value}" if new_key is not None else override)
        spelled[new_key or key].append(key)
    for key, spellings in spelled.items():
        if len(set(spellings)) > 1:
            raise ValueError(f"{' and '.join(sorted(set(spellings)))} are the same setting ({key}); give it once")
    return resolved


# Optional[...] rather than `X | None`: OmegaConf's structured-config type checker reads these annotations and
# does not understand PEP 604 unions on Python 3.10.
@dataclass
class ModelConfig:
    """Which model to build: a registered family (``esm2``, ``llama3``), a named size and config overrides."""

    name: str = "esm2"
    size: str = "debug"
    # Passed to ``bioscale.models.build_config(name, size, **overrides)``; e.g. ``+model.overrides.num_hidden_layers=2``.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Attention backend key (bioscale.models.ATTENTION_BACKENDS: ``sdpa``, ``varlen``, ``flex``); None keeps the model
    # config's default.
    attn_backend: Optional[str] = field(default=None, metadata={"choices": tuple(ATTENTION_BACKENDS)})
    # Which flash kernels torch's varlen / SDPA-flash ops run: FA2 (built in), FA3 or FA4 when installed (CUDA
    # only; bioscale.models.flash_impl). None leaves torch's choice (FA2). ``auto``: FA4 where it is installed and runs
    # on this GPU (not for causal models), else FA2 (nothing to install; CPU runs ignore it). A process setting, not
    # stored with the model; summary.json records what ran.
    flash_impl: Optional[str] = field(default=None, metadata={"choices": (*FLASH_IMPLS, FLASH_AUTO)})
    # Start from these weights (a ``save_pretrained`` directory, e.g. an earlier run's ``final_model``) instead of a
    # random init. The architecture still comes from name/size/overrides and must match the stored weights.
    init_from: Optional[str] = None


@dataclass
class OptimizerConfig:
    """AdamW hyper-parameters. Weight decay applies to matrices only (not to biases and norm scales)."""

    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # None: fused kernel on CUDA, the default (foreach) implementation on CPU.
    fused: Optional[bool] = None


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: ESM-2's linear warmup then linear decay, or Llama's warmup then cosine."""

    kind: str = choice("linear_warmup_linear_decay", SCHEDULER_KINDS)
    warmup_steps: int = 2000
    # The learning rate at the last step, as a fraction of ``optimizer.lr`` (ESM-2 decays to 10 %).
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointConfig:
    """Where and when to write sharded checkpoints and the final export."""

    # None: ``<run_dir>/checkpoints``.
    ckpt_dir: Optional[str] = None
    # Write a checkpoint every N steps (and at the last step); 0 writes none.
    save_every_n_steps: int = 0
    # Continue from the newest intact checkpoint in ``ckpt_dir`` (a fresh start if there is none). The model and data
    # config must match the checkpoint's; the learning rate, schedule and other settings follow this config.
    resume_from_checkpoint: bool = False
    # A run that does not resume refuses a ``ckpt_dir`` holding checkpoints (another run's: it would overwrite them);
    # true moves them, with that run's exports and run files, into ``<ckpt_dir>/previous_runs/<when>-<run id>/``.
    move_aside_other_runs: bool = False
    # Export ``<ckpt_dir>/final_model`` (bioscale, Auto-loadable) and ``<ckpt_dir>/final_model_hf`` (plain transformers).
    save_final_model: bool = True
    keep_last_n: int = 2
    # Write checkpoints in a background thread while training goes on (torch.distributed.checkpoint.async_save).
    async_save: bool = False


@dataclass
class ProfilerConfig:
    """Bracket steps ``start_step..end_step`` (inclusive) for Nsight Systems, or record a torch.profiler trace."""

    enabled: bool = False
    start_step: int = 10
    end_step: int = 12
    mode: str = choice("nsys", PROFILER_MODES)


@dataclass
class ParallelismConfig:
    """How the ranks started by torchrun share the work (see docs/training.md and docs/multinode.md).

    ``strategy``: ``fsdp2`` (PyTorch FSDP2: parameters, gradients and optimizer state sharded per block), ``ddp``
    (replicated), or ``mfsdp`` (NVIDIA Megatron-FSDP, GPUs only, ``pip install 'bioscale[mfsdp]'``). The other keys
    tune FSDP2 (and, where they say so, Megatron-FSDP). ``single_gpu_fsdp=true`` also runs the sharded strategy on a
    single GPU (over one rank): bf16 weights for compute over fp32 master weights instead of autocast.
    """

    strategy: str = choice("fsdp2", STRATEGIES)
    # FSDP2: free each block's gathered weights after its forward (default: every block but the last; always; never
    # = ZeRO-2, no second all-gather in backward, more memory).
    reshard_after_forward: str = choice("default", RESHARD_POLICIES)
    # FSDP2: explicit all-gather prefetch depth in forward and backward (0 = FSDP2's implicit one-ahead schedule).
    prefetch: int = 1
    # Gradient reduction dtype (FSDP2 reduce-scatter, Megatron-FSDP main gradients): fp32 or bf16 (half the traffic).
    reduce_dtype: str = choice("fp32", REDUCE_DTYPES)
    # With dtype=bf16: keep fp32 master weights (FSDP2 shards / Megatron-FSDP main weights) that the optimizer
    # updates; false stores bf16 weights and AdamW state (half the memory; updates below half a bf16 ulp are lost).
    fp32_master_weights: bool = True
    # HSDP (FSDP2): number of replica groups, e.g. one per node; parameters are sharded within a group of
    # world_size / dp_replicate ranks and replicated across groups (all-reduce of gradients between them).
    dp_replicate: int = 1
    # With dtype=bf16 on one GPU: FSDP2 / Megatron-FSDP over one rank (bf16 compute over fp32 masters) instead of
    # the plain model under autocast. Off by default: on an H100 it measured -16% at 16k-token micro-batches and +2%
    # at 32k for ESM-2 650M (benchmarks/results/2026-11-22-h100-esm2-650M.md).
    single_gpu_fsdp: bool = False
    # Context-parallel degree: each group of cp_size consecutive ranks splits every sequence (docs/context_parallel.md).
    cp_size: int = 1


@dataclass
class LoggingConfig:
    """Metrics every N steps to ``metrics.jsonl``, TensorBoard, optionally Weights & Biases, and a progress bar."""

    log_every_n_steps: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bioscale"
    progress_bar: bool = True


@dataclass
class FP8Config:
    """FP8 training of the ``nn.Linear`` layers in the selected blocks (torchao float8; needs an H100 or newer)."""

    enabled: bool = False
    recipe: str = choice("tensorwise", FP8_RECIPES)
    # 1-indexed transformer blocks to run in FP8; None means every block.
    layers: Optional[list[int]] = None
    # Linears of each FP8 block to convert, by name inside the block or a dotted prefix ("mlp"); None: all.
    modules: Optional[list[str]] = None


@dataclass
class QuantStatsConfig:
    """Statistics of FP8-quantised tensors, written to the run directory every ``freq`` steps."""

    enabled: bool = False
    freq: int = 10


@dataclass
class CompileConfig:
    """``torch.compile`` of each transformer block, and Inductor settings by name."""

    enabled: bool = False
    # bioscale.distributed.parallelize.COMPILE_PRESETS, applied with enabled=true. They lengthen the first step's
    # compile by minutes; see docs/performance.md for when they pay.
    presets: list[str] = field(default_factory=list)
    # Where torch keeps compiled graphs and kernels between runs (bioscale.train.compile_cache): None uses
    # TORCHINDUCTOR_CACHE_DIR when set, else $BIOSCALE_CACHE/inductor (~/.cache/bioscale/inductor).
    cache_dir: str | None = None


@dataclass
class ActivationCheckpointingConfig:
    """Recompute activations in backward instead of keeping them: ``selective`` keeps matmul / attention outputs
    and recomputes the pointwise ops, ``full`` recomputes whole blocks, ``auto`` keeps them when the predicted peak
    fits this GPU and recomputes whole blocks when not (:mod:`bioscale.train.memory`)."""

    mode: str = choice("none", (*AC_MODES, "auto"))


@dataclass
class TrainConfig:
    """A whole training run: one section per component. Top-level names are public (scripts outside the repository
    set them); :data:`ALIASES` keeps the older override names working."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    quant_stats: QuantStatsConfig = field(default_factory=QuantStatsConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)

    num_train_steps: int = 100
    # Micro-batches per optimizer step; the global batch is micro-batch x grad_acc_steps x data-parallel ranks.
    grad_acc_steps: int = 1
    # fixed: the micro-batch and grad_acc_steps as given. auto (on CUDA): keep their product (the tokens of one
    # optimizer step) and split it into the fewest micro-batches whose predicted peak fits this GPU, without
    # activation checkpointing where possible (bioscale.train.memory.plan_micro_batches; logged, in summary.json).
    micro_batching: str = choice("fixed", ("fixed", "auto"))
    # None: ``checkpoint.ckpt_dir`` when that is set, else ``outputs/<config name>`` relative to the working directory.
    run_dir: Optional[str] = None
    seed: int = 42
    device: str = choice("auto", DEVICES)
    # bf16: bf16 compute over fp32 master weights through FSDP2 / Megatron-FSDP on GPUs (also on one GPU, see
    # parallelism.single_gpu_fsdp), autocast otherwise (DDP, CPU); fp32: no casting.
    dtype: str = choice("bf16", DTYPES)
    max_grad_norm: float = 1.0
    # Stop with an error after this many consecutive steps with a non-finite loss or gradient (each one is skipped).
    nan_tolerance: int = 5


def _schema_node() -> DictConfig:
    node = OmegaConf.structured(TrainConfig)
    # Every recipe names its data. A recipe's `???` must stay missing, and merging `???` over a default keeps the
    # default (OmegaConf's merge rule), so the schema itself has no default source.
    node.data.source = "???"
    return node


def register_schema() -> None:
    """Register :class:`TrainConfig` as the Hydra schema ``bioscale_train`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=_schema_node())


def recipes_dir() -> Path:
    """The folder of recipes shipped inside the package (``bioscale/configs``)."""
    return Path(str(importlib.resources.files("bioscale") / "configs"))


def list_recipes(config_dir: str | Path | None = None) -> dict[str, str]:
    """Recipe name -> its one-line description (the first comment line of the YAML file)."""
    folder = Path(config_dir) if config_dir is not None else recipes_dir()
    recipes = {}
    for path in sorted(folder.glob("*.yaml")):
        description = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                description = line.lstrip("#").strip()
                break
        recipes[path.stem] = description
    return recipes


def load_config(
    config_name: str, overrides: list[str] | None = None, *, config_dir: str | Path | None = None
) -> TrainConfig:
    """Compose recipe ``config_name`` with ``key=value`` overrides into a validated :class:`TrainConfig`.

    Also resolves the derived defaults (``run_dir``, ``checkpoint.ckpt_dir``) so the saved ``config.yaml`` shows the
    paths the run really used.

    Raises:
        ValueError: unknown recipe, unknown or mistyped key, a required value (``???``) left unset, or an invalid
            value (see :func:`validate_config`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = Path(config_dir).resolve() if config_dir is not None else recipes_dir()
    if not (folder / f"{config_name}.yaml").is_file():
        known = ", ".join(list_recipes(folder)) or "none"
        raise ValueError(f"no recipe {config_name!r} in {folder} (known recipes: {known})")
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base=None, job_name="bioscale_train"):
            composed = compose(config_name=config_name, overrides=resolve_aliases(list(overrides or [])))
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's message names the offending key (e.g. "Could not override 'foo'", "Key 'bar' not in 'TrainConfig'").
        raise ValueError(f"invalid configuration for recipe {config_name!r}: {_describe(err)}") from err
    missing = sorted(OmegaConf.missing_keys(composed))
    if missing:
        raise ValueError(
            f"recipe {config_name!r} needs a value for {', '.join(missing)}; pass it on the command line, "
            f"e.g. {missing[0]}=<value>"
        )
    try:
        cfg = OmegaConf.to_object(composed)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid configuration for recipe {config_name!r}: {_describe(err)}") from err
    assert isinstance(cfg, TrainConfig), type(cfg)
    resolve_paths(cfg, config_name)
    validate_config(cfg)
    return cfg


def resolve_paths(cfg: TrainConfig, name: str = "run") -> None:
    """Fill the derived defaults in place: ``run_dir`` and ``ckpt_dir``.

    ``run_dir`` unset: ``checkpoint.ckpt_dir`` when that is given (one folder then holds the whole run, and two runs
    with different checkpoint folders never share a metrics file), else ``outputs/<name>``. ``ckpt_dir`` unset:
    ``<run_dir>/checkpoints``.
    """
    if cfg.run_dir is None:
        ckpt_dir = cfg.checkpoint.ckpt_dir
        cfg.run_dir = str(ckpt_dir) if ckpt_dir is not None else str(Path("outputs") / name)
    if cfg.checkpoint.ckpt_dir is None:
        cfg.checkpoint.ckpt_dir = str(Path(cfg.run_dir) / "checkpoints")


def _describe(err: BaseException) -> str:
    # Hydra wraps the OmegaConf error that names the key; show the whole chain, innermost last.
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip()
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def check_choices(section: Any, prefix: str = "") -> None:
    """Every field declared with :func:`choice` (or ``metadata={"choices": ...}``), in every nested section, holds
    one of its choices; ``ValueError`` naming the dotted key otherwise."""
    for item in fields(section):
        value = getattr(section, item.name)
        key = f"{prefix}{item.name}"
        choices = item.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        if is_dataclass(value) and not isinstance(value, DataConfig):  # DataConfig validates itself
            check_choices(value, f"{key}.")


def validate_config(cfg: TrainConfig) -> None:
    """Check values that the schema's types cannot express; raise ``ValueError`` naming the key."""
    check_choices(cfg)
    for preset in cfg.compile.presets:
        if preset not in COMPILE_PRESETS:
            raise ValueError(f"compile.presets must name {', '.join(COMPILE_PRESETS)}; got {preset!r}")
    if cfg.compile.presets and not cfg.compile.enabled:
        raise ValueError(f"compile.presets={list(cfg.compile.presets)} needs compile.enabled=true (compile=true)")
    if cfg.fp8.recipe not in FP8_RECIPES:
        raise ValueError(f"fp8.recipe must be one of {', '.join(FP8_RECIPES)}; got {cfg.fp8.recipe!r}")
    positive = {
        "num_train_steps": cfg.num_train_steps,
        "grad_acc_steps": cfg.grad_acc_steps,
        "parallelism.cp_size": cfg.parallelism.cp_size,
        "parallelism.dp_replicate": cfg.parallelism.dp_replicate,
        "nan_tolerance": cfg.nan_tolerance,
        "logging.log_every_n_steps": cfg.logging.log_every_n_steps,
        "checkpoint.keep_last_n": cfg.checkpoint.keep_last_n,
        "quant_stats.freq": cfg.quant_stats.freq,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1; got {value}")
    non_negative = {
        "parallelism.prefetch": cfg.parallelism.prefetch,
        "checkpoint.save_every_n_steps": cfg.checkpoint.save_every_n_steps,
        "scheduler.warmup_steps": cfg.scheduler.warmup_steps,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0; got {value}")
    if cfg.optimizer.lr <= 0:
        raise ValueError(f"optimizer.lr must be > 0; got {cfg.optimizer.lr}")
    if len(cfg.optimizer.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1); got {cfg.optimizer.betas}")
    if not 0.0 <= cfg.scheduler.min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1]; got {cfg.scheduler.min_lr_ratio}")
    if cfg.max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0; got {cfg.max_grad_norm}")
    if cfg.profiler.enabled and not 1 <= cfg.profiler.start_step <= cfg.profiler.end_step:
        raise ValueError(
            "profiler.start_step and profiler.end_step must satisfy 1 <= start_step <= end_step; "
            f"got {cfg.profiler.start_step}..{cfg.profiler.end_step}"
        )
    if cfg.fp8.layers is not None and (not cfg.fp8.layers or any(layer < 1 for layer in cfg.fp8.layers)):
        raise ValueError(f"fp8.layers lists 1-indexed transformer blocks (>= 1); got {cfg.fp8.layers}")
    if cfg.parallelism.strategy != "fsdp2" and cfg.parallelism.dp_replicate != 1:
        raise ValueError(
            f"parallelism.dp_replicate={cfg.parallelism.dp_replicate} (HSDP) needs parallelism.strategy=fsdp2; "
            f"got {cfg.parallelism.strategy!r}"
        )
    if cfg.parallelism.strategy == "mfsdp" and cfg.parallelism.cp_size > 1:
        # Not run on GPUs yet (docs/context_parallel.md): refuse rather than risk a silently wrong gradient reduction.
        raise ValueError(
            f"parallelism.cp_size={cfg.parallelism.cp_size} with parallelism.strategy=mfsdp is not supported yet; "
            "use parallelism.strategy=fsdp2 for context parallelism"
        )


def ignored_settings(cfg: TrainConfig, *, world_size: int, device_type: str) -> list[str]:
    """Settings this run will not use, each with why: the trainer logs them as warnings (never silence).

    A pure function of the config and the run's shape, so it is tested without a GPU or a process group.
    """
    notes = []
    sharded = cfg.parallelism.strategy in ("fsdp2", "mfsdp") and (
        world_size > 1 or (cfg.parallelism.single_gpu_fsdp and cfg.dtype == "bf16" and device_type == "cuda")
    )
    defaults = ParallelismConfig()
    if not sharded:
        for key in ("reshard_after_forward", "prefetch", "reduce_dtype", "fp32_master_weights"):
            if getattr(cfg.parallelism, key) != getattr(defaults, key):
                notes.append(f"parallelism.{key}={getattr(cfg.parallelism, key)!r} is ignored: this run is not "
                             f"sharded (strategy={cfg.parallelism.strategy}, {world_size} rank(s) on {device_type})")  # fmt: skip
    if cfg.parallelism.strategy == "mfsdp":
        for key in ("reshard_after_forward", "prefetch"):
            if getattr(cfg.parallelism, key) != getattr(defaults, key):
                notes.append(f"parallelism.{key} is an FSDP2 setting; Megatron-FSDP ignores it")
    if cfg.parallelism.single_gpu_fsdp and (world_size > 1 or device_type != "cuda" or cfg.dtype != "bf16"):
        notes.append("parallelism.single_gpu_fsdp=true only applies to one GPU with dtype=bf16; ignored here")
    if cfg.quant_stats.enabled and not cfg.fp8.enabled:
        notes.append("quant_stats.enabled=true records FP8 layers, and fp8.enabled=false: nothing is recorded")
    if not cfg.fp8.enabled and (cfg.fp8.layers is not None or cfg.fp8.modules is not None):
        notes.append("fp8.layers / fp8.modules are set but fp8.enabled=false: ignored")
    notes += ignored_image_settings(cfg.data)  # sequence settings of an image-classification run
    if not cfg.data.use_sequence_packing:
        packed_defaults = DataConfig(source=cfg.data.source)
        for key in ("max_tokens_per_batch", "split_overflow", "packing_buffer_size"):
            if getattr(cfg.data, key) != getattr(packed_defaults, key):
                notes.append(f"data.{key} is a packing setting and data.use_sequence_packing=false: ignored")
    elif cfg.data.micro_batch_size != DataConfig(source=cfg.data.source).micro_batch_size:
        notes.append("data.micro_batch_size sizes padded batches; packed ones use data.max_tokens_per_batch: ignored")
    if cfg.optimizer.fused and device_type != "cuda":
        notes.append("optimizer.fused=true needs CUDA; the foreach AdamW runs instead")
    return notes


# On resume, the checkpoint's value wins over a changed config value for these keys; why (said when they differ).
CHECKPOINT_WINS: dict[str, str] = {
    "seed": "the checkpoint's RNG streams continue",
    "model.init_from": "the weights come from the checkpoint",
}
# Not compared on resume: where the run lives, and the switches that decide how it starts.
_NOT_COMPARED = frozenset(
    {"run_dir", "checkpoint.ckpt_dir", "checkpoint.resume_from_checkpoint", "checkpoint.move_aside_other_runs"}
)
# Data keys that do not change the batches (as the loader's own resume check).
_FREE_DATA_KEYS = frozenset({"data.pin_memory"})
_SCHEDULE_KEYS = ("optimizer.", "scheduler.", "num_train_steps")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))  # an empty dict (no overrides) adds no key
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shapes_weights_or_data(key: str) -> bool:
    """Keys that decide the weights' shapes or the data stream: a resume must not change them."""
    if key.startswith("data."):
        return key not in _FREE_DATA_KEYS
    return key in ("model.name", "model.size") or key.startswith("model.overrides.")


def resume_refusals(saved: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The model and data settings that differ between a checkpoint's config and this run's, as
    ``"key: saved -> new"`` (empty: resumable). A data key missing from ``saved`` was added to the schema later and
    is not compared; a ``model.overrides`` entry present on one side only is a difference."""
    if not saved:
        return []
    old, now = _flatten(saved), _flatten(new)
    differences = []
    for key in sorted(k for k in set(old) | set(now) if _shapes_weights_or_data(k)):
        if key in old and key in now:
            if old[key] != now[key]:
                differences.append(f"{key}: {old[key]!r} -> {now[key]!r}")
        elif key.startswith("model.overrides."):
            differences.append(f"{key}: {old.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}")
    return differences


def resume_report(saved: dict[str, Any] | None, new: dict[str, Any], *, checkpoint: str) -> list[str]:
    """Lines for the log when a run resumes with changed settings: which values the new config sets (the learning
    rate and schedule among them) and which the checkpoint overrides (:data:`CHECKPOINT_WINS`)."""
    if not saved:
        return []
    old, now = _flatten(saved), _flatten(new)
    changed = sorted(
        k for k in set(old) & set(now)
        if old[k] != now[k] and k not in _NOT_COMPARED and not _shapes_weights_or_data(k)
    )  # fmt: skip
    config_sets = [k for k in changed if k not in CHECKPOINT_WINS]
    checkpoint_wins = [k for k in changed if k in CHECKPOINT_WINS]
    lines = []
    if config_sets:
        values = ", ".join(f"{k}={now[k]!r} (checkpoint: {old[k]!r})" for k in config_sets)
        line = f"resuming {checkpoint} with changed settings; the new config sets {values}"
        if any(k.startswith(_SCHEDULE_KEYS) for k in config_sets):
            line += " (the learning rate follows the new config's schedule at the restored step)"
        lines.append(line)
    if checkpoint_wins:
        values = ", ".join(f"{k} (the new config says {now[k]!r}, the checkpoint {old[k]!r}: {CHECKPOINT_WINS[k]})"
                           for k in checkpoint_wins)  # fmt: skip
        lines.append(f"resuming {checkpoint}: the checkpoint overrides {values}")
    return lines


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` in the run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
