"""GPU: evaluation on CUDA equals the CPU reference (fp32) or stays close (bf16 autocast); the tiny pipeline runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bioscale.eval import masked_lm_perplexity, residue_embeddings

from .conftest import PROTEINS

pytestmark = pytest.mark.gpu


def test_perplexity_on_gpu_matches_cpu(esm) -> None:
    model, tokenizer = esm
    gpu_model = copy.deepcopy(model).to("cuda")
    cpu = masked_lm_perplexity(model, PROTEINS * 4, tokenizer, max_length=64, device="cpu", progress=False)
    gpu = masked_lm_perplexity(gpu_model, PROTEINS * 4, tokenizer, max_length=64, device="cuda", progress=False)
    bf16 = masked_lm_perplexity(gpu_model, PROTEINS * 4, tokenizer, max_length=64, device="cuda",
                                autocast_dtype=torch.bfloat16, progress=False)
    assert gpu["num_masked_tokens"] == cpu["num_masked_tokens"]  # the masking is device independent
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4)
    assert bf16["perplexity"] == pytest.approx(cpu["perplexity"], rel=2e-2)


def test_embeddings_on_gpu_match_cpu(esm) -> None:
    model, tokenizer = esm
    gpu_model = copy.deepcopy(model).to("cuda")
    cpu = residue_embeddings(model, PROTEINS, tokenizer, device="cpu", progress=False)
    gpu = residue_embeddings(gpu_model, PROTEINS, tokenizer, device="cuda", progress=False)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_tiny_pipeline_on_gpu(tmp_path: Path) -> None:
    from bioscale.pipeline import read_artifact, run_pipeline

    artifacts = run_pipeline(
        out=tmp_path / "p", device="cuda", train_overrides=["num_train_steps=5"],
        curate_kwargs={"max_records": 200},
        eval_kwargs={"max_sequences": 8, "ss_max_proteins": 24, "probe_max_iter": 10},
    )
    model = read_artifact(artifacts["model"].path, "model")
    assert model.metrics["device"].startswith("cuda") and model.metrics["final_step"] == 5
    evaluation = read_artifact(artifacts["eval"].path, "evaluation")
    assert evaluation.config["device"].startswith("cuda")
    assert evaluation.metrics["language_model"]["trained"]["perplexity"] > 1.0
