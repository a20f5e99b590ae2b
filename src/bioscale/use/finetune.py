"""Fine-tuning ESM-2 heads: per-residue (token) classification and per-sequence classification or regression,
full or with LoRA adapters (``peft``), with metrics on a held-out split.

One function, :func:`finetune`, reads a labelled table, splits it *by sequence* (a hash of the sequence string, so
identical sequences always land in the same split and no residue of a validation protein is trained on), cuts
sequences to the model's context, trains with AdamW and a warmup + cosine schedule in token-budget micro-batches,
evaluates on the held-out split, and saves either the whole model or only the LoRA adapter (+ the new head) with the
tokenizer, the resolved config and the metrics. :func:`load_finetuned` restores it.

Batches never mix sequences: packed batches (the GPU path) carry ``cu_seq_lens`` so attention stays inside each
sequence and the sequence head pools per sequence; padded batches mask padding. Long sequences: token classification
cuts them into consecutive non-overlapping pieces of the context length (every residue is trained on and scored
exactly once); sequence tasks keep the first ``max_length`` tokens (a warning gives the count).

Secondary structure (Porter6, 8-state DSSP with ``~`` for coil) uses :data:`DSSP8_LABELS`; :func:`dssp8_to_dssp3`
gives the 3-state reduction (H, G, I → H; E, B → E; the rest → C), the convention Q3 is reported in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.dssp import (
    _DSSP8_ALIASES,
    DSSP3_LABELS,
    DSSP8_LABELS,
    DSSP8_TO_DSSP3_INDEX,
    dssp8_to_dssp3,
)
from bioscale.models import spec_for_model
from bioscale.train.config import OptimizerConfig, SchedulerConfig, check_choices, resolve_aliases
from bioscale.models.loss import IGNORE_INDEX
from bioscale.use.batching import ModelBatch, collate_packed, collate_padded, plan_batches
from bioscale.use.embed import default_device, resolve_batching, special_affixes, tokenize_residues
from bioscale.use.inputs import read_table
from bioscale.use.loading import LoadedModel, family_tasks, load_config, load_model
from bioscale.train.optimizer import build_optimizer
from bioscale.train.schedulers import build_lr_scheduler
from bioscale.train.step import TrainState, train_step

logger = logging.getLogger(__name__)

TASKS = ("token_classification", "sequence_classification", "sequence_regression")

@dataclass
class LoraSettings:
    """LoRA through ``peft``: low-rank adapters on the transformer blocks' projections; the head trains fully.

    ``target_modules`` are module names inside each block (ESM-2: the fused ``qkv_proj``, ``out_proj`` and the MLP's
    ``up_proj`` / ``down_proj``); they are matched only under ``layers.N.``, so the head's own ``out_proj`` is not
    adapted but saved whole.
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["qkv_proj", "out_proj", "up_proj", "down_proj"])


