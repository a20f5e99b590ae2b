"""Export for serving: the exported directories load in stock ``transformers`` in a process where bioscale cannot be
imported, and give the outputs the bioscale models give."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bioscale.use import export_model, load_model
from bioscale.use.cli import export_main

from .conftest import PROTEINS

# Runs in a fresh interpreter: a meta-path finder makes any ``import bioscale`` fail, so only stock code can load.
STOCK_LOADER = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockBioscale(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bioscale" or name.startswith("bioscale."):
                raise ImportError(f"bioscale is blocked in this process ({name})")
            return None

    sys.meta_path.insert(0, BlockBioscale())
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer

    ref = torch.load(sys.argv[1])
    checks = [
        ("esm", AutoModelForMaskedLM, "EsmForMaskedLM"),
        ("token", AutoModelForTokenClassification, "EsmForTokenClassification"),
    ]
    for key, auto, expected_class in checks:
        model = auto.from_pretrained(ref[key + "_dir"]).eval()
        assert type(model).__name__ == expected_class, type(model).__name__
        tokenizer = AutoTokenizer.from_pretrained(ref[key + "_dir"])
        ids = tokenizer(ref["protein"], return_tensors="pt")["input_ids"]
        assert torch.equal(ids, ref["protein_ids"]), (ids, ref["protein_ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref[key + "_logits"], atol=1e-5, rtol=0)

    llama = AutoModelForCausalLM.from_pretrained(ref["llama_dir"]).eval()
    assert type(llama).__name__ == "LlamaForCausalLM", type(llama).__name__
    tokenizer = AutoTokenizer.from_pretrained(ref["llama_dir"])
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("ACGTTGCA", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = llama.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(out, ref["llama_greedy"]), (out, ref["llama_greedy"])
    assert "bioscale" not in sys.modules
    try:
        import bioscale  # noqa: F401
    except ImportError:
        print("STOCK-OK")
    """
)


def test_exports_load_in_stock_transformers_without_bioscale(esm_dir: Path, llama_dir: Path, tmp_path: Path) -> None:
    esm = load_model(esm_dir, task="masked_lm")
    token = load_model(esm_dir, task="token_classification", config_overrides={"num_labels": 3})
    token.model.save_pretrained(tmp_path / "token_ckpt")
    token.tokenizer.save_pretrained(tmp_path / "token_ckpt")
    llama = load_model(llama_dir, task="causal_lm")

    assert export_main([str(esm_dir), "-o", str(tmp_path / "esm_export")]) == 0
    export_model(tmp_path / "token_ckpt", tmp_path / "token_export")
    export_model(llama_dir, tmp_path / "llama_export")

    protein_ids = torch.tensor([esm.tokenizer(PROTEINS["hba"])["input_ids"]])
    prompt = torch.tensor(
        [[llama.tokenizer.bos_token_id] + llama.tokenizer("ACGTTGCA", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        reference = {
            "protein": PROTEINS["hba"],
            "protein_ids": protein_ids,
            "esm_dir": str(tmp_path / "esm_export"),
            "esm_logits": esm.model(input_ids=protein_ids).logits,
            "token_dir": str(tmp_path / "token_export"),
            "token_logits": token.model(input_ids=protein_ids).logits,
            "llama_dir": str(tmp_path / "llama_export"),
            "llama_greedy": llama.model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12),
        }
    torch.save(reference, tmp_path / "reference.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, str(tmp_path / "reference.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "STOCK-OK" in proc.stdout, proc.stderr[-3000:]


def test_export_errors(esm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    sequence_model = load_model(esm_dir, task="sequence_classification", config_overrides={"num_labels": 2})
    with pytest.raises(ValueError, match="Esm2ForSequenceClassification"):
        export_model(sequence_model.model, tmp_path / "seq_export")
