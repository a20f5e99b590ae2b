"""Image-classification quality on held-out labelled images: top-1 (and top-5) accuracy, per class, next to chance.

:func:`image_classification_metrics` runs a classifier over a labelled image source (an image folder, a parquet
table, ``hf:<dataset>``, ``demo:digits-test``; :mod:`bioscale.data.image_sources`) with the model's own image
processor (the one saved with it: exactly the preprocessing ``transformers`` pipelines would apply), and counts
correct predictions. The data's classes are matched to the model's by *name* (``config.id2label``): a class the model
does not know raises ``ValueError`` naming it and the source, so a folder with its classes in another order still
scores correctly, and a held-out set with a subset of the classes is fine. Images go through the same input policy as
training (unreadable or too-small ones raise, or are skipped and counted with ``bad_images="skip"``).

Baselines reported with every model: ``chance`` (1 / number of classes, a uniform guess) and ``majority_accuracy``
(always predicting the most frequent class of the evaluated set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bioscale.data.image_sources import ImageSource, open_image_source
from bioscale.data.images import ImagePolicy, processor_image_size, read_images


def model_class_ids(data_classes: Sequence[str], config: Any, *, source: str) -> list[int]:
    """For each class of the data (by index), the model's label id of the class with that name; ``ValueError``
    listing the data's classes the model does not have."""
    id2label = {int(k): str(v) for k, v in dict(getattr(config, "id2label", None) or {}).items()}
    by_name = {name: index for index, name in id2label.items()}
    unknown = [name for name in data_classes if name not in by_name]
    if unknown:
        raise ValueError(
            f"the classes of {source} do not match the model's: {unknown[:10]} are not among its "
            f"{len(id2label)} labels {[id2label[i] for i in sorted(id2label)][:10]} (config.id2label)"
        )
    return [by_name[name] for name in data_classes]


def open_labelled_images(data: str, *, image_column: str = "image", label_column: str = "label",
                         hf_split: str = "train") -> ImageSource:  # fmt: skip
    """The labelled source ``data`` names (``ValueError`` when it has no labels)."""
    source = open_image_source(data, image_column=image_column, label_column=label_column, hf_split=hf_split)
    if not source.classes:
        raise ValueError(f"evaluation data {data}: no class labels (an image folder needs one sub-folder per class)")
    return source


@torch.no_grad()
def image_classification_metrics(
    models: Mapping[str, torch.nn.Module],
    processor: Any,
    source: ImageSource,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    limit: int | None = None,
    min_size: int = 1,
    bad_images: str = "error",
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of each of ``models`` (same classes, e.g. trained and random-init) on ``source``.

    Returns ``{"models": {name: {"top1", "top5" (with >= 5 classes), "per_class": {class: accuracy}}}, "chance",
    "majority_accuracy", "num_images", "num_classes", "data_policy"}``. ``min_size`` defaults to 1: any decodable
    image can be resized for inference (training's ``min_size`` is a data-quality filter).
    """
    device = torch.device(device)
    first = next(iter(models.values()))
    config = first.config
    size = processor_image_size(processor)
    if size is not None and size != config.image_size:
        raise ValueError(f"the image processor resizes to {size} but the model takes {config.image_size}x"
                         f"{config.image_size} images")  # fmt: skip
    class_ids = np.asarray(model_class_ids(source.classes, config, source=source.name))
    policy = ImagePolicy(min_size=min_size, bad_images=bad_images)
    correct = {name: 0 for name in models}
    correct5 = {name: 0 for name in models}
    per_class_correct = {name: np.zeros(len(source.classes), np.int64) for name in models}
    per_class_total = np.zeros(len(source.classes), np.int64)
    for module in models.values():
        module.eval()
    total = 0
    batches = read_images(source, policy, batch_size=batch_size, limit=limit)
    for _, labels, images in tqdm(batches, desc="images", disable=not progress):
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        targets = torch.as_tensor(class_ids[np.asarray(labels)], device=device)
        np.add.at(per_class_total, np.asarray(labels), 1)
        total += len(labels)
        for name, module in models.items():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = module(pixel_values=pixel_values).logits.float()
            hits = logits.argmax(dim=-1) == targets
            correct[name] += int(hits.sum())
            np.add.at(per_class_correct[name], np.asarray(labels), hits.cpu().numpy().astype(np.int64))
            k = min(5, logits.shape[-1])
            correct5[name] += int((logits.topk(k, dim=-1).indices == targets[:, None]).any(dim=-1).sum())
    if total == 0:
        raise ValueError(f"evaluation data {source.name}: no image left to score ({policy.stats.as_dict()})")
    num_classes = int(config.num_labels)
    results: dict[str, Any] = {}
    for name in models:
        entry: dict[str, Any] = {"top1": correct[name] / total}
        if num_classes >= 5:
            entry["top5"] = correct5[name] / total
        entry["per_class"] = {
            cls: (float(per_class_correct[name][i] / per_class_total[i]) if per_class_total[i] else None)
            for i, cls in enumerate(source.classes)
        }
        results[name] = entry
    return {
        "models": results,
        "chance": 1.0 / num_classes,
        "majority_accuracy": float(per_class_total.max() / total),
        "num_images": total,
        "num_classes": num_classes,
        "data": source.name,
        "data_policy": policy.stats.as_dict(),
    }
