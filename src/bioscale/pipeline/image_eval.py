"""The eval stage for image classifiers: held-out top-1 accuracy, a report and an evaluation artifact.

``bioscale eval --model DIR --data HELD_OUT`` on a ViT checkpoint comes here (:func:`bioscale.pipeline.stages.evaluate`
dispatches on the family's modality): ``HELD_OUT`` is labelled images (an image folder with one sub-folder per class,
a parquet table, ``hf:<dataset>`` or ``demo:digits-test``; ``--label-column`` / ``--sequence-column`` name the label
and image columns of a table), scored with the model's own image processor next to a random-init model of the same
shape, chance and the majority class (:mod:`bioscale.eval.image_classification`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bioscale.eval.image_classification import image_classification_metrics, open_labelled_images
from bioscale.eval.report import ReportSection, plot_training_curves, write_report
from bioscale.pipeline.artifacts import (
    Artifact,
    ArtifactMetadata,
    LineageEntry,
    prepare_output_dir,
    source_lineage_entry,
    write_artifact,
)


def evaluate_image_classifier(
    trained: torch.nn.Module, processor: Any, *, out: str | Path, data: str | Path | None, image_column: str | None,
    label_column: str | None, max_images: int | None, random_init: Callable[[torch.nn.Module], torch.nn.Module] | None,
    device: torch.device, autocast_dtype: torch.dtype | None, model_dir: Path, artifact: Artifact | None,
    lineage: list[LineageEntry], scale: str, seed: int, overwrite: bool,
) -> Artifact:  # fmt: skip
    """Score ``trained`` (and ``random_init(trained)`` when given) on the labelled images ``data``; write the
    evaluation artifact (``metrics.json``, ``report.md`` / ``.html``) at ``out`` and return it."""
    if data is None:
        raise ValueError(
            f"{model_dir}: an image classifier is evaluated on held-out labelled images: pass --data FOLDER "
            "(one sub-folder per class), a parquet table, hf:<dataset> or demo:digits-test"
        )
    source = open_labelled_images(str(data), image_column=image_column or "image", label_column=label_column or "label")
    models = {"trained": trained}
    if random_init is not None:
        models["random_init"] = random_init(trained)
    metrics = image_classification_metrics(
        models, processor, source, device=device, autocast_dtype=autocast_dtype,
        limit=None if max_images == -1 else max_images,
    )  # fmt: skip
    lineage = [*lineage, source_lineage_entry(data)]
    out = prepare_output_dir(out, overwrite)
    provenance = [f"Model: {model_dir}", f"Evaluated on: {source.name} ({metrics['num_images']} images, "
                                         f"{len(source.classes)} classes in the data)"]  # fmt: skip
    if artifact is not None:
        provenance.insert(1, f"Model artifact: {artifact.path} (id {artifact.metadata.id})")
    header = ["model", "top-1 accuracy"] + (["top-5 accuracy"] if metrics["num_classes"] >= 5 else [])
    rows = [[name, m["top1"], *([m["top5"]] if "top5" in m else [])] for name, m in metrics["models"].items()]
    rows += [["chance (uniform guess)", metrics["chance"]], ["majority class", metrics["majority_accuracy"]]]
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    sections = [ReportSection("Provenance", paragraphs=provenance),
                ReportSection("Image classification (held-out images)", header=header, rows=rows)]  # fmt: skip
    paths: dict[str, str] = {}
    if artifact is not None and "metrics" in artifact.metadata.paths:
        curves = plot_training_curves(artifact.file("metrics"), out / "training_curves.png", title="training")
        if curves is not None:
            paths["training_curves"] = curves.name
            sections.append(ReportSection("Training curves", image=curves.name))
    md_path, html_path = write_report(out, f"bioscale evaluation (images, scale {scale})", sections)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    paths.update(report_md=md_path.name, report_html=html_path.name, metrics="metrics.json")
    metadata = ArtifactMetadata(
        kind="evaluation",
        modality="image",
        paths=paths,
        metrics=metrics,
        config={"model": str(model_dir), "data": str(data), "image_column": image_column, "label_column": label_column,
                "max_images": max_images, "random_baseline": random_init is not None, "device": str(device),
                "bf16": autocast_dtype is not None},  # fmt: skip
        lineage=lineage,
        seed=seed,
        scale=scale,
    )
    metadata = write_artifact(out, metadata)
    return Artifact(path=out.resolve(), metadata=metadata)
