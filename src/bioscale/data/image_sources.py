"""Where labelled images come from: image folders, parquet tables, Hugging Face ``datasets``, and an offline demo set.

Every source is a list of *units* (a file, a parquet row group, a dataset row) holding *records*; the loader permutes
units and shuffles records in blocks (``bioscale.data.images``) and reads a block at a time with :meth:`read`, so a
parquet table is read one row group at a time, never whole. A record is an :class:`ImageRecord`: an id for messages
(the file path, ``table.parquet:row 17``), a class id into the source's ``classes``, and the still-encoded image
(bytes, a file path, or a pixel array), which the input policy decodes. Sources raise ``ValueError`` naming the path
for what is wrong with the *collection* (no class folders, a missing column, labels outside the class list); what is
wrong with one *image* is the policy's business.

- ``path/`` with class sub-folders: ``path/<class>/<image>`` (nested folders inside a class are walked too); classes
  are the sorted folder names, files with an image extension are images, anything else (``.txt``, hidden files) is
  ignored and counted. :class:`ImageFolderSource` with ``labelled=False`` reads every image under a folder instead
  (``bioscale embed``): ids are the paths relative to it.
- ``table.parquet`` or a folder of ``*.parquet`` shards: an image column (binary, the ``{bytes, path}`` struct that
  ``datasets`` writes, or a path relative to the table) and a label column (int, with class names from the
  ``datasets`` ``ClassLabel`` metadata when the table has it, else ``"0" … "K-1"``; or class-name strings, sorted).
- ``hf:<dataset or local path>`` (split ``data.hf_split``) or ``hf:<dataset>:<split>`` (``hf:AI-Lab-Makerere/
  beans:validation``, the way ``bioscale eval --data`` names a held-out split): a Hugging Face dataset; its image
  column is read undecoded and its ``ClassLabel`` names are the classes.
- ``demo:digits`` / ``demo:digits-test``: the 1,797 8 x 8 handwritten digits (UCI "Optical Recognition of Handwritten
  Digits", 10 classes, 17 grey levels) that scikit-learn ships inside its wheel as ``sklearn/datasets/data/
  digits.csv.gz``, split 80 / 20 by a keyed hash of the pixels (identical images fall on the same side): 1,4xx
  training and 3xx held-out images, read without importing scikit-learn.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioscale.data.splits import is_held_out

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
UNLABELLED = -100  # the class id of an image with no label (bioscale.constants.IGNORE_INDEX)

# demo name -> (held-out side?, what it is)
DEMO_IMAGE_SETS: dict[str, tuple[bool, str]] = {
    "digits": (False, "80% of scikit-learn's 1,797 8x8 handwritten digits (10 classes), the training side"),
    "digits-test": (True, "the other 20% of the same digits, held out (split by a keyed hash of the pixels)"),
}
DIGITS_HELD_OUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageRecord:
    """One image before decoding: ``data`` is encoded bytes, a file path, or a ``uint8`` pixel array."""

    record_id: str
    label: int
    data: bytes | str | np.ndarray


class ImageSource:
    """A labelled image collection: ``classes``, ``unit_sizes()`` and ``read(refs)`` (see the module docstring)."""

    name: str
    classes: list[str]
    ignored_files: int = 0  # files that are not images (image folders), counted in the policy stats

    def unit_sizes(self) -> list[int]:
        raise NotImplementedError

    def read(self, refs: Sequence[tuple[int, int]]) -> list[ImageRecord]:
        """The records ``(unit, row)`` of ``refs``, in that order (each unit is read once)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(self.unit_sizes())

    def all_refs(self) -> list[tuple[int, int]]:
        return [(unit, row) for unit, size in enumerate(self.unit_sizes()) for row in range(size)]


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