# Flat names of earlier releases -> the sections fine-tuning shares with the trainer.
FINETUNE_ALIASES: dict[str, str] = {
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "warmup_steps": "scheduler.warmup_steps",
    "min_lr_ratio": "scheduler.min_lr_ratio",
    "grad_clip": "max_grad_norm",
    "max_steps": "num_train_steps",
}


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run reads (recipes in ``bioscale/configs/finetune/*.yaml`` fill it in).

    Attributes:
        task: ``token_classification``, ``sequence_classification`` or ``sequence_regression``.
        model: checkpoint directory or Hub id of the ESM-2 model to start from (bioscale or ``transformers``).
        data: parquet / CSV / TSV with a sequence column and a label column.
        output_dir: where the model or adapter, config and metrics go.
        sequence_column, label_column: column names in ``data``.
        label_set: token classification: ``dssp8`` (labels are 8-state DSSP strings, Q8 and Q3 reported), ``dssp3``
            (train on the 3-state reduction of DSSP8 strings, or on H/E/C strings), or ``auto`` (every character
            seen in the label strings is a class). Sequence classification: ``auto`` (sorted distinct values).
        val_data: a separate validation file; else ``val_fraction`` of the sequences is held out by hash.
        max_length: tokens per example, special tokens included (ESM-2 was trained on 1,024).
        max_tokens_per_batch: token budget per optimizer step (padded batches count their padding).
        batching: ``auto`` (packed on GPU where the varlen kernel runs, padded otherwise), ``packed`` or ``padded``.
        num_train_steps: optimizer steps (the training split is cycled through in reshuffled epochs as needed).
        optimizer, scheduler, max_grad_norm: the trainer's own sections (``bioscale.train.config``): AdamW, and
            warmup then cosine decay by default. The flat names of earlier releases (``lr``, ``weight_decay``,
            ``warmup_steps``, ``min_lr_ratio``, ``grad_clip``, ``max_steps``) are aliases (:data:`FINETUNE_ALIASES`).
        eval_every, log_every: in steps; evaluation also runs at the end.
        max_train_sequences, max_val_sequences: optional caps (quick runs), applied after the split.
        device: ``cuda``/``cpu``/``None`` (CUDA when available); bf16 autocast on CUDA, float32 on CPU.
        lora: see :class:`LoraSettings`.
    """

    task: str = "token_classification"
    model: str = ""
    data: str = ""
    output_dir: str = "outputs/finetune"
    sequence_column: str = "sequence"
    label_column: str = "label"
    label_set: str = "auto"
    val_data: str | None = None
    val_fraction: float = 0.1
    max_length: int = 1024
    max_tokens_per_batch: int = 8192
    batching: str = "auto"
    num_train_steps: int = 500
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, weight_decay=0.01))
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(kind="warmup_cosine", warmup_steps=20, min_lr_ratio=0.1)
    )
    max_grad_norm: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    seed: int = 0
    max_train_sequences: int | None = None
    max_val_sequences: int | None = None
    device: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        """``ValueError`` naming the offending key."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.model:
            raise ValueError("model is required (a checkpoint directory or Hub id)")
        if not self.data:
            raise ValueError("data is required (a parquet/CSV file with sequences and labels)")
        if self.task == "token_classification" and self.label_set not in ("auto", "dssp8", "dssp3"):
            raise ValueError(
                f"label_set must be 'auto', 'dssp8' or 'dssp3' for token classification, got {self.label_set!r}"
            )
        if self.task != "token_classification" and self.label_set != "auto":
            raise ValueError(f"label_set={self.label_set!r} applies to token_classification only; use 'auto'")
        if not 0.0 < self.val_fraction < 1.0 and self.val_data is None:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.batching not in ("auto", "packed", "padded"):
            raise ValueError(f"batching must be 'auto', 'packed' or 'padded', got {self.batching!r}")
        check_choices(self.optimizer, "optimizer.")
        check_choices(self.scheduler, "scheduler.")
        for key in ("max_length", "max_tokens_per_batch", "num_train_steps", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_tokens_per_batch < self.max_length:
            raise ValueError(
                f"max_tokens_per_batch ({self.max_tokens_per_batch}) must be >= max_length ({self.max_length})"
            )
        if self.optimizer.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")
        if self.lora.enabled and (self.lora.r < 1 or not self.lora.target_modules):
            raise ValueError("lora.r must be >= 1 and lora.target_modules non-empty when lora.enabled")


def finetune_recipes_dir() -> Path:
    """The fine-tuning recipes shipped in the package (``bioscale/configs/finetune``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("bioscale") / "configs" / "finetune"))


def list_finetune_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description (the recipe file's first comment line)."""
    recipes = {}
    for path in sorted(finetune_recipes_dir().glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "")
        recipes[path.stem] = first.lstrip("#").strip()
    return recipes


def load_finetune_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """A validated :class:`FinetuneConfig` from a recipe (a shipped name or a YAML path) and ``key=value`` overrides.

    Unknown keys and mistyped values raise ``ValueError`` naming the key (the dataclass is the schema).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(FinetuneConfig)]
    try:
        if recipe is not None:
            path = Path(recipe)
            if not path.suffix:
                path = finetune_recipes_dir() / f"{recipe}.yaml"
            if not path.is_file():
                known = ", ".join(list_finetune_recipes()) or "none"
                raise ValueError(f"no fine-tuning recipe {str(recipe)!r} (shipped recipes: {known})")
            recipe_values = OmegaConf.to_container(OmegaConf.load(path))
            flat = [f"{k}={v}" for k, v in recipe_values.items() if k in FINETUNE_ALIASES]  # older recipe files
            recipe_values = {k: v for k, v in recipe_values.items() if k not in FINETUNE_ALIASES}
            layers.append(OmegaConf.create(recipe_values))
            if flat:
                layers.append(OmegaConf.from_dotlist(resolve_aliases(flat, FINETUNE_ALIASES)))
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise ValueError(f"overrides must be key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(resolve_aliases(list(overrides), FINETUNE_ALIASES)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid fine-tuning configuration: {err}".splitlines()[0]) from err
    assert isinstance(config, FinetuneConfig), type(config)
    config.validate()
    return config


def resolve_data_path(path: str) -> str:
    """``path``, or the shared data folder's file of the same name when ``path`` is the recipes' ``../shared/data/X``.

    The shipped recipes name the Porter6 sample relative to the repository root (``../shared/data/...``), which only
    resolves when bioscale runs from there; like the evaluation stage, look in ``$BIOSCALE_SHARED_DATA`` and beside the
    checkout before giving up, so ``bioscale finetune --task token_classification`` works from any directory.
    """
    given = Path(path)
    if given.exists() or given.parts[:3] != ("..", "shared", "data") or len(given.parts) != 4:
        return path
    folders = [Path(os.environ["BIOSCALE_SHARED_DATA"])] if os.environ.get("BIOSCALE_SHARED_DATA") else []
    folders.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")  # <repo>/../shared/data
    for folder in folders:
        if (folder / given.name).is_file():
            logger.info("data %s not found from %s; using %s", path, Path.cwd(), folder / given.name)
            return str(folder / given.name)
    return path


@dataclass
class LabelledData:
    """Sequences and their labels, read from a table. ``labels`` are per-residue strings (token classification),
    class names (sequence classification) or floats (regression)."""

    ids: list[str]
    sequences: list[str]
    labels: list[Any]


@dataclass
class Example:
    """One model input: token ids with the special tokens, and its target (per-token ids or one value)."""

    token_ids: list[int]
    target: list[int] | int | float


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the trained model, the final validation metrics and where it was saved."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, float]
    history: list[dict[str, float]]
    output_dir: Path


def read_labelled(path: str | Path, sequence_column: str, label_column: str, task: str) -> LabelledData:
    """Read sequences and labels; ``ValueError`` for missing columns, empty sequences, nulls, or length mismatches."""
    table = read_table(path)
    for what, column in (("sequence", sequence_column), ("label", label_column)):
        if column not in table.column_names:
            raise ValueError(f"{what} column {column!r} not found in {str(path)!r}; columns are {table.column_names}")
    sequences_raw = table.column(sequence_column).to_pylist()
    labels_raw = table.column(label_column).to_pylist()
    if not sequences_raw:
        raise ValueError(f"no rows in {str(path)!r}")
    id_column = next((c for c in ("id", "ID", "name", "Name") if c in table.column_names), None)
    ids = (
        [str(i) for i in table.column(id_column).to_pylist()]
        if id_column
        else [f"row{i}" for i in range(len(sequences_raw))]
    )
    sequences: list[str] = []
    labels: list[Any] = []
    for row, (record_id, sequence, label) in enumerate(zip(ids, sequences_raw, labels_raw)):
        where = f"{str(path)!r} row {row} ({record_id})"
        sequence = "".join(str(sequence or "").split()).upper()
        if not sequence:
            raise ValueError(f"{where}: empty sequence")
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise ValueError(f"{where}: missing label in column {label_column!r}")
        if task == "token_classification":
            label = str(label)
            if len(label) != len(sequence):
                raise ValueError(
                    f"{where}: {len(sequence)} residues but {len(label)} per-residue labels in {label_column!r}"
                )
        elif task == "sequence_regression":
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: label {label!r} is not a number (task sequence_regression)") from None
        else:
            label = str(label)
        sequences.append(sequence)
        labels.append(label)
    return LabelledData(ids=ids, sequences=sequences, labels=labels)


def split_by_sequence(sequences: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``(train, validation)``: a sequence is held out when a hash of ``(seed, sequence)`` falls below
    ``val_fraction``, so duplicates share a split and the split does not depend on row order. Both splits get at
    least one distinct sequence."""
    scores = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big") / 2.0**64
            for s in sequences
        ]
    )
    is_val = scores < val_fraction
    distinct = {s for s in sequences}
    if len(distinct) < 2:
        raise ValueError("need at least two distinct sequences to hold out a validation split")
    if not is_val.any():
        is_val = np.array([s == sequences[int(scores.argmin())] for s in sequences])
    if is_val.all():
        is_val = np.array([s != sequences[int(scores.argmax())] for s in sequences])
    return np.flatnonzero(~is_val).tolist(), np.flatnonzero(is_val).tolist()


def token_label_names(label_set: str, labels: Sequence[str]) -> tuple[str, ...]:
    """The class names of a token-classification run."""
    if label_set == "dssp8":
        return DSSP8_LABELS
    if label_set == "dssp3":
        return DSSP3_LABELS
    return tuple(sorted({c for row in labels for c in row}))


def encode_token_labels(label_set: str, names: Sequence[str], label: str, where: str) -> list[int]:
    """Per-residue class ids of one label string (DSSP aliases such as ``-``/``C`` for coil accepted)."""
    if label_set == "dssp3" and any(c not in DSSP3_LABELS for c in label):
        label = dssp8_to_dssp3(label)
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for position, char in enumerate(label):
        char = _DSSP8_ALIASES.get(char, char) if label_set == "dssp8" else char
        if char not in index:
            raise ValueError(f"{where}: label {char!r} at position {position + 1} is not one of {list(names)}")
        ids.append(index[char])
    return ids


def build_examples(
    data: LabelledData,
    indices: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    max_length: int,
    label_names: Sequence[str] | None,
    label_set: str,
) -> tuple[list[Example], int]:
    """Model inputs for the sequences at ``indices``; returns ``(examples, num_cut)`` (sequences cut or truncated)."""
    prefix, suffix = special_affixes(tokenizer)
    window = max_length - len(prefix) - len(suffix)
    if window < 1:
        raise ValueError(f"max_length={max_length} leaves no room for residues")
    ids = [data.ids[i] for i in indices]
    residue_ids = tokenize_residues(tokenizer, ids, [data.sequences[i] for i in indices])
    class_index = {name: i for i, name in enumerate(label_names or ())}
    examples: list[Example] = []
    num_cut = 0
    for i, tokens in zip(indices, residue_ids):
        label = data.labels[i]
        if len(tokens) > window:
            num_cut += 1
        if task == "token_classification":
            assert label_names is not None
            label_ids = encode_token_labels(label_set, label_names, label, f"sequence {data.ids[i]!r}")
            for start in range(0, len(tokens), window):
                piece = tokens[start : start + window]
                target = [IGNORE_INDEX] * len(prefix) + label_ids[start : start + window] + [IGNORE_INDEX] * len(suffix)
                examples.append(Example(token_ids=prefix + piece + suffix, target=target))
        else:
            target = float(label) if task == "sequence_regression" else class_index[label]
            examples.append(Example(token_ids=prefix + tokens[:window] + suffix, target=target))
    return examples, num_cut


def collate_examples(
    examples: Sequence[Example], *, task: str, batching: str, pad_token_id: int, device: torch.device
) -> ModelBatch:
    """The model batch for ``examples``: per-token labels for token classification, one label per sequence else."""
    token_lists = [e.token_ids for e in examples]
    token_labels = [e.target for e in examples] if task == "token_classification" else None
    if batching == "packed":
        batch = collate_packed(token_lists, labels=token_labels, device=device)  # type: ignore[arg-type]
    else:
        batch = collate_padded(token_lists, pad_token_id=pad_token_id, labels=token_labels, device=device)  # type: ignore[arg-type]
    if task != "token_classification":
        dtype = torch.float32 if task == "sequence_regression" else torch.long
        batch.inputs["labels"] = torch.tensor([e.target for e in examples], dtype=dtype, device=device)
        if task == "sequence_regression":
            batch.inputs["labels"] = batch.inputs["labels"][:, None]  # type: ignore[index]
    return batch


def apply_lora(model: PreTrainedModel, settings: LoraSettings, base_model_name_or_path: str | None = None) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on its transformer blocks (``peft``); the head stays fully trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs the peft package: pip install 'bioscale[lora]' (or pip install peft)") from err
    names = "|".join(sorted({name.strip() for name in settings.target_modules}))
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # A regex fullmatched against module paths: only projections inside blocks, never the head's out_proj.
        target_modules=rf".*\.layers\.\d+\..*\b({names})",
        modules_to_save=["classifier"],
        base_model_name_or_path=base_model_name_or_path,
    )
    peft_model = get_peft_model(model, lora_config)
    if not any("lora_" in name for name, _ in peft_model.named_parameters()):
        raise ValueError(f"lora.target_modules {settings.target_modules} matched no module of {type(model).__name__}")
    return peft_model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    task: str,
    batching: str,
    max_tokens_per_batch: int,
    pad_token_id: int,
    device: torch.device,
    label_set: str = "auto",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and task metrics over ``examples`` (see :func:`compute_metrics`)."""
    was_training = model.training
    model.eval()
    predictions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    loss_sum = 0.0
    count = 0
    for indices in plan_batches(
        [len(e.token_ids) for e in examples], max_tokens_per_batch, padded=batching == "padded"
    ):
        batch_examples = [examples[i] for i in indices]
        batch = collate_examples(batch_examples, task=task, batching=batching, pad_token_id=pad_token_id, device=device)
        with _autocast(device, autocast_dtype):
            output = model(**batch.inputs)
        labels = batch.inputs["labels"]
        assert isinstance(labels, torch.Tensor)
        if task == "token_classification":
            logits = batch.flatten(output.logits).float()
            flat_labels = batch.flatten(labels.unsqueeze(-1)).squeeze(-1)
            keep = flat_labels != IGNORE_INDEX
            predictions.append(logits[keep].argmax(-1).cpu().numpy())
            targets.append(flat_labels[keep].cpu().numpy())
            n = int(keep.sum())
        elif task == "sequence_classification":
            predictions.append(output.logits.float().argmax(-1).cpu().numpy())
            targets.append(labels.cpu().numpy())
            n = len(batch_examples)
        else:
            predictions.append(output.logits.float()[:, 0].cpu().numpy())
            targets.append(labels[:, 0].cpu().numpy())
            n = len(batch_examples)
        loss_sum += float(output.loss) * n
        count += n
    model.train(was_training)
    metrics = compute_metrics(task, np.concatenate(predictions), np.concatenate(targets), label_set=label_set)
    metrics["loss"] = loss_sum / max(count, 1)
    return metrics


def compute_metrics(
    task: str, predictions: np.ndarray, targets: np.ndarray, *, label_set: str = "auto"
) -> dict[str, float]:
    """Metrics from flat predictions and targets.

    Token classification: ``accuracy`` over residues, plus ``q8`` and ``q3`` (DSSP8 run: predictions and labels
    reduced to 3 states) or ``q3`` (DSSP3 run). Sequence classification: ``accuracy``. Regression: ``mse``,
    ``pearson`` and ``spearman``.
    """
    if task == "sequence_regression":
        predictions = predictions.astype(np.float64)
        targets = targets.astype(np.float64)
        return {
            "mse": float(np.mean((predictions - targets) ** 2)),
            "pearson": _pearson(predictions, targets),
            "spearman": _pearson(_ranks(predictions), _ranks(targets)),
            "num_sequences": float(len(targets)),
        }
    metrics = {"accuracy": float(np.mean(predictions == targets))}
    if task == "token_classification":
        metrics["num_residues"] = float(len(targets))
        if label_set == "dssp8":
            metrics["q8"] = metrics["accuracy"]
            metrics["q3"] = float(np.mean(DSSP8_TO_DSSP3_INDEX[predictions] == DSSP8_TO_DSSP3_INDEX[targets]))
        elif label_set == "dssp3":
            metrics["q3"] = metrics["accuracy"]
    else:
        metrics["num_sequences"] = float(len(targets))
    return metrics


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def finetune(config: FinetuneConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune per ``config`` and save the result to ``config.output_dir`` (see the module docstring).

    Args:
        loaded: an already loaded model for ``config.task`` (with its head); default: load ``config.model``.
        progress: log progress at INFO every ``log_every`` steps.

    Returns:
        :class:`FinetuneResult` with the final validation metrics.
    """
    config.validate()
    torch.manual_seed(config.seed)
    device = torch.device(config.device) if config.device else default_device()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    batching = resolve_batching(config.batching, device, autocast_dtype or torch.float32)
    task = config.task

    if loaded is None:
        load_config(config.model)  # fail on a bad model path before reading the data
    data = read_labelled(resolve_data_path(config.data), config.sequence_column, config.label_column, task)
    if config.val_data is not None:
        val_data = read_labelled(resolve_data_path(config.val_data), config.sequence_column, config.label_column, task)
        train_idx, val_idx = list(range(len(data.ids))), list(range(len(val_data.ids)))
    else:
        val_data = data
        train_idx, val_idx = split_by_sequence(data.sequences, config.val_fraction, config.seed)
    if config.max_train_sequences is not None:
        train_idx = train_idx[: config.max_train_sequences]
    if config.max_val_sequences is not None:
        val_idx = val_idx[: config.max_val_sequences]

    label_names: tuple[str, ...] | None
    if task == "token_classification":
        label_names = token_label_names(config.label_set, data.labels)
    elif task == "sequence_classification":
        label_names = tuple(sorted({str(label) for label in data.labels}))
        unseen = sorted({str(val_data.labels[i]) for i in val_idx} - set(label_names))
        if unseen:
            raise ValueError(f"validation labels {unseen} never occur in the training data {config.data!r}")
        if len(label_names) < 2:
            raise ValueError(f"sequence classification needs at least 2 classes in {config.data!r}, got {label_names}")
    else:
        label_names = None

    overrides: dict[str, Any]
    if label_names is not None:
        overrides = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
        if task == "sequence_classification":
            overrides["problem_type"] = "single_label_classification"
    else:
        overrides = {"num_labels": 1, "problem_type": "regression"}
    head_task = "token_classification" if task == "token_classification" else "sequence_classification"
    if loaded is None:
        loaded = load_model(config.model, task=head_task, config_overrides=overrides)
    if head_task not in family_tasks(loaded.family) or spec_for_model(loaded.model).causal:
        raise ValueError(
            f"fine-tuning a {head_task} head needs a bidirectional encoder with that head; {config.model!r} is a "
            f"{loaded.family} model (tasks {family_tasks(loaded.family)})"
        )
    base_model, tokenizer = loaded.model, loaded.tokenizer
    base_model.to(device=device, dtype=torch.float32)  # float32 master weights; bf16 comes from autocast

    build = {"task": task, "max_length": config.max_length, "label_names": label_names, "label_set": config.label_set}
    train_examples, train_cut = build_examples(data, train_idx, tokenizer, **build)  # type: ignore[arg-type]
    val_examples, val_cut = build_examples(val_data, val_idx, tokenizer, **build)  # type: ignore[arg-type]
    if train_cut + val_cut and task != "token_classification":
        warnings.warn(
            f"{train_cut + val_cut} sequences are longer than max_length={config.max_length} tokens and were "
            "truncated to their first residues",
            stacklevel=2,
        )
    logger.info(
        "fine-tuning %s: %d train / %d validation sequences (%d / %d examples), %s batches, device %s",
        task, len(train_idx), len(val_idx), len(train_examples), len(val_examples), batching, device,
    )  # fmt: skip

    model: nn.Module = base_model
    if config.lora.enabled:
        model = apply_lora(base_model, config.lora, base_model_name_or_path=_portable_source(config.model))
    model.train()


    optimizer = build_optimizer(
        model,
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
        fused=config.optimizer.fused,
        device=device,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        kind=config.scheduler.kind,
        warmup_steps=min(config.scheduler.warmup_steps, config.num_train_steps),
        total_steps=config.num_train_steps,
        min_lr_ratio=config.scheduler.min_lr_ratio,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eval_kwargs = {
        "task": task,
        "batching": batching,
        "max_tokens_per_batch": config.max_tokens_per_batch,
        "pad_token_id": pad_id,
        "device": device,
        "label_set": config.label_set,
        "autocast_dtype": autocast_dtype,
    }
    rng = np.random.default_rng(config.seed)
    lengths = [len(e.token_ids) for e in train_examples]
    # Step 0: the untrained head's validation metrics, the baseline every later number is read against.
    initial = evaluate(model, val_examples, **eval_kwargs)  # type: ignore[arg-type]
    history: list[dict[str, float]] = [{"step": 0.0, **{f"val_{k}": v for k, v in initial.items()}}]
    logger.info("step 0  validation %s", _format_metrics(initial))
    epoch_batches: list[list[int]] = []
    state = TrainState()
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    for step in range(1, config.num_train_steps + 1):
        if not epoch_batches:
            order = rng.permutation(len(train_examples)).tolist()
            epoch_batches = plan_batches(lengths, config.max_tokens_per_batch, padded=batching == "padded", order=order)
            epoch_batches.reverse()  # pop() from the end keeps the planned order
        indices = epoch_batches.pop()
        batch = collate_examples(
            [train_examples[i] for i in indices], task=task, batching=batching, pad_token_id=pad_id, device=device
        )
        # The trainer's step (bioscale.train.step). The heads' loss is already the mean over the batch's labels, so
        # the batch counts as one loss term and the step's normalisation divides by 1.
        result = train_step(
            model,
            optimizer,
            scheduler,
            [batch.inputs],
            state=state,
            loss_fn=lambda inputs: model(**inputs).loss,
            num_label_tokens=1,
            device=device,
            max_grad_norm=config.max_grad_norm,
            forward_context=lambda _: _autocast(device, autocast_dtype),
        )
        if result.skipped:
            raise FloatingPointError(
                f"non-finite loss {result.loss} or gradient norm {result.grad_norm} at step {step}; "
                f"lower optimizer.lr (now {config.optimizer.lr})"
            )
        window_loss += result.loss
        window_steps += 1
        window_tokens += int(batch.token_example.numel())
        if step % config.log_every == 0 or step == config.num_train_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": float(step),
                "train_loss": window_loss / window_steps,
                "lr": float(scheduler.get_last_lr()[0]),
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
            }
            history.append(record)
            if progress:
                logger.info(
                    "step %d  loss %.4f  lr %.2e  %.0f tok/s",
                    step,
                    record["train_loss"],
                    record["lr"],
                    record["tokens_per_s"],
                )
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        if step % config.eval_every == 0 and step != config.num_train_steps:
            metrics = evaluate(model, val_examples, **eval_kwargs)  # type: ignore[arg-type]
            history.append({"step": float(step), **{f"val_{k}": v for k, v in metrics.items()}})
            logger.info("step %d  validation %s", step, _format_metrics(metrics))
    metrics = evaluate(model, val_examples, **eval_kwargs)  # type: ignore[arg-type]
    history.append({"step": float(config.num_train_steps), **{f"val_{k}": v for k, v in metrics.items()}})
    logger.info("final validation %s", _format_metrics(metrics))

    output_dir = save_finetuned(model, tokenizer, config, metrics, history, head=_head_entry(overrides))
    return FinetuneResult(model=model, tokenizer=tokenizer, metrics=metrics, history=history, output_dir=output_dir)


def _head_entry(overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_labels": overrides["num_labels"],
        "id2label": {str(k): v for k, v in overrides.get("id2label", {}).items()},
        "problem_type": overrides.get("problem_type"),
    }


def _format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("num_"))


def _portable_source(source: str) -> str:
    """An absolute path for a local checkpoint (so the adapter finds its base from anywhere), else the Hub id."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def save_finetuned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: FinetuneConfig,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    head: dict[str, Any],
) -> Path:
    """Write ``OUT/adapter`` (LoRA: adapter + head) or ``OUT/model`` (full), the tokenizer, ``finetune_config.json``
    (the resolved config, with the base model as an absolute path, and the head: ``num_labels``, ``id2label``,
    ``problem_type``) and ``metrics.json``."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_dir = output_dir / ("adapter" if config.lora.enabled else "model")
    model.save_pretrained(weights_dir)
    tokenizer.save_pretrained(weights_dir)
    resolved = dataclasses.asdict(config)
    resolved["model"] = _portable_source(config.model)
    saved = {"config": resolved, "head": head}
    (output_dir / "finetune_config.json").write_text(json.dumps(saved, indent=2) + "\n")
    (output_dir / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2) + "\n")
    return output_dir


def load_finetuned(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    merge: bool = False,
) -> LoadedModel:
    """Load what :func:`finetune` saved in ``path``: the full model, or the base model + LoRA adapter (``peft``).

    ``merge=True`` folds the adapter into the base weights (``merge_and_unload``) and returns a plain bioscale model,
    which is what :func:`bioscale.use.hf_export.export_model` exports.
    """
    path = Path(path)
    config_path = path / "finetune_config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(path)!r} is not a fine-tuning output directory (no finetune_config.json)")
    saved = json.loads(config_path.read_text())
    head_task = (
        "token_classification" if saved["config"]["task"] == "token_classification" else "sequence_classification"
    )
    if (path / "model").is_dir():
        return load_model(path / "model", task=head_task, device=device, dtype=dtype)
    adapter_dir = path / "adapter"
    if not adapter_dir.is_dir():
        raise ValueError(f"{str(path)!r} holds neither model/ nor adapter/")
    from peft import PeftConfig, PeftModel

    from bioscale.use.loading import load_tokenizer

    base_source = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path or saved["config"]["model"]
    # The head's shape and label names come from the saved run; its weights from the adapter (modules_to_save).
    loaded = load_model(base_source, task=head_task, config_overrides=_head_overrides(saved["head"]))
    model: nn.Module = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
    if merge:
        model = model.merge_and_unload()
    model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = load_tokenizer(str(adapter_dir), loaded.family, loaded.model.config)
    return LoadedModel(model=model, tokenizer=tokenizer, family=loaded.family, source=str(path))  # type: ignore[arg-type]


def _head_overrides(head: dict[str, Any]) -> dict[str, Any]:
    """Config overrides that rebuild the head saved in ``finetune_config.json``'s ``head`` entry."""
    overrides: dict[str, Any] = {"num_labels": int(head["num_labels"])}
    if head.get("id2label"):
        overrides["id2label"] = {int(k): v for k, v in head["id2label"].items()}
        overrides["label2id"] = {v: int(k) for k, v in head["id2label"].items()}
    if head.get("problem_type"):
        overrides["problem_type"] = head["problem_type"]
    return overrides
