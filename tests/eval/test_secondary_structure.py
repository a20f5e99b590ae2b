"""The secondary-structure probe: embeddings equal transformers', the probe fits what is linear, the split holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bioscale.eval import (
    fit_linear_probe,
    load_secondary_structure,
    residue_embeddings,
    secondary_structure_finetune,
    secondary_structure_probe,
)
from bioscale.models import to_hf

from .conftest import PROTEINS

PORTER6 = "porter6_secondary_structure_sample.parquet"


def _hf_hidden(hf_base, tokenizer, sequence: str) -> torch.Tensor:
    ids = torch.tensor(tokenizer(sequence)["input_ids"])[None]
    with torch.no_grad():
        return hf_base(input_ids=ids).last_hidden_state[0, 1:-1]


def test_residue_embeddings_match_transformers_and_chunk(esm) -> None:
    model, tokenizer = esm
    hf_base = to_hf(model).esm.eval()
    ours = residue_embeddings(model, PROTEINS, tokenizer, max_length=1024, max_tokens_per_batch=300, progress=False)
    for seq, emb in zip(PROTEINS, ours, strict=True):
        assert emb.shape == (len(seq), model.config.hidden_size)
        torch.testing.assert_close(emb, _hf_hidden(hf_base, tokenizer, seq), atol=1e-5, rtol=1e-5)
    # With a 20-token context, a long protein is embedded as consecutive 18-residue chunks, concatenated.
    chunked = residue_embeddings(model, PROTEINS[:1], tokenizer, max_length=20, progress=False)[0]
    seq = PROTEINS[0]
    expected = torch.cat([_hf_hidden(hf_base, tokenizer, seq[i : i + 18]) for i in range(0, len(seq), 18)])
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)


def test_probe_fits_linear_labels_and_not_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=generator)
    # Both label sets linear in x (a union of 8-class regions need not be linearly separable, so y3 is its own map).
    y8 = (x @ torch.randn(16, 8, generator=generator)).argmax(-1)
    y3 = (x @ torch.randn(16, 3, generator=generator)).argmax(-1)
    probe = fit_linear_probe(x[:2000], y8[:2000], y3[:2000], num_classes8=8, num_classes3=3, max_iter=200)
    pred8, pred3 = probe.predict(x[2000:])
    assert (pred8 == y8[2000:]).float().mean() > 0.9
    assert (pred3 == y3[2000:]).float().mean() > 0.9
    noise8 = torch.randint(0, 8, (3000,), generator=generator)
    noise3 = torch.randint(0, 3, (3000,), generator=generator)
    probe = fit_linear_probe(x[:2000], noise8[:2000], noise3[:2000], num_classes8=8, num_classes3=3, max_iter=50)
    pred8, _ = probe.predict(x[2000:])
    assert (pred8 == noise8[2000:]).float().mean() < 0.2  # chance is 1/8


def _write_porter(path: Path, rows: list[tuple[str, str]]) -> Path:
    seqs, labels = zip(*rows, strict=True)
    pq.write_table(pa.table({"Sequence": list(seqs), "Secondary_structure": list(labels)}), path)
    return path


def test_load_secondary_structure_skips_and_errors(tmp_path: Path) -> None:
    rows = [(p, ("HHHEEE~~TS" * 20)[: len(p)]) for p in PROTEINS]
    rows += [("MKV", "HH"), ("MKVL", "HHQQ"), ("MKVL", "--CC")]  # length mismatch, unknown label, coil aliases
    data = load_secondary_structure(_write_porter(tmp_path / "ok.parquet", rows), test_fraction=0.5, seed=1)
    kept = data.train + data.test
    assert data.num_skipped == 2 and len(kept) == 5
    alias = next(labels for seq, labels in kept if seq == "MKVL")
    assert alias.tolist() == [7, 7, 7, 7]  # '-' and 'C' are coil ('~', the 8th state)
    with pytest.raises(ValueError, match=r"no column 'Secondary_structure'"):
        pq.write_table(pa.table({"Sequence": ["MKV"]}), tmp_path / "bad.parquet")
        load_secondary_structure(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"no usable record"):
        load_secondary_structure(_write_porter(tmp_path / "none.parquet", [("MKV", "HH")]))
    with pytest.raises(ValueError, match=r"not found"):
        load_secondary_structure(tmp_path / "missing.parquet")


def test_porter6_split_keeps_identical_sequences_together(shared_data: Path) -> None:
    data = load_secondary_structure(shared_data / PORTER6, max_proteins=None, seed=0)
    train = {seq for seq, _ in data.train}
    test = {seq for seq, _ in data.test}
    assert train.isdisjoint(test)
    assert len(data.train) + len(data.test) == 2000  # the file's duplicates (1931 unique) are kept, on one side
    assert 0.1 < len(data.test) / 2000 < 0.3
    assert all(len(seq) == len(labels) for seq, labels in data.train + data.test)
    small = load_secondary_structure(shared_data / PORTER6, max_proteins=50, seed=0)
    larger = load_secondary_structure(shared_data / PORTER6, max_proteins=200, seed=0)
    small_seqs = {seq for seq, _ in small.train + small.test}
    assert small_seqs <= {seq for seq, _ in larger.train + larger.test}  # nested subsets


def test_probe_on_porter6(esm, shared_data: Path) -> None:
    model, tokenizer = esm
    data = load_secondary_structure(shared_data / PORTER6, max_proteins=30, seed=0)
    result = secondary_structure_probe({"random": model}, tokenizer, data, max_length=256, max_iter=30, progress=False)
    test_y = np.concatenate([labels for _, labels in data.test])
    majority8 = np.bincount(np.concatenate([labels for _, labels in data.train])).argmax()
    assert result["majority"]["q8"] == pytest.approx(float((test_y == majority8).mean()))
    assert result["num_test_residues"] == len(test_y)
    for name in ("random", "residue_identity"):
        assert 0.2 < result[name]["q8"] <= result[name]["q3"] < 1.0
    # Even random-weight context features carry more than the majority class.
    assert result["random"]["q3"] > result["majority"]["q3"]


@pytest.mark.parametrize("lora", [True, False])
def test_finetuned_head_on_porter6_learns_and_leaves_the_model_alone(esm, shared_data: Path, lora: bool) -> None:
    """The LoRA / full fine-tune option of the probe: Q3/Q8 on the same split, better than the untrained head."""
    if lora:
        pytest.importorskip("peft")
    model, tokenizer = esm
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = load_secondary_structure(shared_data / PORTER6, max_proteins=30, seed=0)
    result = secondary_structure_finetune({"random": model}, tokenizer, data, lora=lora, max_steps=15, lr=5e-3,
                                          max_length=256, device="cpu")  # fmt: skip
    assert result["method"] == ("lora" if lora else "full")
    assert result["num_train_proteins"] == len(data.train) and result["num_test_proteins"] == len(data.test)
    assert 0.2 < result["random"]["q8"] <= result["random"]["q3"] < 1.0
    assert result["random"]["loss"] < np.log(8)  # below the loss of a uniform guess over the 8 states
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        secondary_structure_finetune({"random": model}, tokenizer, data, max_steps=0)
