"""``bench_train.py``'s Geneformer rows on CPU: the stock row (``transformers.BertForMaskedLM`` through ``to_hf``, SDPA,
padded) and bioscale padded / packed / packed+FP8 train the same masked Genecorpus cells (GPU numbers come from a GPU
run); the GPU cases' configs hold the corpus's token ids and have no attention dropout."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


@pytest.fixture
def genecorpus(shared_data: Path) -> Path:
    for name in ("genecorpus_500_samples.parquet", "geneformer_gene_vocab.txt"):
        if not (shared_data / name).is_file():
            pytest.skip(f"{name} not in the shared data folder")
    return shared_data


@pytest.mark.slow  # ~20-40 s on 2 shared CPU cores
def test_quick_geneformer_rows_run_stock_bert_and_bioscale_on_the_same_batches(
    bench, genecorpus: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torchao.float8")
    code = bench.main(
        ["--quick", "--device", "cpu", "--models", "geneformer_debug", "--variants",
         "hf_padded,padded,packed,packed_fp8", "--steps", "2", "--warmup", "1", "--data-dir", str(genecorpus),
         "--out-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    (report,) = tmp_path.glob("*.md")
    text = report.read_text()
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert "transformers BertForMaskedLM, attn=sdpa" in rows[0]["notes"]
    first = {row["variant"]: row["first_loss"] for row in rows}
    # Same init (converted with to_hf), same cells and masks, no dropout in debug: the rows agree to fp32 rounding.
    # At init the logits are near-uniform over the 25,426 genes: every first loss is ~ln(25,426).
    assert first["hf_padded"] == pytest.approx(math.log(25426), abs=0.1)
    assert first["padded"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed_fp8[tensorwise]"] == pytest.approx(first["hf_padded"], rel=2e-2)  # emulated FP8 GEMMs
    for variant in ("hf_padded", "padded", "packed", "packed_fp8[tensorwise]"):
        assert f"| geneformer_debug | {variant} |" in text


def test_geneformer_gpu_cases_hold_the_corpus_and_train_packed(bench, genecorpus: Path) -> None:
    for key, vocab, positions in (("geneformer_10M", 25426, 2048), ("geneformer_104M", 25428, 4096),
                                  ("geneformer_316M", 25428, 4096)):  # fmt: skip
        case = bench.parse_model(key)
        assert bench.missing_baseline(case, bench.parse_variant("hf_padded", bench.parse_args([]))) is None
        config = bench._model_config(case, "varlen")
        # The packed kernel has no attention dropout (a config with 0.02 raises on the first packed step).
        assert config.attention_probs_dropout_prob == 0.0 and config.hidden_dropout_prob == 0.02, key
        assert (config.vocab_size, config.max_position_embeddings) == (vocab, positions), key
        assert case.max_length <= positions
    v2 = bench.parse_model("geneformer_104M")
    examples = bench.load_cell_examples(v2.max_length, genecorpus, seed=0, limit=3, tokenizer_kind=v2.tokenizer)
    config = bench._model_config(v2, "varlen")
    assert len(examples) == 3
    for example in examples:
        ids = example.input_ids
        # <cls> + the cell's top 2,046 genes + <eos>; masks never land on the two special tokens.
        assert len(ids) == v2.max_length and ids[0] == config.cls_token_id and ids[-1] == config.eos_token_id
        assert ids.max() < config.vocab_size
        assert example.labels[0] == example.labels[-1] == -100
        assert 0.1 < np.mean(example.labels != -100) < 0.2
