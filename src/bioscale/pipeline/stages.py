"""The train and eval stages, and the whole data → train → eval pipeline, as Python functions.

Each stage reads its input artifact (validated, kind checked), does its work through the library (the training loop
of :mod:`bioscale.train`, the measurements of :mod:`bioscale.eval`), and writes an artifact whose lineage names what
it consumed. The commands in cli.py are thin wrappers around these functions; tests and notebooks call them directly.

- :func:`train_stage`: a dataset artifact → a model artifact. Picks the recipe for the modality (``L0_sanity`` for
  proteins, ``L0_sanity_llama3`` for DNA), applies the scale's overrides, points ``data.source`` at the dataset's
  train shards and runs the training loop with its run directory inside the artifact.
- :func:`evaluate`: a model artifact (or any checkpoint directory) → an evaluation artifact: masked-LM perplexity or
  per-token NLL / bits per base on the dataset's validation split (or ``data``), the same for a randomly initialised
  model of the same shape, the secondary-structure probe for proteins, and a Markdown/HTML report with the curves.
- :func:`run_pipeline`: all three in sequence, under one output directory.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bioscale.models import get_model_spec
from bioscale.pipeline.artifacts import (
    Artifact,
    ArtifactMetadata,
    LineageEntry,
    Modality,
    Scale,
    lineage_entry,
    load_artifact,
    prepare_output_dir,
    read_artifact,
    source_lineage_entry,
    write_artifact,
)
from bioscale.pipeline.curate import curate
from bioscale.pipeline.image_eval import evaluate_image_classifier
from bioscale.pipeline.scales import get_preset
from bioscale.data.policy import InputPolicy
from bioscale.data.sources import iter_sequences, open_source
from bioscale.data.tokenizers import nucleotide_tokenizer
from bioscale.eval.perplexity import causal_lm_nll, masked_lm_perplexity
from bioscale.eval.report import ReportSection, plot_training_curves, write_report
from bioscale.eval.scoring_inputs import resolve_device
from bioscale.eval.single_cell import evaluate_single_cell_models
from bioscale.eval.secondary_structure import (
    load_secondary_structure,
    secondary_structure_finetune,
    secondary_structure_probe,
)
from bioscale.train.config import load_config
from bioscale.train.train import train
from bioscale.use.loading import family_of, load_model
from bioscale.use.loading import load_config as load_model_config

logger = logging.getLogger(__name__)

PORTER6_FILENAME = "porter6_secondary_structure_sample.parquet"
# Keys the train stage sets itself: overriding them would break the artifact's layout or its lineage.
_RESERVED_TRAIN_KEYS = ("data.source", "run_dir", "checkpoint.ckpt_dir", "checkpoint.save_final_model")
_HYDRA_PLAIN = re.compile(r"^[\w./:\-]+$")


def default_out(stage: str, scale: str, seed: int, root: str | Path = "outputs") -> Path:
    """``outputs/<stage>/<local time>-<scale>-seed<seed>``, made unique with a counter if it already exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / stage / f"{stamp}-{scale}-seed{seed}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def is_main_process() -> bool:
    """False on the non-zero ranks of a ``torchrun`` launch (they train, but only rank 0 writes the artifact)."""
    return int(os.environ.get("RANK", "0")) == 0


def _hydra_value(value: str | Path) -> str:
    """A path as a Hydra override value: quoted when it holds characters the override grammar would parse."""
    text = str(value)
    if _HYDRA_PLAIN.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------------


