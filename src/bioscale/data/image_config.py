"""``ImageDataConfig``: the image knobs of the data pipeline, nested under ``data.image`` in a training config.

Read only when ``data.objective=image_classification`` (``bioscale.data.images``); the rest of ``data`` still says
where the images come from (``data.source``), how many go in a micro-batch (``data.micro_batch_size``) and how they are
shuffled and loaded (``shuffle``, ``shuffle_buffer_size``, ``seed``, ``num_workers``, ``pin_memory``). Plain types only,
so Hydra/OmegaConf builds its schema from this class; :meth:`ImageDataConfig.validate` names a bad key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Pillow resampling filter by name (the value ViTImageProcessor's ``resample`` stores: PIL.Image.Resampling).
INTERPOLATIONS: dict[str, int] = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass
class ImageDataConfig:
    # --- which columns (parquet / HF datasets; an image folder has one class per sub-folder) ----------------------
    image_column: str = "image"  # encoded image bytes, an HF Image struct {bytes, path}, or a file path
    label_column: str = "label"  # class id (int; names from the HF ClassLabel metadata when present) or class name

    # --- what the model sees (also saved as the model's image processor) -------------------------------------------
    # The image size is the model's (model.overrides.image_size); these say how pixels become its inputs.
    interpolation: str = "bicubic"  # resampling of every resize: nearest | bilinear | bicubic | lanczos
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, after scaling to [0, 1]
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    # --- training augmentation (applied on the loader's workers, seeded per image; evaluation only resizes) ---------
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area fraction range
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])  # its aspect-ratio range (w / h)
    hflip_prob: float = 0.5  # horizontal flip probability (0 for digits or text, whose mirror is another class)

    # --- input policy (every case counted in the run's data_policy) -------------------------------------------------
    # An image whose shorter side is below this many pixels is "too small" (a thumbnail or a placeholder).
    min_size: int = 8
    # Unreadable (corrupt, truncated, not an image) or too-small images: "error" raises ValueError naming the file;
    # "skip" leaves them out and counts them. Non-RGB images (grey, palette, RGBA, CMYK) are always converted to RGB
    # (alpha dropped) and counted.
    bad_images: str = "error"

    def __post_init__(self) -> None:
        for key in ("mean", "std", "crop_scale", "crop_ratio"):  # plain lists (a ListConfig does not go into JSON)
            setattr(self, key, [float(v) for v in getattr(self, key)])

    def validate(self) -> None:
        """``ValueError`` naming the first key (``data.image.<key>``) with an invalid value."""

        def pair(key: str, low: float, high: float | None) -> None:
            value = getattr(self, key)
            if len(value) != 2 or not low <= value[0] <= value[1] or (high is not None and value[1] > high):
                bound = f"{low} <= a <= b" + (f" <= {high}" if high is not None else "")
                raise ValueError(f"data.image.{key}={list(value)!r}: expected [a, b] with {bound}")

        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.image.interpolation={self.interpolation!r}: expected one of {list(INTERPOLATIONS)}")
        if self.bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.image.bad_images={self.bad_images!r}: expected one of {BAD_IMAGE_POLICIES}")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                raise ValueError(f"data.image.{key}={list(getattr(self, key))!r}: expected 3 values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.image.std={list(self.std)!r}: every value must be > 0")
        pair("crop_scale", 1e-6, 1.0)
        pair("crop_ratio", 1e-6, None)
        if not 0.0 <= float(self.hflip_prob) <= 1.0:
            raise ValueError(f"data.image.hflip_prob={self.hflip_prob!r}: expected a probability in [0, 1]")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise ValueError(f"data.image.min_size={self.min_size!r}: expected an integer >= 1")
        for key in ("image_column", "label_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"data.image.{key}={getattr(self, key)!r}: expected a column name")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
