"""``bench_train.py``'s CodonFM EnCodon rows on CPU: the reference row (CodonFM's ``EnCodon`` with the bioscale init's
weights, padded) and bioscale padded / packed run the same masked CDS batches (the GPU numbers come from a GPU run)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("BIOSCALE_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


def test_quick_encodon_rows_run_the_reference_and_bioscale_on_the_same_batches(bench, tmp_path: Path) -> None:
    if not (REFERENCE_DIR / "codonfm_reference").is_dir():
        pytest.skip("../shared/reference/codonfm_reference not present")
    pytest.importorskip("einops")  # the reference's attention imports it
    case = bench.parse_model("encodon_1B")
    assert (case.family, case.data, case.max_length) == ("codonfm", "cds", 2048)
    assert bench.missing_baseline(case, bench.parse_variant("hf_padded", bench.parse_args([]))) is not None
    code = bench.main(
        ["--quick", "--device", "cpu", "--models", "encodon_debug", "--variants", "ref_padded,padded,packed",
         "--steps", "2", "--warmup", "1", "--reference-dir", str(REFERENCE_DIR), "--out-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    (report,) = tmp_path.glob("*.md")
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 3
    first = {row["variant"]: row["first_loss"] for row in rows}
    # Same weights and masked batches; hidden dropout (0.1, as released) draws differently per row, and the reference
    # row runs in bf16 autocast (as AMPLIFY's): near-uniform logits at init put every first loss at ~ln(69).
    assert first["ref_padded"] == pytest.approx(math.log(69), rel=1e-2)
    assert first["packed"] == pytest.approx(first["padded"], rel=1e-2)
    assert first["ref_padded"] == pytest.approx(first["padded"], rel=1e-2)
    assert "| encodon_debug | ref_padded |" in report.read_text()
