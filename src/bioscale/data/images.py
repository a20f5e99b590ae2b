"""Images for classification: the input policy, seeded augmentation, the image processor, and the resumable loader.

``build_image_dataloader(cfg, image_size=, rank=, world_size=)`` returns an :class:`ImageDataLoader` (a
``BioscaleDataLoader``, so a ``torchdata`` ``StatefulDataLoader`` with the same layout checks on resume) that iterates
forever over micro-batches ``{"pixel_values": float32 [B, 3, S, S], "labels": int64 [B]}`` that go straight into
``model(**batch)`` (with ``normalize=False``: uint8 pixels that :meth:`ImageDataLoader.model_inputs` normalises on the
GPU, which is how ``bioscale train`` feeds the model). It reads any :mod:`bioscale.data.image_sources` source (image
folders, parquet, HF ``datasets``, ``demo:digits``).

The input policy (:class:`ImagePolicy`, every case counted in :class:`ImagePolicyStats`, which a training run reports
as ``data_policy`` in ``summary.json``):

- *unreadable* (corrupt, truncated, not an image, a decompression bomb: anything Pillow raises while decoding it) and
  *too small* (shorter side below ``data.image.min_size``) images raise ``ValueError`` naming the file, or with
  ``data.image.bad_images=skip`` are left out and counted;
- *non-RGB* images (grey, palette, RGBA, CMYK, 16-bit) are converted to RGB by Pillow (alpha dropped, 16-bit values
  clipped to 8) and counted; images smaller than the model's input are upsampled by the resize (counted);
- EXIF orientation is not applied (as torchvision and ``transformers``' processors do not).

Augmentation (training): torchvision's ``RandomResizedCrop`` algorithm (10 tries at an area fraction in
``crop_scale`` and a log-uniform aspect ratio in ``crop_ratio``, else a centre crop at the nearest allowed ratio),
resized to the model's ``image_size`` with ``data.image.interpolation``, then a horizontal flip with ``hflip_prob``,
scaling to [0, 1] and per-channel ``(x - mean) / std``. Written on numpy and Pillow (no torchvision: its PyPI wheels
are CUDA builds that do not load against a CPU torch). It runs on the loader's workers, and each image's draws come
from a generator keyed by ``(seed, epoch, unit, row)``, the image's identity: the same image gets the same crop in the
same epoch whatever the number of ranks or workers, and a different one every epoch. Evaluation and ``bioscale
embed`` only resize to ``image_size x image_size`` and normalise: exactly what the ``ViTImageProcessor`` saved with
the model does (:func:`image_processor_for`; tested equal).

Order and state, as for sequences (``bioscale.data.loader``): every epoch the source's units are permuted from
``(seed, epoch)``; with at least as many units as consumers (rank x worker), the units are dealt in that order, each
to the consumer holding the fewest records so far (so every consumer gets at least its share minus one unit), else
every consumer lists every record and keeps every ``N``-th. Records are shuffled in blocks of
``shuffle_buffer_size`` from ``(seed, epoch, consumer, block)`` and batched by ``micro_batch_size``; the last
incomplete batch of a consumer's epoch is dropped (counted as ``left_over``), so every batch has the same shape. A
consumer's state is ``(epoch, records consumed in the epoch, batches, counts)``: resuming jumps straight to the record
after the last delivered batch, decoding nothing twice, and yields exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from bioscale.data.config import DataConfig
from bioscale.data.image_config import INTERPOLATIONS, ImageDataConfig
from bioscale.data.image_sources import (
    DEMO_IMAGE_SETS,
    IMAGE_EXTENSIONS,
    ImageRecord,
    ImageSource,
    open_image_source,
)
from bioscale.data.loader import BioscaleDataLoader

_STATE_VERSION = 1
IMAGE_DATASET_MARKER = "bioscale.ImageDataset"
IMAGE_OBJECTIVE = "image_classification"
# Domain tags keep the random streams independent although they share (seed, epoch, ...).
_UNIT_ORDER, _BLOCK_SHUFFLE, _AUGMENT = 10, 11, 12
_READ_CHUNK = 64  # records read from the source at a time
# DataConfig keys a classification run does not read (said once, by ignored_image_settings).
# (The packing keys have their own note in bioscale.train.config.ignored_settings.)
_TOKEN_KEYS = ("sequence_column", "id_column", "tokenizer", "mlm_probability", "codon_weights", "max_seq_length",
               "crop", "window_stride", "unknown_residues", "cds_checks", "pad_to_multiple_of")  # fmt: skip


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclasses.dataclass
class ImagePolicyStats:
    """Counts of what the image policy did (plain ints: they travel in the loader state)."""

    images_read: int = 0  # records that reached the policy
    images_used: int = 0  # decoded, checked and handed on
    unreadable: int = 0  # left out: Pillow could not decode them (data.image.bad_images=skip)
    too_small: int = 0  # left out: shorter side below data.image.min_size (bad_images=skip)
    converted_to_rgb: int = 0  # grey / palette / RGBA / CMYK / 16-bit images converted to RGB
    upsampled: int = 0  # shorter side below the model's image size: enlarged by the resize
    left_over: int = 0  # images of the last incomplete micro-batch of an epoch (dropped: every batch has one shape)
    ignored_files: int = 0  # files in an image folder without an image extension (not read)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def add(self, other: ImagePolicyStats | Mapping[str, int]) -> None:
        items = other.as_dict() if isinstance(other, ImagePolicyStats) else other
        for key, value in items.items():
            setattr(self, key, getattr(self, key) + int(value))

    @classmethod
    def from_dict(cls, counts: Mapping[str, int]) -> ImagePolicyStats:
        unknown = set(counts) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown image policy stats keys {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in counts.items()})


def decode_image(data: bytes | str | np.ndarray | Any) -> Any:
    """A fully decoded ``PIL.Image`` from encoded bytes, a file path, a ``uint8`` array or a PIL image (raises
    whatever Pillow raises for a bad one)."""
    from PIL import Image

    if isinstance(data, Image.Image):
        image = data
    elif isinstance(data, np.ndarray):
        image = Image.fromarray(data)
    elif isinstance(data, (bytes, bytearray)):
        image = Image.open(io.BytesIO(data))
    else:
        image = Image.open(str(data))
    image.load()  # decode now: a truncated file fails here, inside the policy, not later in a transform
    return image


class ImagePolicy:
    """Decodes one :class:`ImageRecord` into an RGB ``PIL.Image`` (or ``None`` when it is skipped), counting
    everything in ``self.stats`` (see the module docstring).

    Args:
        min_size: shorter side, in pixels, below which an image is too small.
        bad_images: ``"error"`` (``ValueError`` naming the image) or ``"skip"`` (leave it out, counted).
        target_size: the model's image size (only counts ``upsampled``); ``None``: not counted.
    """

    def __init__(self, *, min_size: int = 8, bad_images: str = "error", target_size: int | None = None) -> None:
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.min_size, self.bad_images, self.target_size = min_size, bad_images, target_size
        self.stats = ImagePolicyStats()

    def __call__(self, record: ImageRecord) -> Any:
        self.stats.images_read += 1
        try:
            image = decode_image(record.data)
        except Exception as err:  # noqa: BLE001  (Pillow raises OSError, ValueError, SyntaxError, struct.error, ...)
            return self._bad(record, f"cannot be decoded ({type(err).__name__}: {err})", "unreadable")
        width, height = image.size
        if min(width, height) < self.min_size:
            return self._bad(record, f"is too small ({width}x{height} pixels; data.image.min_size={self.min_size})",
                             "too_small")  # fmt: skip
        if image.mode != "RGB":
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # Pillow's advice for palette transparency, before dropping alpha
            image = image.convert("RGB")
            self.stats.converted_to_rgb += 1
        if self.target_size is not None and min(width, height) < self.target_size:
            self.stats.upsampled += 1
        self.stats.images_used += 1
        return image

    def _bad(self, record: ImageRecord, reason: str, counter: str) -> None:
        if self.bad_images == "error":
            raise ValueError(
                f"image {record.record_id} {reason}; set data.image.bad_images=skip to leave such images out "
                "(they are counted)"
            )
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        return None


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)``, torchvision's ``RandomResizedCrop.get_params`` with numpy draws."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: the whole image at the nearest allowed aspect ratio, centred
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """RGB ``PIL.Image`` -> float32 ``[3, image_size, image_size]`` (see the module docstring); ``train`` adds the
    random-resized crop and the flip, drawn from the generator passed in."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    train: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip_prob: float = 0.5

    @classmethod
    def from_config(cls, cfg: ImageDataConfig, image_size: int, *, train: bool) -> ImageTransform:
        return cls(image_size=image_size, mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
                   train=train, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
                   hflip_prob=float(cfg.hflip_prob))  # fmt: skip

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        pixels = np.asarray(self._resized(image, rng), dtype=np.float32) * np.float32(1.0 / 255.0)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def pixels(self, image: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        """The same image before scaling and normalisation: uint8 ``[3, image_size, image_size]``;
        :meth:`normalize` of it equals ``self(image, rng)`` exactly."""
        return np.ascontiguousarray(np.asarray(self._resized(image, rng), dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` (from :meth:`pixels`) -> float32, scaled to [0, 1] and normalised per channel, on
        the tensor's device; the same float32 operations as ``__call__``, so the same values bit for bit."""
        out = pixels.to(torch.float32).mul_(1.0 / 255.0)
        for channel, (mean, std) in enumerate(zip(self.mean, self.std)):
            # The divisor as a 0-dim tensor made on the device (a fill, not a copy that would wait for the GPU): CUDA
            # divides by a Python scalar as a multiply by its reciprocal, one ulp off the CPU's (measured, H100).
            out[..., channel, :, :].sub_(mean).div_(torch.full((), std, dtype=torch.float32, device=out.device))
        return out

    def _resized(self, image: Any, rng: np.random.Generator | None) -> Any:
        from PIL import Image

        size = (self.image_size, self.image_size)
        resample = Image.Resampling(INTERPOLATIONS[self.interpolation])
        if self.train:
            assert rng is not None, "training augmentation needs a generator"
            left, top, w, h = random_resized_crop_box(*image.size, self.crop_scale, self.crop_ratio, rng)
            # Crop, then resize the crop as a whole image (torchvision's resized_crop), not resize(box=...).
            image = image.crop((left, top, left + w, top + h)).resize(size, resample)
            if rng.random() < self.hflip_prob:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif image.size != size:
            image = image.resize(size, resample)
        return image


def _vit_image_processor_class() -> type:
    """``ViTImageProcessor``'s Pillow backend: ``ViTImageProcessorPil`` in transformers 5 (whose plain
    ``ViTImageProcessor`` needs torchvision), ``ViTImageProcessor`` itself in 4.x. Both save
    ``"image_processor_type": "ViTImageProcessor"``, which every version loads."""
    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import ViTImageProcessor

        return ViTImageProcessor
    return ViTImageProcessorPil


def image_processor_for(image_size: int, cfg: ImageDataConfig | None = None) -> Any:
    """The ``transformers`` ``ViTImageProcessor`` that reproduces this pipeline's evaluation transform: resize to
    ``image_size x image_size`` with ``cfg.interpolation``, scale by 1/255, normalise with ``cfg.mean`` / ``cfg.std``.
    Saved with a trained model (``preprocessor_config.json``), so ``AutoImageProcessor`` and HF pipelines see the
    images as bioscale evaluated them."""
    cfg = cfg or ImageDataConfig()
    return _vit_image_processor_class()(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=INTERPOLATIONS[cfg.interpolation],
        do_rescale=True, rescale_factor=1.0 / 255.0, do_normalize=True, image_mean=list(cfg.mean),
        image_std=list(cfg.std),
    )  # fmt: skip


def processor_image_size(processor: Any) -> int | None:
    """The square size an image processor resizes to (``None`` when it does not say)."""
    size = getattr(processor, "size", None) or {}
    height = size.get("height") or size.get("shortest_edge")
    return int(height) if height else None


class ImageDataset(IterableDataset):
    """Infinite iterable of collated image micro-batches for one rank; each worker process is its own consumer.

    Implements ``state_dict`` / ``load_state_dict`` (torchdata's ``Stateful``), which ``StatefulDataLoader`` snapshots
    per worker after every batch (see the module docstring for what the state is).
    """

    def __init__(
        self, cfg: DataConfig, source: ImageSource, *, image_size: int, rank: int = 0, world_size: int = 1,
        normalize: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.normalize = normalize
        self.source = source
        self.image_size = image_size
        self.transform = ImageTransform.from_config(cfg.image, image_size, train=True)
        self.rank, self.world_size = rank, world_size
        self._epoch = 0
        self._position = 0  # records of this consumer's epoch stream already consumed
        self._batches_in_epoch = 0
        self._stats_before_epoch = ImagePolicyStats()
        self._epoch_stats_at_resume = ImagePolicyStats()
        self._policy: ImagePolicy | None = None

    # ----------------------------------------------------------------------------------------------------------- state
    def policy_stats(self) -> ImagePolicyStats:
        """Policy counts of this consumer so far (all epochs; the source's ignored files once)."""
        stats = ImagePolicyStats(**self._stats_before_epoch.as_dict())
        stats.add(self._policy.stats if self._policy is not None else self._epoch_stats_at_resume)
        stats.ignored_files = self.source.ignored_files
        return stats

    def state_dict(self) -> dict[str, Any]:
        epoch_stats = self._policy.stats if self._policy is not None else self._epoch_stats_at_resume
        return {
            "kind": IMAGE_DATASET_MARKER,
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "batches_in_epoch": self._batches_in_epoch,
            "stats_before_epoch": self._stats_before_epoch.as_dict(),
            "epoch_stats": epoch_stats.as_dict(),
            "stats": self.policy_stats().as_dict(),  # for reporting (ImageDataLoader.policy_stats); not read back
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != IMAGE_DATASET_MARKER or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a bioscale image data state (version {_STATE_VERSION}): kind={state.get('kind')!r}, "
                f"version={state.get('version')!r}"
            )
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._stats_before_epoch = ImagePolicyStats.from_dict(state["stats_before_epoch"])
        self._epoch_stats_at_resume = ImagePolicyStats.from_dict(state["epoch_stats"])
        self._policy = None

    # -------------------------------------------------------------------------------------------------------- iterate
    def epoch_refs(self, epoch: int, consumer: int, num_consumers: int) -> list[tuple[int, int]]:
        """This consumer's records ``(unit, row)`` of ``epoch``, in the order it uses them (deterministic)."""
        cfg = self.cfg
        sizes = self.source.unit_sizes()
        order = list(range(len(sizes)))
        if cfg.shuffle:
            order = _rng(cfg.seed, _UNIT_ORDER, epoch).permutation(len(sizes)).tolist()
        if len(order) >= num_consumers:
            # Units (parquet row groups) differ in size: deal each, in the epoch's order, to the consumer holding the
            # fewest records so far (ties to the lowest index), so every consumer gets at least total / consumers
            # minus one unit. Dealing every num_consumers-th unit gave one worker two row groups of a small parquet,
            # the last one short, and so less than a micro-batch in some epochs.
            held = [0] * num_consumers
            mine: list[int] = []
            for unit in order:
                taker = min(range(num_consumers), key=held.__getitem__)
                held[taker] += sizes[unit]
                if taker == consumer:
                    mine.append(unit)
            refs = [(unit, row) for unit in mine for row in range(sizes[unit])]
        else:  # fewer units than consumers: every consumer lists everything and keeps its share
            every = [(unit, row) for unit in order for row in range(sizes[unit])]
            refs = every[consumer::num_consumers]
        if not cfg.shuffle:
            return refs
        shuffled: list[tuple[int, int]] = []
        block = cfg.shuffle_buffer_size
        for index, start in enumerate(range(0, len(refs), block)):
            chunk = refs[start : start + block]
            permutation = _rng(cfg.seed, _BLOCK_SHUFFLE, epoch, consumer, index).permutation(len(chunk))
            shuffled += [chunk[i] for i in permutation]
        return shuffled

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer = self.rank * num_workers + worker
        num_consumers = self.world_size * num_workers
        batch_size = self.cfg.micro_batch_size
        image_cfg = self.cfg.image
        while True:
            epoch = self._epoch
            refs = self.epoch_refs(epoch, consumer, num_consumers)
            policy = ImagePolicy(min_size=image_cfg.min_size, bad_images=image_cfg.bad_images,
                                 target_size=self.image_size)  # fmt: skip
            policy.stats = ImagePolicyStats(**self._epoch_stats_at_resume.as_dict())  # zero unless resuming mid-epoch
            self._epoch_stats_at_resume = ImagePolicyStats()
            self._policy = policy
            pixels: list[np.ndarray] = []
            labels: list[int] = []
            for start in range(self._position, len(refs), _READ_CHUNK):
                chunk = refs[start : start + _READ_CHUNK]
                for offset, (ref, record) in enumerate(zip(chunk, self.source.read(chunk))):
                    image = policy(record)
                    if image is not None:
                        rng = _rng(self.cfg.seed, _AUGMENT, epoch, *ref)
                        pixels.append(self.transform(image, rng) if self.normalize else self.transform.pixels(image, rng))
                        labels.append(record.label)
                    if len(pixels) == batch_size:
                        self._position = start + offset + 1
                        self._batches_in_epoch += 1
                        batch = {"pixel_values": torch.from_numpy(np.stack(pixels)),
                                 "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip
                        pixels, labels = [], []
                        yield batch
            if self._batches_in_epoch == 0:
                raise ValueError(
                    f"data: rank {self.rank} worker {worker} received no full micro-batch of {batch_size} images in "
                    f"epoch {epoch} from {self.source.name} ({len(refs)} records for this consumer, "
                    f"world_size*num_workers={num_consumers} consumers; policy counts: {policy.stats.as_dict()}): "
                    "lower data.micro_batch_size or data.num_workers"
                )
            policy.stats.left_over += len(pixels)
            self._stats_before_epoch.add(policy.stats)
            self._policy = None
            self._epoch, self._position, self._batches_in_epoch = epoch + 1, 0, 0


def _image_dataset_states(state: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(state, Mapping):
        if state.get("kind") == IMAGE_DATASET_MARKER:
            yield state
            return
        for value in state.values():
            yield from _image_dataset_states(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _image_dataset_states(value)


class ImageDataLoader(BioscaleDataLoader):
    """:class:`BioscaleDataLoader` over an :class:`ImageDataset`: the same state, layout and config checks on resume;
    :meth:`policy_stats` sums the image policy counts of this rank's workers up to the last delivered batch."""

    def __init__(self, dataset: ImageDataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)  # type: ignore[arg-type]
        self.classes = list(dataset.source.classes)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A delivered batch as the model takes it: uint8 pixels (``normalize=False``) scaled and normalised on the
        device they are on; a normalised batch unchanged."""
        if batch["pixel_values"].dtype != torch.uint8:
            return batch
        return {**batch, "pixel_values": self.dataset.transform.normalize(batch["pixel_values"])}

    def policy_stats(self) -> dict[str, int]:
        total = ImagePolicyStats()
        for dataset_state in _image_dataset_states(self.state_dict()):
            total.add({k: v for k, v in dataset_state["stats"].items() if k != "ignored_files"})
        total.ignored_files = self.dataset.source.ignored_files  # a property of the source: once, not per worker
        return total.as_dict()


def check_image_config(cfg: DataConfig) -> None:
    """``ValueError`` for data settings an image-classification run cannot use (naming the key)."""
    if cfg.objective != IMAGE_OBJECTIVE:
        raise ValueError(f"data.objective={cfg.objective!r}: the image loader trains {IMAGE_OBJECTIVE!r}")
    if cfg.use_sequence_packing:
        raise ValueError("data.use_sequence_packing=true: images are not packed (every image has the same tokens)")
    if cfg.hf_streaming:
        raise ValueError("data.hf_streaming=true is not supported for images; load the dataset (hf_streaming=false)")


def ignored_image_settings(cfg: DataConfig) -> list[str]:
    """Sequence settings an image-classification run does not read that differ from their defaults (one note each)."""
    if cfg.objective != IMAGE_OBJECTIVE:
        return []
    defaults = DataConfig(source=cfg.source, objective=IMAGE_OBJECTIVE)
    return [f"data.{key}={getattr(cfg, key)!r} is a sequence setting and data.objective={IMAGE_OBJECTIVE}: ignored"
            for key in _TOKEN_KEYS if getattr(cfg, key) != getattr(defaults, key)]  # fmt: skip


def open_training_images(cfg: DataConfig) -> ImageSource:
    """The labelled source ``cfg.source`` (``data.image`` names its columns)."""
    check_image_config(cfg)
    source = open_image_source(cfg.source, image_column=cfg.image.image_column, label_column=cfg.image.label_column,
                               hf_split=cfg.hf_split)  # fmt: skip
    if not source.classes:
        raise ValueError(f"data.source={cfg.source!r} has no class labels")
    return source


def image_label_config(classes: Sequence[str], overrides: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``num_labels`` / ``id2label`` / ``label2id`` for a classifier of ``classes`` (the data's), checked against
    those ``overrides`` already set (``ValueError`` naming the source when they disagree)."""
    id2label = {i: name for i, name in enumerate(classes)}
    given = overrides.get("num_labels")
    if given is not None and int(given) != len(classes):
        raise ValueError(f"model.overrides.num_labels={given} but data.source={source!r} has {len(classes)} classes "
                         f"({list(classes)[:10]}); drop the override (the classes come from the data)")  # fmt: skip
    given_names = overrides.get("id2label")
    if given_names is not None and {int(k): str(v) for k, v in dict(given_names).items()} != id2label:
        raise ValueError(f"model.overrides.id2label does not match the classes of data.source={source!r}: "
                         f"{list(classes)[:10]}")  # fmt: skip
    return {"num_labels": len(classes), "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}


def build_image_dataloader(
    cfg: DataConfig | Mapping[str, Any], *, image_size: int, rank: int = 0, world_size: int = 1,
    source: ImageSource | None = None, normalize: bool = True,
) -> ImageDataLoader:  # fmt: skip
    """The infinite, resumable loader of image micro-batches for ``rank`` of ``world_size`` (module docstring);
    ``source`` skips re-opening one already opened (its classes decide the labels).

    ``normalize=False`` delivers the augmented images as uint8 ``pixel_values`` (the same crops and flips) and leaves
    scaling and normalisation to :meth:`ImageDataLoader.model_inputs`, run where the batch is, after the copy to the
    GPU: a quarter of the bytes pass between the worker processes, the pinning thread and the GPU, which doubled the
    loader's rate on two CPU cores (1,052-1,127 against 489-541 images/s, ViT 224x224, batch 128; 2026-12-06). The
    values the model sees are the same bit for bit (tested). ``bioscale train`` loads images this way.
    """
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig.from_dict(cfg)
    cfg.validate()
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(
            f"build_image_dataloader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
    source = source if source is not None else open_training_images(cfg)
    dataset = ImageDataset(cfg, source, image_size=image_size, rank=rank, world_size=world_size, normalize=normalize)
    return ImageDataLoader(dataset, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)


def read_images(
    source: ImageSource, policy: ImagePolicy, *, batch_size: int = 64, limit: int | None = None
) -> Iterator[tuple[list[str], list[int], list[Any]]]:
    """``(ids, labels, RGB images)`` of ``source`` in its order, ``batch_size`` at a time, through ``policy`` (skipped
    images are left out and counted in ``policy.stats``); at most ``limit`` records are read."""
    refs = source.all_refs()
    if limit is not None:
        refs = refs[:limit]
    ids: list[str] = []
    labels: list[int] = []
    images: list[Any] = []
    for start in range(0, len(refs), _READ_CHUNK):
        for record in source.read(refs[start : start + _READ_CHUNK]):
            image = policy(record)
            if image is None:
                continue
            ids.append(record.record_id)
            labels.append(record.label)
            images.append(image)
            if len(images) == batch_size:
                yield ids, labels, images
                ids, labels, images = [], [], []
    if images:
        yield ids, labels, images


def is_image_path(path: str | Path) -> bool:
    """Whether ``path`` is image input for ``bioscale embed``: a folder (sequences come in files), an image file, or
    ``demo:digits``."""
    text = str(path)
    if text.startswith("demo:"):
        return text[len("demo:") :] in DEMO_IMAGE_SETS
    candidate = Path(text).expanduser()
    if candidate.is_dir():
        return not any(candidate.glob("*.parquet"))
    return candidate.suffix.lower() in IMAGE_EXTENSIONS


__all__ = [
    "IMAGE_DATASET_MARKER",
    "IMAGE_OBJECTIVE",
    "ImageDataLoader",
    "ImageDataset",
    "ImagePolicy",
    "ImagePolicyStats",
    "ImageTransform",
    "build_image_dataloader",
    "check_image_config",
    "decode_image",
    "ignored_image_settings",
    "image_label_config",
    "image_processor_for",
    "is_image_path",
    "open_training_images",
    "processor_image_size",
    "random_resized_crop_box",
    "read_images",
]
