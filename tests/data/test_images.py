"""The image data layer: sources (folders, parquet, HF datasets, the digits demo), the counted input policy, seeded
augmentation, the saved image processor, and the resumable loader."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bioscale.data.config import DataConfig
from bioscale.data.image_config import ImageDataConfig
from bioscale.data.image_sources import ImageRecord, open_image_source
from bioscale.data.images import (
    ImagePolicy,
    ImageTransform,
    build_image_dataloader,
    image_label_config,
    image_processor_for,
    random_resized_crop_box,
    read_images,
)
from bioscale.data.packing import count_tokens
from bioscale.eval.image_classification import model_class_ids


def _png(width: int = 12, height: int = 10, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cat", "dog", "eel")) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:02d}.png").write_bytes(_png(seed=label * 100 + i))
    return root


def _config(source: str | Path, *, seed: int = 0, num_workers: int = 0, **image: object) -> DataConfig:
    return DataConfig(source=str(source), objective="image_classification", micro_batch_size=4, seed=seed,
                      num_workers=num_workers, shuffle_buffer_size=8, image=ImageDataConfig(**image))  # fmt: skip


# ---- sources ------------------------------------------------------------------------------------------------------


def test_image_folder_classes_are_the_sorted_sub_folders_and_other_files_are_counted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", classes=("dog", "cat"))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "deeper").mkdir()
    (root / "cat" / "deeper" / "x.png").write_bytes(_png(seed=9))
    source = open_image_source(root)
    assert source.classes == ["cat", "dog"] and len(source) == 13 and source.ignored_files == 1
    records = source.read(source.all_refs())
    assert [r.label for r in records] == [0] * 7 + [1] * 6
    assert records[0].record_id.endswith("cat/00.png")


def test_image_folder_without_class_folders_or_with_an_empty_class_is_refused_by_name(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_png())
    with pytest.raises(ValueError, match=rf"image folder {flat} has no class folders \(1 images directly inside it\)"):
        open_image_source(flat)
    root = _folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folders without any image: \['empty'\]"):
        open_image_source(root)
    # Unlabelled (bioscale embed): every image under the folder, ids relative to it.
    source = open_image_source(flat, labelled=False)
    assert source.classes == [] and source.read(source.all_refs())[0].record_id == "a.png"
    with pytest.raises(ValueError, match="does not exist"):
        open_image_source(tmp_path / "nowhere")


def test_parquet_with_datasets_image_structs_and_class_label_names(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["zero", "one"])})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(seed=i), "path": None} for i in range(6)], "label": [0, 1, 1, 0, 1, 0]},
        features=features,
    )
    table.to_parquet(str(tmp_path / "t.parquet"))
    source = open_image_source(tmp_path / "t.parquet")
    assert source.classes == ["zero", "one"] and len(source) == 6
    records = source.read([(0, 5), (0, 1)])
    assert [r.label for r in records] == [0, 1] and records[0].record_id.endswith("t.parquet:row 5")
    assert ImagePolicy()(records[0]).size == (12, 10)
    # The same table as a Hugging Face dataset saved to disk: hf:<path>.
    table.save_to_disk(str(tmp_path / "saved"))
    hf = open_image_source(f"hf:{tmp_path / 'saved'}")
    assert hf.classes == ["zero", "one"] and [r.label for r in hf.read([(3, 0)])] == [0]


def test_parquet_with_binary_images_and_string_or_integer_labels(tmp_path: Path) -> None:
    images = [_png(seed=i) for i in range(5)]
    pq.write_table(pa.table({"img": images, "kind": ["b", "a", "b", "c", "a"]}), tmp_path / "s.parquet",
                   row_group_size=2)  # fmt: skip
    source = open_image_source(tmp_path / "s.parquet", image_column="img", label_column="kind")
    assert source.classes == ["a", "b", "c"] and source.unit_sizes() == [2, 2, 1]
    assert [r.label for r in source.read(source.all_refs())] == [1, 0, 1, 2, 0]
    pq.write_table(pa.table({"image": images, "label": [3, 0, 1, 3, 2]}), tmp_path / "i.parquet")
    assert open_image_source(tmp_path / "i.parquet").classes == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match=r"no column 'label'"):
        open_image_source(tmp_path / "s.parquet", image_column="img")


def test_digits_demo_is_a_disjoint_80_20_split_of_the_scikit_learn_digits() -> None:
    pytest.importorskip("sklearn")
    train, test = open_image_source("demo:digits"), open_image_source("demo:digits-test")
    assert len(train) + len(test) == 1797 and 0.15 < len(test) / 1797 < 0.25
    assert train.classes == test.classes == [str(d) for d in range(10)]
    train_ids = {r.record_id for r in train.read(train.all_refs())}
    test_records = test.read(test.all_refs())
    assert not train_ids & {r.record_id for r in test_records}
    assert test_records[0].data.shape == (8, 8) and test_records[0].data.dtype == np.uint8
    assert set(r.label for r in test_records) == set(range(10))


# ---- the input policy ---------------------------------------------------------------------------------------------


def test_corrupt_images_raise_naming_the_file_or_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=4)
    (root / "cat" / "broken.png").write_bytes(_png()[:40])  # truncated
    (root / "dog" / "fake.jpg").write_bytes(b"this is text")
    with pytest.raises(ValueError, match=r"image .*broken\.png cannot be decoded .*data\.image\.bad_images=skip"):
        next(iter(build_image_dataloader(_config(root), image_size=16)))
    loader = build_image_dataloader(_config(root, bad_images="skip"), image_size=16)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]  # one epoch: 12 good images -> 3 full batches
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
    stats = loader.policy_stats()
    assert stats["unreadable"] == 2 and stats["images_used"] == 12 and stats["images_read"] == 14


def test_tiny_and_non_rgb_images_follow_the_policy() -> None:
    policy = ImagePolicy(min_size=8, bad_images="skip", target_size=32)
    assert policy(ImageRecord("tiny.png", 0, _png(4, 20))) is None
    grey = policy(ImageRecord("grey.png", 0, _png(mode="L")))
    rgba = policy(ImageRecord("rgba.png", 0, _png(mode="RGBA")))
    assert grey.mode == rgba.mode == "RGB"
    palette = Image.new("P", (10, 10))
    palette.info["transparency"] = 0
    assert policy(ImageRecord("palette", 0, palette)).mode == "RGB"
    assert policy.stats.as_dict() == {
        "images_read": 4, "images_used": 3, "unreadable": 0, "too_small": 1, "converted_to_rgb": 3, "upsampled": 3,
        "left_over": 0, "ignored_files": 0,
    }  # fmt: skip
    strict = ImagePolicy(min_size=8)
    with pytest.raises(ValueError, match=r"image tiny\.png is too small \(4x20 pixels; data\.image\.min_size=8\)"):
        strict(ImageRecord("tiny.png", 0, _png(4, 20)))


# ---- augmentation and the processor -------------------------------------------------------------------------------


def test_random_resized_crop_boxes_stay_inside_and_follow_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(40, 30, (0.3, 0.6), (0.75, 1.33), rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert 0.25 < w * h / 1200 < 0.65
    # No allowed box fits a 100x2 strip: the whole height at the widest allowed ratio, centred.
    assert random_resized_crop_box(100, 2, (0.9, 1.0), (0.5, 2.0), np.random.default_rng(0)) == (48, 0, 4, 2)


def test_augmentation_is_seeded_per_image_and_epoch(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    first = [next(iter(build_image_dataloader(_config(root), image_size=16)))["pixel_values"] for _ in range(2)]
    assert torch.equal(first[0], first[1])  # same seed: the same images, crops and flips
    other = next(iter(build_image_dataloader(_config(root, seed=1), image_size=16)))["pixel_values"]
    assert not torch.equal(first[0], other)
    # One image's augmentation depends on (seed, epoch, the image) only: not on the batch it lands in.
    transform = ImageTransform.from_config(ImageDataConfig(), 16, train=True)
    image = Image.open(io.BytesIO(_png(seed=3))).convert("RGB")
    a = transform(image, np.random.default_rng([0, 12, 0, 5, 0]))
    b = transform(image, np.random.default_rng([0, 12, 0, 5, 0]))
    c = transform(image, np.random.default_rng([0, 12, 1, 5, 0]))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.shape == (3, 16, 16) and a.dtype == np.float32


def test_evaluation_transform_equals_the_saved_image_processor(tmp_path: Path) -> None:
    cfg = ImageDataConfig(mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], interpolation="bicubic")
    processor = image_processor_for(24, cfg)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTImageProcessor" and saved["resample"] == 3
    from transformers import AutoImageProcessor

    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    transform = ImageTransform.from_config(cfg, 24, train=False)
    images = [Image.open(io.BytesIO(_png(37, 29, seed=s))).convert("RGB") for s in range(3)]
    ours = torch.from_numpy(np.stack([transform(image) for image in images]))
    theirs = loaded(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---- the loader ---------------------------------------------------------------------------------------------------


def test_batches_are_model_ready_and_count_as_one_token_per_image(tmp_path: Path) -> None:
    loader = build_image_dataloader(_config(_folder(tmp_path / "imgs")), image_size=16)
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "labels"} and batch["labels"].dtype == torch.long
    assert count_tokens(batch) == {"num_tokens": 4, "num_real_tokens": 4, "num_label_tokens": 4, "num_sequences": 4}
    assert loader.classes == ["cat", "dog", "eel"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uint8_batches_normalised_on_the_device_equal_the_normalised_loader_bit_for_bit(tmp_path, num_workers) -> None:
    # What bioscale train runs: uint8 pixels through the workers, normalize=False, then model_inputs after the copy.
    cfg = _config(_folder(tmp_path / "imgs", per_class=8), num_workers=num_workers, mean=[0.485, 0.456, 0.406],
                  std=[0.229, 0.224, 0.225])  # fmt: skip
    floats, raw = (build_image_dataloader(cfg, image_size=16, normalize=n) for n in (True, False))
    for batch, uint8_batch in zip(itertools.islice(floats, 5), itertools.islice(raw, 5)):  # past one epoch (24)
        assert uint8_batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].dtype == torch.float32
        ready = raw.model_inputs(uint8_batch)
        assert torch.equal(ready["pixel_values"], batch["pixel_values"])
        assert torch.equal(ready["labels"], batch["labels"])
        assert floats.model_inputs(batch) is batch  # a normalised batch is left as it is
    assert raw.policy_stats() == floats.policy_stats()


@pytest.mark.gpu
def test_uint8_batches_normalised_on_the_gpu_equal_the_loader_normalised_on_the_cpu_bit_for_bit(tmp_path) -> None:
    # bioscale train's path on a GPU: the copy to the device, then model_inputs there (IEEE float32 there as here).
    cfg = _config(_folder(tmp_path / "imgs", per_class=8), mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    floats, raw = (build_image_dataloader(cfg, image_size=16, normalize=n) for n in (True, False))
    for batch, uint8_batch in zip(itertools.islice(floats, 3), itertools.islice(raw, 3)):
        ready = raw.model_inputs({k: v.cuda() for k, v in uint8_batch.items()})
        assert ready["pixel_values"].is_cuda
        torch.testing.assert_close(ready["pixel_values"].cpu(), batch["pixel_values"], rtol=0, atol=0)


def test_resume_continues_exactly_and_keeps_the_counts(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=7)  # 21 images: 5 batches of 4 per epoch, 1 left over
    cfg = _config(root)
    loader = build_image_dataloader(cfg, image_size=16)
    it = iter(loader)
    for _ in range(7):  # into the second epoch
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = build_image_dataloader(cfg, image_size=16)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for batch in expected:
        got = next(again)
        assert torch.equal(got["pixel_values"], batch["pixel_values"]) and torch.equal(got["labels"], batch["labels"])
    stats = resumed.policy_stats()
    assert stats["left_over"] == 2 and stats["images_used"] == 12 * 4 + 2  # 12 batches delivered + 2 left over
    with pytest.raises(ValueError, match="data config changed"):
        build_image_dataloader(_config(root, hflip_prob=0.0), image_size=16).load_state_dict(state)


def test_one_worker_gives_the_same_batches_as_none(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    inline = iter(build_image_dataloader(_config(root), image_size=16))
    worker = iter(build_image_dataloader(_config(root, num_workers=1), image_size=16))
    for _ in range(3):
        a, b = next(inline), next(worker)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_two_ranks_split_the_images_without_overlap(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", per_class=8)
    cfg = _config(root, hflip_prob=0.0, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0])
    seen = []
    for rank in (0, 1):
        dataset = build_image_dataloader(cfg, image_size=16, rank=rank, world_size=2).dataset
        seen.append(dataset.epoch_refs(0, rank, 2))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 24


# ---- configuration and classes ------------------------------------------------------------------------------------


def test_bad_image_settings_are_refused_by_key() -> None:
    for key, value, match in (("crop_scale", [0.5, 0.2], r"data\.image\.crop_scale"),
                              ("interpolation", "cubic", r"data\.image\.interpolation"),
                              ("bad_images", "ignore", r"data\.image\.bad_images"),
                              ("std", [0.5, 0.0, 0.5], r"data\.image\.std"),
                              ("min_size", 0, r"data\.image\.min_size")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DataConfig(source="demo:digits", objective="image_classification", image={key: value})
    cfg = DataConfig.from_dict({"source": "demo:digits", "objective": "image_classification",
                                "image": {"hflip_prob": 0.0}})  # fmt: skip
    assert cfg.image.hflip_prob == 0.0 and cfg.to_dict()["image"]["crop_scale"] == [0.08, 1.0]
    with pytest.raises(ValueError, match="images are not packed"):
        build_image_dataloader(DataConfig(source="demo:digits", objective="image_classification",
                                          use_sequence_packing=True), image_size=32)  # fmt: skip


def test_class_mismatches_between_checkpoint_and_data_raise_naming_the_source() -> None:
    labels = image_label_config(["a", "b"], {}, source="x/")
    assert labels["num_labels"] == 2 and labels["id2label"] == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match=r"model\.overrides\.num_labels=3 but data\.source='x/' has 2 classes"):
        image_label_config(["a", "b"], {"num_labels": 3}, source="x/")

    class Config:
        id2label = {0: "cat", 1: "dog"}

    assert model_class_ids(["dog", "cat"], Config(), source="held_out/") == [1, 0]  # matched by name
    with pytest.raises(ValueError, match=r"the classes of held_out/ do not match the model's: \['eel'\]"):
        model_class_ids(["cat", "eel"], Config(), source="held_out/")


def test_read_images_yields_everything_in_order_for_evaluation(tmp_path: Path) -> None:
    source = open_image_source(_folder(tmp_path / "imgs", per_class=3))
    policy = ImagePolicy()
    batches = list(read_images(source, policy, batch_size=4))
    assert [len(ids) for ids, _, _ in batches] == [4, 4, 1]
    assert [label for _, labels, _ in batches for label in labels] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_units_of_unequal_size_are_dealt_so_every_consumer_gets_its_share(tmp_path: Path) -> None:
    """23 row groups (22 of 64 images, one of 56) over 8 consumers: one consumer holds only two row groups, and the
    short one never lands there, so every consumer has a micro-batch of 128 in every epoch (dealing every 8th unit
    gave that consumer 64 + 56 = 120 in some epochs: the L1_vit_base failure on the H200); together they hold every
    image once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [b"x"] * 1464, "label": [i % 10 for i in range(1464)]})
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=64)
    dataset = build_image_dataloader(_config(tmp_path / "images.parquet"), image_size=16).dataset
    assert sorted(dataset.source.unit_sizes()) == [56] + [64] * 22
    for epoch in range(8):
        shares = [dataset.epoch_refs(epoch, consumer, 8) for consumer in range(8)]
        assert min(len(share) for share in shares) >= 128
        assert sorted(ref for share in shares for ref in share) == sorted(set(ref for share in shares for ref in share))
        assert sum(len(share) for share in shares) == 1464