def train_stage(
    dataset: Artifact | str | Path,
    *,
    out: str | Path,
    scale: Scale = "tiny",
    seed: int = 0,
    overrides: Sequence[str] = (),
    device: str | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Train a model on a dataset artifact's train split; write a model artifact at ``out`` and return it.

    Args:
        dataset: the dataset artifact (directory or :class:`Artifact`).
        scale: picks the recipe overrides (model size, steps) from :mod:`bioscale.pipeline.scales`.
        seed: the run's seed (model init and data order).
        overrides: Hydra ``key=value`` overrides applied last (e.g. ``num_train_steps=500``, ``dtype=bf16``);
            ``data.source``, ``run_dir`` and ``checkpoint.*dir`` are set by the stage and cannot be overridden.
        device: ``cpu``, ``cuda`` or ``auto`` (default: the recipe's).

    Raises:
        ValueError: an invalid or wrong-kind dataset artifact, a reserved or invalid override.
    """

    data = load_artifact(dataset, "dataset")
    modality = data.metadata.modality
    if modality is None:
        raise ValueError(f"dataset artifact {data.path}: field 'modality' is not set (expected 'protein' or 'dna')")
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in _RESERVED_TRAIN_KEYS:
            raise ValueError(f"override {item!r}: {key} is set by the train stage (it points into the artifacts)")
    preset = get_preset(scale)
    recipe = preset.recipe[modality]
    out = Path(out)
    run_dir = out.resolve() / "run"
    stage_overrides = [
        *preset.train_overrides[modality],
        f"data.source={_hydra_value(data.file('train'))}",
        f"seed={seed}",
        f"data.seed={seed}",
        f"run_dir={_hydra_value(run_dir)}",
        f"checkpoint.ckpt_dir={_hydra_value(run_dir / 'checkpoints')}",
        "checkpoint.save_final_model=true",
    ]
    if modality == "dna":
        # The model's vocabulary must cover the tokenizer's ids (the Llama `debug` size defaults to 16 rows, the
        # nucleotide tokenizer has 20 tokens, and loading the export checks the fit). `++` sets it whether or not
        # the recipe already does.

        stage_overrides.append(f"++model.overrides.vocab_size={len(nucleotide_tokenizer())}")
    if device is not None:
        stage_overrides.append(f"device={device}")
    all_overrides = [*stage_overrides, *overrides]
    cfg = load_config(recipe, all_overrides)  # before creating anything: a bad override fails cleanly
    if is_main_process():
        # Under torchrun the other ranks touch no file before the process-group rendezvous inside train(), which
        # rank 0 only reaches after this: no race with the clean-up.
        prepare_output_dir(out, overwrite)
    logger.info("training recipe %s on %s (%d steps) into %s", recipe, data.file("train"), cfg.num_train_steps, run_dir)
    summary = train(cfg)

    paths = {
        "model": "run/checkpoints/final_model",
        "metrics": "run/metrics.jsonl",
        "config": "run/config.yaml",
        "summary": "run/summary.json",
    }
    optional = {"model_hf": "run/checkpoints/final_model_hf", "loss_plot": "run/loss.png"}
    paths.update({role: rel for role, rel in optional.items() if (out / rel).exists()})
    metrics = {
        key: summary.get(key)
        for key in (
            "first_loss", "final_loss", "min_loss", "final_step", "num_parameters", "num_skipped_steps",
            "wall_time_s", "tokens_per_sec_per_gpu", "real_tokens_per_sec_per_gpu", "mfu", "peak_mem_gb", "device",
            "world_size", "data_policy",
        )
        if key in summary
    }
    metadata = ArtifactMetadata(
        kind="model",
        modality=modality,
        paths=paths,
        metrics=json.loads(json.dumps(metrics, default=str)),
        config={
            "recipe": recipe,
            "overrides": all_overrides,
            "model": {"name": cfg.model.name, "size": cfg.model.size},
            "num_train_steps": cfg.num_train_steps,
            "max_seq_length": cfg.data.max_seq_length,
            "dtype": cfg.dtype,
        },
        lineage=[lineage_entry(data.path, data.metadata)],
        seed=seed,
        scale=scale,
    )
    if is_main_process():
        metadata = write_artifact(out, metadata)
    return Artifact(path=out.resolve(), metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------------


def find_shared_file(name: str) -> Path | None:
    """``name`` in the shared data folder: ``$BIOSCALE_SHARED_DATA``, ``./../shared/data`` or beside the checkout."""
    candidates = []
    if os.environ.get("BIOSCALE_SHARED_DATA"):
        candidates.append(Path(os.environ["BIOSCALE_SHARED_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")  # <repo>/../shared/data
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    return None


def random_init_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A model of the same class and config with fresh random weights (seeded; the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(copy.deepcopy(model.config))
        init_weights = getattr(fresh, "init_weights", None)
        if callable(init_weights):
            init_weights()
    param = next(model.parameters())
    return fresh.to(device=param.device, dtype=param.dtype).eval()


# Sequence column names tried, in order, when the caller names none (UniRef90 uses "sequence", Porter6 "Sequence").
SEQUENCE_COLUMNS = ("sequence", "Sequence", "seq", "sequences")


def _guess_sequence_column(spec: str | Path) -> str:
    """The first of :data:`SEQUENCE_COLUMNS` in a parquet file (or the first shard of a directory), else "sequence"."""
    import pyarrow.parquet as pq

    path = Path(spec)
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.parquet"))), path)
    if not (path.is_file() and path.suffix.lower() in (".parquet", ".pq")):
        return SEQUENCE_COLUMNS[0]
    try:
        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001  (unreadable: let the data layer report it with its own message)
        return SEQUENCE_COLUMNS[0]
    return next((name for name in SEQUENCE_COLUMNS if name in names), SEQUENCE_COLUMNS[0])


def _read_sequences(
    spec: str | Path, modality: Modality, *, limit: int | None, sequence_column: str | None = None
) -> tuple[list[str], dict[str, int]]:
    """Sequences of any source the data layer opens, with its input policy applied (no cropping: eval chunks).

    ``sequence_column=None`` picks the first of :data:`SEQUENCE_COLUMNS` that a parquet input has.
    """

    if sequence_column is None:
        sequence_column = _guess_sequence_column(spec)
    try:
        source = open_source(str(spec), sequence_column=sequence_column)
    except FileNotFoundError as err:
        raise ValueError(f"evaluation data {spec}: {err}") from err
    policy = InputPolicy("protein" if modality == "protein" else "nucleotide", unknown_residues="map")
    sequences = []
    for _, sequence in iter_sequences(source, policy):
        sequences.append(sequence)
        if limit is not None and len(sequences) >= limit:
            break
    if not sequences:
        raise ValueError(f"evaluation data {spec}: no sequence left after the input policy ({policy.stats.as_dict()})")
    return sequences, policy.stats.as_dict()


def _dataset_of(model_artifact: Artifact) -> Artifact | None:
    for entry in model_artifact.metadata.lineage:
        if entry.kind == "dataset":
            try:
                return load_artifact(entry.path, "dataset")
            except ValueError as err:
                raise ValueError(
                    f"model artifact {model_artifact.path}: its field 'lineage' names dataset {entry.path}, which "
                    f"cannot be read ({err}); pass --data to evaluate on another file"
                ) from err
    return None


def _resolve_model(model: Artifact | str | Path) -> tuple[Path, Artifact | None, LineageEntry]:
    """The checkpoint directory to load, the model artifact (if it is one), and its lineage record.

    Accepts a model artifact, or a plain checkpoint directory (``config.json`` inside: a ``final_model``, a converted
    ``transformers`` checkpoint), which is then recorded as a source in the lineage.
    """
    path = model.path if isinstance(model, Artifact) else Path(model)
    if isinstance(model, Artifact) or (path / "metadata.json").is_file() or not (path / "config.json").is_file():
        artifact = load_artifact(model, "model")
        return artifact.file("model"), artifact, lineage_entry(artifact.path, artifact.metadata)
    return path.resolve(), None, source_lineage_entry(path)


def evaluate(
    model: Artifact | str | Path,
    *,
    out: str | Path,
    data: str | Path | None = None,
    sequence_column: str | None = None,
    scale: Scale = "tiny",
    seed: int = 0,
    secondary_structure: str | Path | bool | None = None,
    max_sequences: int | None = -1,
    ss_max_proteins: int | None = -1,
    probe_max_iter: int | None = None,
    ss_head: str = "probe",
    ss_finetune_steps: int | None = None,
    random_baseline: bool = True,
    device: str | None = None,
    bf16: bool = False,
    overwrite: bool = False,
    label_column: str | None = None,
    gene_medians: str | Path | None = None,
) -> Artifact:
    """Evaluate a model; write an evaluation artifact (metrics, report.md/html, curves PNG) at ``out`` and return it.

    Single-cell models (Geneformer) are scored on ``data`` (a tokenized parquet or an ``.h5ad``, ranked with
    ``gene_medians``): masked-gene accuracy / perplexity, and a cell-type probe on ``label_column`` when given
    (:func:`_evaluate_cells`).

    Args:
        model: a model artifact, or any checkpoint directory (bioscale or ``transformers`` ESM-2 / Llama).
        data: FASTA/parquet (any source the data layer opens) to evaluate on; default: the validation split of the
            dataset artifact in the model's lineage. ``sequence_column`` names its column for parquet/HF data
            (default: the first of ``sequence``, ``Sequence``, ``seq``, ``sequences`` in a parquet file).
        secondary_structure: the Porter6 parquet for the probe (proteins only); ``None`` looks for
            ``porter6_secondary_structure_sample.parquet`` in the shared data folder and skips the probe, with a
            note in the report and metrics, when it is absent; ``False`` disables the probe.
        max_sequences: evaluate at most this many sequences (``-1``: the scale's cap, ``None``: all).
        ss_max_proteins: Porter6 proteins used by the probe, train and test together (``-1``: the scale's).
        ss_head: ``"probe"`` (a linear probe on frozen embeddings), or a fine-tuned per-residue head on the same
            split: ``"lora"`` (LoRA adapters through ``peft``) or ``"full"`` (all weights).
        ss_finetune_steps: optimizer steps of that fine-tune per model (default: the scale's).
        probe_max_iter: L-BFGS iterations of the probe (default: the scale's).
        random_baseline: also evaluate a randomly initialised model of the same config (seeded by ``seed``).
        device: ``cpu``/``cuda``/``auto``; ``bf16`` runs the forward passes under bf16 autocast (GPU).
    """

    preset = get_preset(scale)
    max_images = None if max_sequences == -1 else max_sequences  # images: every held-out image unless limited
    if max_sequences == -1:
        max_sequences = preset.eval_max_sequences
    if ss_max_proteins == -1:
        ss_max_proteins = preset.ss_max_proteins
    probe_max_iter = preset.probe_max_iter if probe_max_iter is None else probe_max_iter
    ss_finetune_steps = preset.ss_finetune_steps if ss_finetune_steps is None else ss_finetune_steps
    if ss_head not in ("probe", "lora", "full"):
        raise ValueError(f"ss_head must be 'probe', 'lora' or 'full', got {ss_head!r}")
    model_dir, artifact, model_lineage = _resolve_model(model)
    lineage = [model_lineage]

    # ---- the model -----------------------------------------------------------------------------------------------
    torch_device = resolve_device(device)
    family = family_of(load_model_config(model_dir))
    spec = get_model_spec(family)
    modality: Modality = spec.modality  # type: ignore[assignment]
    if artifact is not None and artifact.metadata.modality not in (None, modality):
        raise ValueError(
            f"model artifact {artifact.path}: field 'modality' is {artifact.metadata.modality!r} but the checkpoint "
            f"is a {family} model"
        )
    loaded = load_model(model_dir, task=spec.default_task, device=torch_device)
    trained, tokenizer = loaded.model, loaded.tokenizer
    # Score with the context the model was trained on (the recipe's data.max_seq_length); a plain checkpoint gets the
    # family's usual one.
    trained_length = artifact.metadata.config.get("max_seq_length") if artifact is not None else None
    max_length = int(trained_length or (1024 if modality == "protein" else 8192))
    autocast_dtype = torch.bfloat16 if bf16 else None
    if modality == "cells":  # single cells: masked genes and a cell-type probe, not sequences
        return _evaluate_cells(
            trained, tokenizer, out=out, data=data, label_column=label_column, gene_medians=gene_medians,
            max_cells=max_sequences, seed=seed, random_baseline=random_baseline, device=torch_device,
            autocast_dtype=autocast_dtype, model_dir=model_dir, artifact=artifact, lineage=lineage, scale=scale,
            overwrite=overwrite,
        )  # fmt: skip
    if modality == "image":  # image classifiers: top-1 accuracy on held-out labelled images (pipeline/image_eval.py)
        return evaluate_image_classifier(
            trained, tokenizer, out=out, data=data, image_column=sequence_column, label_column=label_column,
            max_images=max_images, random_init=(lambda m: random_init_like(m, seed)) if random_baseline else None,
            device=torch_device, autocast_dtype=autocast_dtype, model_dir=model_dir, artifact=artifact,
            lineage=lineage, scale=scale, seed=seed, overwrite=overwrite,
        )  # fmt: skip

    # ---- the evaluation sequences ----------------------------------------------------------------------------------
    notes: list[str] = []
    if data is not None:
        sequences, policy_counts = _read_sequences(data, modality, limit=max_sequences, sequence_column=sequence_column)
        lineage.append(source_lineage_entry(data))
        data_label = str(data)
    else:
        if artifact is None:
            raise ValueError(f"{model_dir} is not a model artifact, so it has no validation split: pass --data PATH")
        dataset = _dataset_of(artifact)
        if dataset is None:
            raise ValueError(f"model artifact {artifact.path}: field 'lineage' names no dataset; pass --data PATH")
        if not dataset.metadata.metrics.get("validation_sequences", 1):
            raise ValueError(f"dataset artifact {dataset.path}: the validation split is empty; pass --data PATH")
        sequences, policy_counts = _read_sequences(dataset.file("validation"), modality, limit=max_sequences)
        data_label = f"validation split of {dataset.path}"

    out = prepare_output_dir(out, overwrite)
    models: dict[str, torch.nn.Module] = {"trained": trained}
    if random_baseline:
        models["random_init"] = random_init_like(trained, seed)

    # ---- language-model quality ------------------------------------------------------------------------------------
    lm_metrics: dict[str, dict[str, Any]] = {}
    for name, candidate in models.items():
        logger.info("scoring %d sequences with the %s model", len(sequences), name)
        if modality == "protein":
            lm_metrics[name] = masked_lm_perplexity(
                candidate, sequences, tokenizer, max_length=max_length, seed=seed, device=torch_device,
                autocast_dtype=autocast_dtype,
            )
        else:
            lm_metrics[name] = causal_lm_nll(
                candidate, sequences, tokenizer, max_length=max_length, device=torch_device,
                autocast_dtype=autocast_dtype,
            )

    # ---- secondary structure ---------------------------------------------------------------------------------------
    ss_metrics: dict[str, Any] | None = None
    if modality != "protein":
        notes.append("Secondary-structure probe: not applicable to DNA models.")
    elif secondary_structure is False:
        notes.append("Secondary-structure probe: disabled.")
    else:
        if isinstance(secondary_structure, (str, Path)):
            ss_path: Path | None = Path(secondary_structure)
        else:
            ss_path = find_shared_file(PORTER6_FILENAME)
        if ss_path is None:
            notes.append(
                f"Secondary-structure probe: skipped, {PORTER6_FILENAME} not found (set BIOSCALE_SHARED_DATA or pass "
                f"--ss-data)."
            )
        else:
            ss_data = load_secondary_structure(ss_path, max_proteins=ss_max_proteins, seed=seed)
            if ss_head == "probe":
                ss_metrics = secondary_structure_probe(
                    models, tokenizer, ss_data, max_length=max_length, max_iter=probe_max_iter, device=torch_device,
                    autocast_dtype=autocast_dtype,
                )
            else:
                ss_metrics = secondary_structure_finetune(
                    models, tokenizer, ss_data, lora=ss_head == "lora", max_steps=ss_finetune_steps,
                    max_length=max_length, device=str(torch_device), seed=seed,
                )
            lineage.append(source_lineage_entry(ss_path))

    # ---- report ----------------------------------------------------------------------------------------------------
    paths: dict[str, str] = {}
    curves = None
    if artifact is not None and "metrics" in artifact.metadata.paths:
        curves = plot_training_curves(artifact.file("metrics"), out / "training_curves.png", title="training")
    if curves is not None:
        paths["training_curves"] = curves.name
    sections = _report_sections(
        ReportSection, modality, lm_metrics, ss_metrics, notes, model_dir, artifact, data_label, len(sequences), curves
    )
    md_path, html_path = write_report(out, f"bioscale evaluation ({modality}, scale {scale})", sections)
    paths.update(report_md=md_path.name, report_html=html_path.name)

    metrics: dict[str, Any] = {
        "language_model": lm_metrics,
        "secondary_structure": ss_metrics,
        "num_sequences": len(sequences),
        "data": data_label,
        "data_policy": policy_counts,
        "notes": notes,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    paths["metrics"] = "metrics.json"
    metadata = ArtifactMetadata(
        kind="evaluation",
        modality=modality,
        paths=paths,
        metrics=metrics,
        config={
            "model": str(model_dir),
            "data": str(data) if data is not None else None,
            "max_length": max_length,
            "max_sequences": max_sequences,
            "ss_max_proteins": ss_max_proteins,
            "probe_max_iter": probe_max_iter,
            "ss_head": ss_head,
            "ss_finetune_steps": ss_finetune_steps if ss_head != "probe" else None,
            "random_baseline": random_baseline,
            "bf16": bf16,
            "device": str(torch_device),
        },
        lineage=lineage,
        seed=seed,
        scale=scale,
    )
    metadata = write_artifact(out, metadata)
    return Artifact(path=out.resolve(), metadata=metadata)


def _evaluate_cells(
    trained: torch.nn.Module, tokenizer: Any, *, out: str | Path, data: str | Path | None, label_column: str | None,
    gene_medians: str | Path | None, max_cells: int | None, seed: int, random_baseline: bool, device: torch.device,
    autocast_dtype: torch.dtype | None, model_dir: Path, artifact: Artifact | None, lineage: list[LineageEntry],
    scale: str, overwrite: bool,
) -> Artifact:  # fmt: skip
    """:func:`evaluate` for a single-cell model: :func:`bioscale.eval.single_cell.evaluate_single_cell_models` on
    ``data`` for the trained model (and a random-init twin), a report and an evaluation artifact."""
    if data is None:
        raise ValueError(
            f"{model_dir}: single-cell models are evaluated on held-out cells: pass --data CELLS.parquet (tokenized, "
            "e.g. by `bioscale tokenize-cells`) or CELLS.h5ad"
        )
    models: dict[str, torch.nn.Module] = {"trained": trained}
    if random_baseline:
        models["random_init"] = random_init_like(trained, seed)
    metrics = evaluate_single_cell_models(
        models, tokenizer, data, label_column=label_column, gene_medians=gene_medians,
        max_cells=None if max_cells == -1 else max_cells, seed=seed, device=device, autocast_dtype=autocast_dtype,
    )  # fmt: skip
    lineage = [*lineage, source_lineage_entry(data)]
    out = prepare_output_dir(out, overwrite)
    sections = [
        ReportSection("Provenance", paragraphs=[f"Model: {model_dir}", f"Evaluated on: {data} ({metrics['num_cells']} cells)"]),
        ReportSection(
            "Masked genes (fixed seeded masking, 15%)",
            header=["model", "accuracy", "top-10 accuracy", "NLL / masked gene", "perplexity", "masked genes"],
            rows=[[name, m["accuracy"], m["top10_accuracy"], m["nll_per_token"], m["perplexity"], m["num_masked_tokens"]]
                  for name, m in metrics["masked_gene"].items()],
        ),  # fmt: skip
    ]
    if metrics["cell_type_probe"] is not None:
        sections.append(ReportSection(
            f"Cell-type probe ({label_column}; linear, frozen mean-pooled embeddings)",
            header=["model", "accuracy", "macro F1", "majority class", "classes", "test cells"],
            rows=[[name, p["accuracy"], p["macro_f1"], p["majority_accuracy"], p["num_classes"], p["num_test"]]
                  for name, p in metrics["cell_type_probe"].items()],
        ))  # fmt: skip
    md_path, html_path = write_report(out, f"bioscale evaluation (cells, scale {scale})", sections)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    metadata = ArtifactMetadata(
        kind="evaluation",
        modality="cells",
        paths={"report_md": md_path.name, "report_html": html_path.name, "metrics": "metrics.json"},
        metrics=metrics,
        config={"model": str(model_dir), "data": str(data), "label_column": label_column,
                "gene_medians": str(gene_medians) if gene_medians is not None else None,
                "random_baseline": random_baseline, "device": str(device),
                "bf16": autocast_dtype is not None},  # fmt: skip
        lineage=lineage,
        seed=seed,
        scale=scale,
    )
    metadata = write_artifact(out, metadata)
    return Artifact(path=out.resolve(), metadata=metadata)


def _report_sections(
    section_cls, modality, lm_metrics, ss_metrics, notes, model_dir, artifact, data_label, num_sequences, curves
) -> list:
    sections = []
    provenance = [f"Model: {model_dir}"]
    if artifact is not None:
        provenance.append(f"Model artifact: {artifact.path} (id {artifact.metadata.id})")
        for entry in artifact.metadata.lineage:
            provenance.append(f"Trained on {entry.kind} {entry.path} (id {entry.id})")
    provenance.append(f"Evaluated on: {data_label} ({num_sequences} sequences)")
    sections.append(section_cls("Provenance", paragraphs=provenance))
    if modality == "protein":
        header = ["model", "perplexity", "NLL / masked token", "accuracy", "masked tokens"]
        rows = [
            [name, m["perplexity"], m["nll_per_token"], m["accuracy"], m["num_masked_tokens"]]
            for name, m in lm_metrics.items()
        ]
        title = "Masked-LM perplexity (fixed seeded masking, 15%)"
    else:
        header = ["model", "bits / base", "NLL / token", "perplexity", "accuracy", "bases"]
        rows = [
            [name, m["bits_per_base"], m["nll_per_token"], m["perplexity"], m["accuracy"], m["num_tokens"]]
            for name, m in lm_metrics.items()
        ]
        title = "Causal-LM likelihood"
    sections.append(section_cls(title, header=header, rows=rows))
    if ss_metrics is not None and "method" in ss_metrics:  # a fine-tuned head (ss_head="lora" or "full")
        sections.append(
            section_cls(
                f"Secondary structure ({ss_metrics['method']} fine-tune of a per-residue head)",
                paragraphs=[
                    f"{ss_metrics['max_steps']} steps at lr {ss_metrics['lr']:g} on {ss_metrics['num_train_proteins']} "
                    f"proteins, tested on {ss_metrics['num_test_proteins']}, split by sequence."
                ],
                header=["model", "Q3", "Q8"],
                rows=[[name, ss_metrics[name]["q3"], ss_metrics[name]["q8"]] for name in lm_metrics],
            )
        )
    elif ss_metrics is not None:
        rows = [
            [name, ss_metrics[name]["q3"], ss_metrics[name]["q8"]]
            for name in (*[k for k in lm_metrics], "residue_identity", "majority")
        ]
        sections.append(
            section_cls(
                "Secondary structure (linear probe on frozen embeddings)",
                paragraphs=[
                    f"Probe trained on {ss_metrics['num_train_proteins']} proteins "
                    f"({ss_metrics['num_train_residues']} residues), tested on {ss_metrics['num_test_proteins']} "
                    f"({ss_metrics['num_test_residues']} residues), split by sequence. 'residue_identity' is the same "
                    "probe on a one-hot code of the amino acid; 'majority' predicts the most frequent class."
                ],
                header=["features", "Q3", "Q8"],
                rows=rows,
            )
        )
    if curves is not None:
        sections.append(section_cls("Training curves", image=curves.name))
    if notes:
        sections.append(section_cls("Notes", paragraphs=notes))
    return sections


# ---------------------------------------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------------------------------------


def run_pipeline(
    source: str | Path | None = None,
    *,
    out: str | Path,
    kind: Modality = "protein",
    scale: Scale = "tiny",
    seed: int = 0,
    curate_kwargs: dict[str, Any] | None = None,
    train_overrides: Sequence[str] = (),
    eval_kwargs: dict[str, Any] | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Artifact]:
    """Curate → train → evaluate under ``out/{data,model,eval}``; return the three artifacts by stage name."""
    out = prepare_output_dir(out, overwrite)
    dataset = curate(source, out=out / "data", kind=kind, scale=scale, seed=seed, **(curate_kwargs or {}))
    model = train_stage(dataset, out=out / "model", scale=scale, seed=seed, overrides=train_overrides, device=device)
    evaluation = evaluate(model, out=out / "eval", scale=scale, seed=seed, device=device, **(eval_kwargs or {}))
    return {"data": dataset, "model": model, "eval": evaluation}


__all__ = ["default_out", "evaluate", "read_artifact", "run_pipeline", "train_stage"]
