"""Single-cell evaluation: masked-gene accuracy / perplexity under fixed masking, the cell-type probe, and
``bioscale eval`` on a Geneformer checkpoint with a labelled tokenized parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bioscale.data.singlecell import geneformer_tokenizer
from bioscale.eval.single_cell import cell_type_probe, masked_gene_metrics
from bioscale.models import build_config, build_model
from bioscale.pipeline.cli import eval_main

GENES = [f"ENSG{i:011d}" for i in range(1, 31)]  # ids 2..31


@pytest.fixture
def geneformer(tmp_path: Path):
    vocab = tmp_path / "genes.txt"
    vocab.write_text("\n".join(["<pad>", "<mask>", *GENES]) + "\n")
    tokenizer = geneformer_tokenizer(vocab)
    torch.manual_seed(0)
    config = build_config("geneformer", "debug", vocab_size=len(tokenizer), max_position_embeddings=32,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return build_model(config, task="masked_lm", device="cpu").eval(), tokenizer


def _cells(num: int = 24, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Two 'cell types' that express different halves of the genes."""
    rng = np.random.default_rng(seed)
    cells, labels = [], []
    for i in range(num):
        kind = i % 2
        genes = rng.permutation(np.arange(2, 17) if kind == 0 else np.arange(17, 32))[: rng.integers(8, 15)]
        cells.append(genes.astype(np.int64))
        labels.append("T cell" if kind == 0 else "B cell")
    return cells, labels


def test_masked_gene_metrics_are_fixed_by_the_seed_and_not_by_batching(geneformer) -> None:
    model, tokenizer = geneformer
    cells, _ = _cells()
    small = masked_gene_metrics(model, cells, tokenizer, seed=3, max_tokens_per_batch=40, progress=False)
    large = masked_gene_metrics(model, cells, tokenizer, seed=3, max_tokens_per_batch=4096, progress=False)
    assert small["num_masked_tokens"] == large["num_masked_tokens"] > 0
    assert small["nll_per_token"] == pytest.approx(large["nll_per_token"], rel=1e-5)
    other = masked_gene_metrics(model, cells, tokenizer, seed=4, progress=False)
    assert other["num_masked_tokens"] != large["num_masked_tokens"] or other["nll_per_token"] != large["nll_per_token"]
    # An untrained model is near uniform over the 32 tokens.
    assert large["perplexity"] == pytest.approx(math.exp(large["nll_per_token"]))
    assert 20 < large["perplexity"] < 50 and 0 <= large["accuracy"] <= large["top10_accuracy"] <= 1


def test_cell_type_probe_separates_separable_cells_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"] * 20
    centres = {"a": 0.0, "b": 3.0, "c": -3.0}
    separable = np.stack([rng.normal(centres[y], 0.3, size=8) for y in labels])
    noise = rng.normal(size=(60, 8))
    good = cell_type_probe(separable, labels, seed=1)
    bad = cell_type_probe(noise, labels, seed=1)
    assert good["accuracy"] == 1.0 and good["macro_f1"] == 1.0 and good["num_classes"] == 3
    assert bad["accuracy"] < 0.7 and good["majority_accuracy"] < 0.5
    assert good["num_train"] + good["num_test"] == 60
    with pytest.raises(ValueError, match="at least two labels"):
        cell_type_probe(separable, ["a"] * 60)


def test_bioscale_eval_scores_a_geneformer_with_a_cell_type_probe(geneformer, tmp_path: Path) -> None:
    model, tokenizer = geneformer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cells, labels = _cells()
    pq.write_table(pa.table({"cell_id": [f"c{i}" for i in range(len(cells))], "input_ids": [c.tolist() for c in cells],
                             "cell_type": labels}), tmp_path / "held_out.parquet")  # fmt: skip
    code = eval_main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "held_out.parquet"),
                      "--label-column", "cell_type", "--out", str(tmp_path / "eval"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["masked_gene"]) == {"trained", "random_init"} and metrics["num_cells"] == len(cells)
    probe = metrics["cell_type_probe"]["trained"]
    assert probe["num_classes"] == 2 and probe["accuracy"] >= 0.8  # the two types express disjoint genes
    assert "Cell-type probe" in (tmp_path / "eval" / "report.md").read_text()
    meta = json.loads((tmp_path / "eval" / "metadata.json").read_text())
    assert meta["modality"] == "cells" and meta["kind"] == "evaluation"
    assert eval_main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "held_out.parquet"),
                      "--label-column", "tissue", "--out", str(tmp_path / "eval2"), "--device", "cpu"]) == 2  # fmt: skip
