"""Cell embeddings (``bioscale embed`` on an .h5ad or a tokenized parquet) and ``bioscale tokenize-cells``: one vector
per cell, keyed by the input's cell ids, equal to each cell embedded alone; parquet and AnnData ``.obsm`` outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bioscale.data.singlecell import gene_vocabulary, geneformer_tokenizer, h5ad_writable, tokenize_cells
from bioscale.models import build_config, build_model
from bioscale.use import embed, read_embeddings
from bioscale.use.cli import embed_main, tokenize_cells_main
from bioscale.use.embed_cells import embed_cells, is_cell_input

GENES = [f"ENSG{i:011d}" for i in range(1, 9)]  # ids 2..9
MEDIANS = {g: float(i + 1) for i, g in enumerate(GENES)}


def _vocab(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "genes.txt"
    path.write_text("\n".join(["<pad>", "<mask>", *GENES]) + "\n")
    return path


def _model_dir(tmp_path: Path, convention: str = "v1") -> Path:
    vocab = _vocab(tmp_path)
    tokenizer = geneformer_tokenizer(vocab, convention)
    torch.manual_seed(0)
    config = build_config("geneformer", "debug", vocab_size=len(tokenizer), max_position_embeddings=16,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = build_model(config, task="masked_lm", device="cpu")
    out = tmp_path / f"model_{convention}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _adata(tmp_path: Path) -> Path:
    anndata = pytest.importorskip("anndata")
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(5, len(GENES) + 1)).astype(np.float32)
    counts[2, :-1] = 0  # cell "c2": only the unknown gene -> left out, counted
    counts[2, -1] = 4
    var = pd.DataFrame(index=[*GENES, "ENSG00000000099"])
    obs = pd.DataFrame({"cell_type": ["a", "b", "a", "b", "a"]}, index=[f"c{i}" for i in range(5)])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    path = tmp_path / "cells.h5ad"
    h5ad_writable(adata).write_h5ad(path)
    return path


def _alone(model_dir: Path, cells: list[np.ndarray], specials: set[int], cls: bool = False) -> np.ndarray:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for ids in cells:
            hidden = base(input_ids=torch.as_tensor(ids)[None]).last_hidden_state[0]
            keep = torch.tensor([int(t) not in specials for t in ids])
            out.append((hidden[0] if cls else hidden[keep].mean(0)).numpy())
    return np.stack(out)


def test_h5ad_cells_embed_as_each_cell_alone_keyed_by_cell_id(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    h5ad = _adata(tmp_path)
    assert is_cell_input(h5ad)
    result = embed_cells(model_dir, h5ad, gene_medians=MEDIANS, max_length=6, progress=False)
    expected = tokenize_cells(h5ad, vocabulary=gene_vocabulary(_vocab(tmp_path)), gene_medians=MEDIANS)
    assert result.ids == ["c0", "c1", "c3", "c4"] == expected.cell_ids and result.num_left_out == 1
    cells = [ids[:6] for ids in expected.input_ids]  # max_length=6: the top 6 genes
    assert result.num_truncated == sum(len(ids) > 6 for ids in expected.input_ids) > 0
    np.testing.assert_allclose(result.pooled, _alone(model_dir, cells, {0, 1}), atol=1e-5)
    assert result.lengths.tolist() == [len(c) for c in cells]
    packed = embed_cells(model_dir, h5ad, gene_medians=MEDIANS, max_length=6, batching="packed", progress=False)
    np.testing.assert_allclose(packed.pooled, result.pooled, atol=1e-5)


def test_tokenized_parquet_v2_mean_and_cls_pooling(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "v2")
    h5ad = _adata(tmp_path)
    tokenized = tokenize_cells(h5ad, vocabulary=gene_vocabulary(_vocab(tmp_path), "v2"), gene_medians=MEDIANS,
                               model_input_size=8)  # fmt: skip
    parquet = tokenized.write(tmp_path / "cells.parquet")[0]
    assert is_cell_input(parquet)
    mean = embed(model_dir, parquet, progress=False)  # the protein entry point hands cells over
    cls = embed(model_dir, parquet, pooling="cls", progress=False)
    assert mean.ids == tokenized.cell_ids and mean.pooling == "mean" and cls.pooling == "cls"
    specials = {0, 1, 10, 11}  # <pad> <mask> <cls> <eos>
    np.testing.assert_allclose(mean.pooled, _alone(model_dir, tokenized.input_ids, specials), atol=1e-5)
    np.testing.assert_allclose(cls.pooled, _alone(model_dir, tokenized.input_ids, specials, cls=True), atol=1e-5)
    with pytest.raises(ValueError, match="pooling='cls' needs a V2 model"):
        embed_cells(_model_dir(tmp_path / "v1", "v1"), h5ad, gene_medians=MEDIANS, pooling="cls", progress=False)


def test_cli_writes_parquet_and_obsm_and_tokenizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = _model_dir(tmp_path)
    h5ad = _adata(tmp_path)
    medians = tmp_path / "medians.json"
    medians.write_text(json.dumps(MEDIANS))
    assert embed_main([str(model_dir), str(h5ad), "-o", str(tmp_path / "emb.parquet"), "--gene-medians",
                       str(medians), "--no-progress"]) == 0  # fmt: skip
    written = read_embeddings(tmp_path / "emb.parquet")
    assert written.ids == ["c0", "c1", "c3", "c4"] and written.pooled.shape == (4, 64)
    assert embed_main([str(model_dir), str(h5ad), "-o", str(tmp_path / "out.h5ad"), "--gene-medians", str(medians),
                       "--no-progress", "--obsm-key", "X_gf"]) == 0  # fmt: skip
    import anndata

    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_gf"].shape == (5, 64) and np.isnan(out.obsm["X_gf"][2]).all()  # c2: no known gene
    np.testing.assert_allclose(out.obsm["X_gf"][[0, 1, 3, 4]], written.pooled, atol=1e-6)
    assert "1 without a known gene left out" in capsys.readouterr().err
    # bioscale tokenize-cells: parquet + medians + provenance beside it; bad input is one error line, exit 2
    assert tokenize_cells_main([str(h5ad), "-o", str(tmp_path / "tok.parquet"), "--vocab", str(_vocab(tmp_path)),
                                "--keep-obs", "cell_type"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["cells_without_known_genes"] == 1 and len(report["written"]) == 3
    assert (tmp_path / "tok.gene_medians.json").is_file()
    assert tokenize_cells_main([str(h5ad), "-o", str(tmp_path / "x.parquet"), "--vocab", str(_vocab(tmp_path)),
                                "--layer", "raw"]) == 2  # fmt: skip
    assert "no layer 'raw'" in capsys.readouterr().err


def test_without_medians_the_input_computes_them_with_a_warning(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    h5ad = _adata(tmp_path)
    with pytest.warns(UserWarning, match="computed from this input"):
        result = embed_cells(model_dir, h5ad, progress=False)
    assert len(result) == 4
