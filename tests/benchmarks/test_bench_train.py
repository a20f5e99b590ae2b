"""benchmarks/bench_train.py on CPU: its step planning and batches, and the ``--quick`` smoke run end to end.

The end-to-end run is the check that every variant trains the same steps: from the same weights, on the same
sequences and masks, the first-step losses of ``transformers``, bioscale padded and bioscale packed must agree.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


def test_model_and_variant_options(bench) -> None:
    case = bench.parse_model("esm2_3B:tokens=16384:ac=none:mb=8")
    assert (case.tokens, case.ac, case.mb, case.family) == (16384, "none", 8, "esm2")
    with pytest.raises(ValueError, match="unknown model"):
        bench.parse_model("esm3_1B")
    with pytest.raises(ValueError, match="multiple of 16"):
        bench.parse_model("esm2_8M:tokens=1000")
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_model("esm2_8M:batch=4")
    args = bench.parse_args(["--fp8-recipe", "rowwise"])
    variant = bench.parse_variant("packed_fp8:min_features=2048:layers=2-4,7", args)
    assert (variant.fp8_recipe, variant.fp8_min_features, variant.fp8_layers) == ("rowwise", 2048, (2, 3, 4, 7))
    assert variant.label == "packed_fp8[rowwise,min2048,L2-4,7]"
    with pytest.raises(ValueError, match="only packed_fp8"):
        bench.parse_variant("packed:recipe=rowwise", args)


def test_steps_and_batches_hold_the_same_sequences(bench) -> None:
    rng = torch.Generator().manual_seed(0)
    examples = []
    for length in torch.randint(5, 60, (200,), generator=rng).tolist():
        ids = torch.randint(4, 29, (length,), generator=rng).numpy()
        labels = ids.copy()
        labels[::3] = -100
        examples.append(bench.Example(ids, labels))
    case = bench.ModelCase("toy", "esm2", "debug", "uniref", max_length=64, mb=3, tokens=128, grad_acc=2)
    plans = bench.plan_steps(examples, case, num_steps=5)
    flat = [i for plan in plans for i in plan.indices]
    assert flat == list(range(len(flat)))  # in order, nothing skipped or repeated
    for plan in plans:
        assert len(plan.packs) == 2
        for pack in plan.packs:
            assert sum(len(examples[i]) for i in pack) <= case.tokens
            batch = bench.packed_batch(examples, pack, case)
            assert batch["input_ids"].shape == (1, case.tokens)  # fixed shape: one compile
            assert batch["max_length_q"] == case.max_length
            real = sum(len(examples[i]) for i in pack)
            assert (batch["labels"][0, real:] == -100).all()
        padded = bench.padded_batches(examples, plan.indices, case)
        sizes = [b["input_ids"].shape[0] for b in padded]
        assert len(sizes) == -(-len(plan.indices) // case.mb) and max(sizes) <= case.mb and max(sizes) - min(sizes) <= 1
        packed_labels = torch.cat([bench.packed_batch(examples, p, case)["labels"][0] for p in plan.packs])
        padded_labels = torch.cat([b["labels"][b["attention_mask"].bool()] for b in padded])
        assert torch.equal(packed_labels[packed_labels != -100], padded_labels[padded_labels != -100])


@pytest.mark.slow
def test_quick_cpu_run_agrees_across_variants(bench, shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao.float8")
    code = bench.main(
        ["--quick", "--device", "cpu", "--models", "esm2_debug", "--data-dir", str(shared_data), "--out-dir", str(tmp_path)]
    )
    assert code == 0
    (report,) = tmp_path.glob("*.md")
    text = report.read_text()
    for variant in ("hf_padded", "padded", "packed", "packed_fp8[tensorwise]"):
        assert f"| esm2_debug | {variant} |" in text
    assert "--quick" in text  # the exact command is recorded
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows)
    first = {row["variant"]: row["first_loss"] for row in rows}
    assert first["padded"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed_fp8[tensorwise]"] == pytest.approx(first["hf_padded"], rel=2e-2)
