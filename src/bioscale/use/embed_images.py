"""Image embeddings from a trained ViT: ``bioscale embed MODEL FOLDER -o OUT.parquet`` and :func:`embed_images`.

For each image, :func:`embed_images` returns the pooled embedding the model's classifier reads (``pooler_output``:
the class token, the patch mean, or the attention pool, whichever the model was built with, after the fc-norm if any)
and optionally every patch token (``per_patch=True``: ``[num_patches, hidden]`` per image, in row-major patch order).
Images are read from a folder (every image file under it, recursively; ids are the paths relative to it), one image
file, a parquet table (``image_column``) or ``hf:<dataset>``, and preprocessed by the image processor saved with the
model, as ``bioscale eval`` does. Unreadable images raise ``ValueError`` naming the file, or with
``bad_images="skip"`` are left out and counted in ``num_left_out``. The result is an :class:`~bioscale.use.embed.
Embeddings` (``lengths`` = patches per image, ``per_residue`` = the patch tokens), so ``write_embeddings`` writes the
same ``.parquet`` / ``.npy`` layouts as for sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from bioscale.data.image_sources import open_image_source
from bioscale.data.images import ImagePolicy, image_processor_for, is_image_path, read_images
from bioscale.models import spec_for_any_config, spec_for_model
from bioscale.use.embed import Embeddings, default_device, default_dtype
from bioscale.use.loading import load_config, load_model


__all__ = ["embed_images", "is_image_model", "is_image_path"]


def is_image_model(model: PreTrainedModel | str | Path) -> bool:
    """Whether ``model`` (loaded, or a checkpoint path) reads images (its family's modality is ``"image"``)."""
    try:
        spec = spec_for_model(model) if isinstance(model, PreTrainedModel) else spec_for_any_config(load_config(model))
    except ValueError:
        return False
    return spec.modality == "image"


@torch.no_grad()
def embed_images(
    model: PreTrainedModel | str | Path,
    images: str | Path,
    *,
    processor: Any = None,
    per_patch: bool = False,
    batch_size: int = 64,
    image_column: str = "image",
    bad_images: str = "error",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Embeddings:
    """Embed every image of ``images`` with ``model`` (a checkpoint directory / Hub id, or a loaded bioscale ViT with
    its ``processor``); see the module docstring.

    Raises:
        ValueError: ``model`` is not an image model, ``images`` holds no image, or an image is unreadable (with
            ``bad_images="error"``).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if isinstance(model, (str, Path)):
        if not is_image_model(model):
            raise ValueError(f"{model} is not an image model: embed images with a ViT checkpoint")
        loaded = load_model(model, task="base", device=device, dtype=dtype)
        base, processor = loaded.model, processor or loaded.tokenizer
    else:
        if not is_image_model(model):
            raise ValueError(f"{type(model).__name__} is not an image model")
        base = getattr(model, model.base_model_prefix, model)
        base = base.to(device=device, dtype=dtype).eval()
        processor = processor or image_processor_for(base.config.image_size)
    source = open_image_source(images, image_column=image_column, label_column=None, labelled=False)
    policy = ImagePolicy(min_size=1, bad_images=bad_images)
    ids: list[str] = []
    pooled: list[np.ndarray] = []
    patches: list[np.ndarray] = []
    for batch_ids, _, batch in tqdm(read_images(source, policy, batch_size=batch_size), desc="images",
                                    disable=not progress):  # fmt: skip
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
        out = base(pixel_values=pixel_values)
        ids += batch_ids
        pooled.append(out.pooler_output.float().cpu().numpy())
        if per_patch:
            patches += list(out.patch_embeddings.float().cpu().numpy())
    if not ids:
        raise ValueError(f"{source.name}: no image left to embed (policy counts: {policy.stats.as_dict()})")
    num_patches = base.config.num_patches
    return Embeddings(
        ids=ids,
        pooled=np.concatenate(pooled),
        lengths=np.full(len(ids), num_patches, dtype=np.int64),
        per_residue=patches if per_patch else None,
        pooling=base.config.global_pool,
        num_left_out=policy.stats.unreadable + policy.stats.too_small,
    )