class ImageFolderSource(ImageSource):
    """``root/<class>/<image>`` (``labelled=True``) or every image under ``root`` (``labelled=False``); one file per
    unit, sorted by path."""

    def __init__(self, root: str | Path, *, labelled: bool = True) -> None:
        self.root = Path(root)
        self.name = str(self.root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a folder")
        files: list[tuple[Path, int]] = []
        ignored = 0
        if labelled:
            class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            loose = [p for p in self.root.iterdir() if _is_image_file(p)]
            if not class_dirs:
                found = f" ({len(loose)} images directly inside it)" if loose else ""
                raise ValueError(
                    f"image folder {self.root} has no class folders{found}: expected {self.root}/<class>/<image> "
                    "(one sub-folder per class, named after it)"
                )
            ignored += sum(1 for p in self.root.iterdir() if p.is_file())  # loose files have no class
            self.classes = [p.name for p in class_dirs]
            for label, folder in enumerate(class_dirs):
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    if _is_image_file(path):
                        files.append((path, label))
                    else:
                        ignored += 1
            counts = np.bincount([label for _, label in files], minlength=len(self.classes))
            empty = [name for name, count in zip(self.classes, counts) if count == 0]
            if empty:
                raise ValueError(f"image folder {self.root}: class folders without any image: {empty}")
        else:
            self.classes = []
            candidates = [self.root] if _is_image_file(self.root) else sorted(self.root.rglob("*"))
            for path in candidates:
                if _is_image_file(path):
                    files.append((path, UNLABELLED))
                elif path.is_file():
                    ignored += 1
        if not files:
            raise ValueError(
                f"image folder {self.root} holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.files = files
        self.ignored_files = ignored

    def unit_sizes(self) -> list[int]:
        return [1] * len(self.files)

    def read(self, refs: Sequence[tuple[int, int]]) -> list[ImageRecord]:
        out = []
        for unit, _ in refs:
            path, label = self.files[unit]
            record_id = str(path) if self.classes else str(path.relative_to(self.root))
            out.append(ImageRecord(record_id, label, str(path)))
        return out


def _image_payload(value: Any, base: Path, where: str) -> bytes | str:
    """An image cell as bytes or a path: binary, ``{bytes, path}`` (``datasets``' Image), or a path string."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            value = value["path"]
        else:
            raise ValueError(f"{where}: the image cell has neither bytes nor a path")
    if isinstance(value, str):
        path = Path(value)
        return str(path if path.is_absolute() else base / path)
    raise ValueError(f"{where}: the image cell is {type(value).__name__}, expected bytes, {{bytes, path}} or a path")


def _class_names_from_hf_metadata(schema_metadata: dict[bytes, bytes] | None, column: str) -> list[str] | None:
    """``ClassLabel`` names that ``datasets`` stores in a parquet file's schema metadata, if any."""
    raw = (schema_metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _labels_to_ids(values: list[Any], names: list[str] | None, where: str, column: str) -> tuple[list[int], list[str]]:
    """Class ids and names from a label column: ints (named by ``names`` or ``"0" … "K-1"``) or name strings."""
    if any(v is None for v in values):
        raise ValueError(f"{where}: the label column {column!r} has empty (null) cells")
    if all(isinstance(v, str) for v in values):
        classes = names if names is not None else sorted(set(values))
        index = {name: i for i, name in enumerate(classes)}
        missing = sorted(set(values) - set(index))
        if missing:
            raise ValueError(f"{where}: labels {missing[:5]} are not among the classes {classes[:10]}")
        return [index[v] for v in values], classes
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ids = [int(v) for v in values]
        classes = names if names is not None else [str(i) for i in range(max(ids) + 1 if ids else 0)]
        bad = sorted({i for i in ids if not 0 <= i < len(classes)})
        if bad:
            raise ValueError(f"{where}: class ids {bad[:5]} are outside [0, {len(classes)}) (classes {classes[:10]})")
        return ids, classes
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(f"{where}: the label column {column!r} holds {kinds}; expected integer ids or class-name strings")


class ParquetImageSource(ImageSource):
    """A parquet table (or a folder of shards) with an image and a label column; one row group per unit."""

    def __init__(self, path: str | Path, *, image_column: str, label_column: str | None) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.name = str(self.path)
        files = sorted(self.path.glob("*.parquet")) if self.path.is_dir() else [self.path]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"parquet source {self.path} does not exist or holds no *.parquet files")
        self.image_column, self.label_column = image_column, label_column
        self._files = [pq.ParquetFile(f) for f in files]
        self._paths = files
        self._groups: list[tuple[int, int, int]] = []  # (file, row group, first row of the group in the file)
        labels: list[Any] = []
        names: list[str] | None = None
        for index, (file, path) in enumerate(zip(self._files, files)):
            columns = file.schema_arrow.names
            wanted = [image_column] + ([label_column] if label_column else [])
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise ValueError(f"parquet source {path}: no column {missing[0]!r} (columns: {columns}); set "
                                 "data.image.image_column / label_column")  # fmt: skip
            first = 0
            for group in range(file.num_row_groups):
                self._groups.append((index, group, first))
                first += file.metadata.row_group(group).num_rows
            if label_column:
                labels += file.read(columns=[label_column]).column(label_column).to_pylist()
                names = names or _class_names_from_hf_metadata(file.schema_arrow.metadata, label_column)
        if label_column:
            self._labels, self.classes = _labels_to_ids(labels, names, f"parquet source {self.path}", label_column)
        else:
            self._labels, self.classes = [UNLABELLED] * len(labels), []
        self._group_offsets = np.cumsum([0] + self.unit_sizes()).tolist()

    def unit_sizes(self) -> list[int]:
        return [self._files[f].metadata.row_group(g).num_rows for f, g, _ in self._groups]

    def read(self, refs: Sequence[tuple[int, int]]) -> list[ImageRecord]:
        tables: dict[int, list[Any]] = {}
        for unit in sorted({unit for unit, _ in refs}):
            file, group, _ = self._groups[unit]
            tables[unit] = self._files[file].read_row_group(group, columns=[self.image_column]).column(0).to_pylist()
        out = []
        for unit, row in refs:
            file, _, first = self._groups[unit]
            where = f"{self._paths[file]}:row {first + row}"
            payload = _image_payload(tables[unit][row], self._paths[file].parent, where)
            label = self._labels[self._group_offsets[unit] + row] if self.classes else UNLABELLED
            out.append(ImageRecord(where, label, payload))
        return out


class HFImageSource(ImageSource):
    """A Hugging Face dataset (``datasets.load_dataset`` of a Hub name, or ``load_from_disk`` of a saved folder); one
    row per unit, the image column read undecoded."""

    def __init__(self, spec: str, *, split: str, image_column: str, label_column: str | None) -> None:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(f"hf:{spec} needs the datasets package: pip install 'bioscale[hf]' ({err})") from err
        self.name = f"hf:{spec}"
        path = Path(spec)
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(spec, split=split)
        columns = list(dataset.column_names)
        for column in [image_column] + ([label_column] if label_column else []):
            if column not in columns:
                raise ValueError(f"{self.name}: no column {column!r} (columns: {columns}); set data.image.image_column "
                                 "/ label_column")  # fmt: skip
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self._dataset = dataset
        self.image_column = image_column
        if label_column:
            feature = dataset.features[label_column]
            names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
            self._labels, self.classes = _labels_to_ids(dataset[label_column], names, self.name, label_column)
        else:
            self._labels, self.classes = [UNLABELLED] * len(dataset), []

    def unit_sizes(self) -> list[int]:
        return [1] * len(self._dataset)

    def read(self, refs: Sequence[tuple[int, int]]) -> list[ImageRecord]:
        indices = [unit for unit, _ in refs]
        cells = self._dataset.select(indices)[self.image_column] if indices else []
        return [
            ImageRecord(f"{self.name}[{i}]", self._labels[i], _image_payload(cell, Path("."), f"{self.name}[{i}]"))
            for i, cell in zip(indices, cells)
        ]


def digits_path() -> Path:
    """The digits table inside the installed scikit-learn wheel (``ValueError`` when scikit-learn is absent)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("demo:digits ships with scikit-learn, which is not installed: pip install 'bioscale[vit]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise ValueError(f"demo:digits: scikit-learn is installed but has no {path}; reinstall it from the PyPI wheel")
    return path


class DigitsSource(ImageSource):
    """``demo:digits`` / ``demo:digits-test`` (see the module docstring): 8 x 8 grey ``uint8`` arrays (the 0-16 levels
    scaled to 0-255, rounded), one image per unit, ids ``digits:<row of the table>``."""

    def __init__(self, held_out: bool) -> None:
        self.name = "demo:digits-test" if held_out else "demo:digits"
        with gzip.open(digits_path(), "rt") as handle:
            table = np.loadtxt(io.StringIO(handle.read()), delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :64], table[:, 64]
        keep = [
            i for i in range(len(table))
            if is_held_out(pixels[i].astype(np.uint8).tobytes().hex(), seed=DIGITS_SPLIT_SEED,
                           fraction=DIGITS_HELD_OUT_FRACTION) == held_out
        ]  # fmt: skip
        self._rows = keep
        self._images = np.rint(pixels[keep].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
        self._labels = labels[keep].tolist()
        self.classes = [str(d) for d in range(10)]

    def unit_sizes(self) -> list[int]:
        return [1] * len(self._rows)

    def read(self, refs: Sequence[tuple[int, int]]) -> list[ImageRecord]:
        return [ImageRecord(f"digits:{self._rows[u]}", int(self._labels[u]), self._images[u]) for u, _ in refs]


def open_image_source(
    spec: str | Path,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    hf_split: str = "train",
    labelled: bool = True,
) -> ImageSource:
    """The source ``spec`` names (see the module docstring); ``label_column=None`` / ``labelled=False`` read images
    without labels (``bioscale embed``). ``ValueError`` for an unknown ``demo:`` name or a path that does not exist."""
    text = str(spec)
    if text.startswith("demo:"):
        name = text[len("demo:") :]
        if name not in DEMO_IMAGE_SETS:
            raise ValueError(f"unknown image demo set {name!r}: expected one of {sorted(DEMO_IMAGE_SETS)}")
        return DigitsSource(held_out=DEMO_IMAGE_SETS[name][0])
    if text.startswith("hf:"):
        name, _, split = text[len("hf:") :].rpartition(":")
        if not name or "/" in split:  # no ":<split>" suffix (a Hub name or a path has none after its last ":")
            name, split = text[len("hf:") :], hf_split
        return HFImageSource(name, split=split, image_column=image_column,
                             label_column=label_column if labelled else None)  # fmt: skip
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(
            f"image source {text!r} does not exist (a folder, a .parquet file, hf:<dataset> or demo:digits)"
        )
    is_table = path.suffix.lower() in (".parquet", ".pq") or (path.is_dir() and any(path.glob("*.parquet")))
    if is_table:
        return ParquetImageSource(path, image_column=image_column, label_column=label_column if labelled else None)
    if path.is_file() and not _is_image_file(path):
        raise ValueError(f"image source {text!r} is a file that is neither an image nor a .parquet table")
    return ImageFolderSource(path, labelled=labelled and path.is_dir())
