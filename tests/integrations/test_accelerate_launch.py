"""``accelerate launch`` with two CPU processes (DDP over gloo), end to end: the HF Trainer recipe
(``examples/hf_trainer``) and bioscale's own loader in a plain Accelerate loop (``bioscale.integrations.accelerate``).

The launcher is run as ``python -m accelerate.commands.launch``: the same ``launch`` command and arguments as the
``accelerate launch`` console script, without that script's import of every other subcommand (``accelerate
estimate-memory`` imports ``timm`` when it is installed, and fails where ``timm`` came without ``torchvision``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bioscale  # noqa: F401  (registers the Auto classes the saved checkpoints name)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "hf_trainer" / "accelerate"

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow


def launch(*args: str, timeout: int = 240) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def test_the_recipe_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(CONFIGS / f"{name}.yaml")) for name in ("ddp", "fsdp2", "fp8")}
    assert kinds["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert kinds["fp8"].mixed_precision == "fp8" and kinds["fp8"].fp8_config["backend"] == "AO"


def test_the_fp8_config_converts_the_blocks_with_bioscales_converter(monkeypatch) -> None:
    """Under fp8.yaml the recipe converts the block linears itself and hands accelerate bf16 (accelerate's own torchao
    path needs a handler Trainer cannot pass); without it the model is left as built."""
    pytest.importorskip("torchao")
    import importlib.util

    from torchao.float8.float8_linear import Float8Linear

    from bioscale.models import build_config, build_model

    spec = importlib.util.spec_from_file_location("train_mlm", REPO / "examples" / "hf_trainer" / "train_mlm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model = build_model(build_config("esm2", "debug"), device="cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert not recipe.convert_for_fp8(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    monkeypatch.setenv("ACCELERATE_FP8_BACKEND", "AO")  # what accelerate launch sets from fp8.yaml's fp8_config
    import functools

    import bioscale.precision

    # No FP8 tensor cores on CPU: the same conversion with emulated (high-precision) GEMMs.
    monkeypatch.setattr(bioscale.precision, "apply_fp8", functools.partial(bioscale.precision.apply_fp8, emulate=True))
    assert recipe.convert_for_fp8(model)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted and all(name.startswith(("esm.layers.", "layers.", "model.layers.")) or ".layers." in name
                             for name in converted), converted  # fmt: skip
    assert not any("lm_head" in name for name in converted)
    import os

    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_FP8_BACKEND" not in os.environ


def test_the_fp8_recipe_trains_and_exports_through_accelerates_prepare(tmp_path: Path, monkeypatch, capsys) -> None:
    """The whole fp8.yaml path in one process, as ``accelerate launch`` would start it (its environment variables),
    with emulated FP8 GEMMs (CPU): Trainer's accelerator prepares the converted model without its torchao path (the
    step the H200 failed at), trains, and the export loads as stock ``EsmForMaskedLM`` with the trained logits."""
    pytest.importorskip("torchao")
    import functools
    import importlib.util

    from transformers import AutoModelForMaskedLM, EsmForMaskedLM

    import bioscale.precision

    spec = importlib.util.spec_from_file_location("train_mlm_fp8", REPO / "examples" / "hf_trainer" / "train_mlm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(bioscale.precision, "apply_fp8", functools.partial(bioscale.precision.apply_fp8, emulate=True))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    monkeypatch.setenv("ACCELERATE_FP8_BACKEND", "AO")
    monkeypatch.setattr(sys, "argv", ["train_mlm.py", "--model", "esm2", "--max-steps", "3", "--batch-size", "4",
                                      "--pad-to-multiple-of", "16", "--output-dir", str(tmp_path)])  # fmt: skip
    recipe.main()
    assert "after 3 steps on 1 processes (FP8 block linears)" in capsys.readouterr().out
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "final_model").eval()
    stock = EsmForMaskedLM.from_pretrained(tmp_path / "final_model_hf").eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 2]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_trainer_recipe_runs_on_two_processes(tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, EsmForMaskedLM

    out = launch("--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
                 "examples/hf_trainer/train_mlm.py", "--model", "esm2", "--packed", "--max-steps", "4",
                 "--batch-size", "4", "--output-dir", str(tmp_path))  # fmt: skip
    assert "after 4 steps on 2 processes" in out
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "final_model").eval()
    stock = EsmForMaskedLM.from_pretrained(tmp_path / "final_model_hf").eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 2]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bioscale_loader_keeps_its_rank_sharding_under_accelerate(tmp_path: Path) -> None:
    out = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "tests/integrations/accelerate_loop.py", str(tmp_path))  # fmt: skip
    results = {r["rank"]: r for r in (json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT "))}
    assert sorted(results) == [0, 1] and all(r["world"] == 2 and r["packed"] for r in results.values())
    # Each rank reads its own stream (no batch of one is a batch of the other) ...
    assert not set(results[0]["first"] + results[0]["after"]) & set(results[1]["first"] + results[1]["after"])
    # ... and save_state / load_state resume every rank exactly where it was.
    assert all(r["continued"] == r["after"] for r in results.values())
    # accelerator.prepare(loader), the trap the helper replaces, cannot serve the packed batches.
    assert not isinstance(results[0]["prepared"], list)
