"""``bench_vit.py`` on CPU with the debug ViT: timm and bioscale eager rows on the same weights and images (the GPU
numbers, compiled rows included, come from a GPU run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_vit", REPO_ROOT / "benchmarks" / "bench_vit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vit"] = module
    spec.loader.exec_module(module)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CI machine: one thread keeps the rows comparable
    yield module
    torch.set_num_threads(previous)
    sys.modules.pop("bench_vit", None)


def _timm_or_skip() -> None:
    sys.path.insert(0, str(REPO_ROOT / "tests" / "models"))
    try:
        from vit_reference import import_timm
    finally:
        sys.path.pop(0)
    import_timm()  # skips without timm; imports it where torchvision cannot load (see vit_reference.py)


def test_quick_rows_run_timm_and_bioscale_on_the_same_weights(bench, tmp_path: Path) -> None:
    _timm_or_skip()
    code = bench.main(["--device", "cpu", "--size", "debug", "--batch-sizes", "2,4", "--variants", "timm,bioscale",
                       "--steps", "2", "--warmup", "1", "--out-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    (report,) = tmp_path.glob("*-cpu-vit-debug.md")
    data = json.loads(report.with_suffix(".json").read_text())
    rows = data["rows"]
    assert [(r["variant"], r["batch_size"], r["status"]) for r in rows] == [
        ("timm", 2, "ok"), ("bioscale", 2, "ok"), ("timm", 4, "ok"), ("bioscale", 4, "ok"),
    ]  # fmt: skip
    # to_timm copies the weights exactly, so timm's logits are bioscale's (float32, channels-last input).
    assert all(r["max_abs_logit_diff"] <= 1e-4 for r in rows)
    assert all(r["images_per_sec"] > 0 and r["peak_mem_gb"] > 0 and r["mfu"] is None for r in rows)  # no CPU peak
    assert data["flops_per_image"] > 0 and "| timm | 2 |" in report.read_text()


def test_a_missing_timm_is_a_row_with_its_reason(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_timm_available", lambda: "timm unavailable: ModuleNotFoundError: no timm")
    code = bench.main(["--device", "cpu", "--size", "debug", "--batch-sizes", "2", "--variants", "timm,bioscale",
                       "--steps", "1", "--warmup", "0", "--mode", "infer", "--out-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert rows[0]["status"].startswith("timm unavailable") and rows[1]["status"] == "ok"
