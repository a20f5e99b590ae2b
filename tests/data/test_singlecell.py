"""Single-cell data for Geneformer: the gene vocabulary and tokenizer (V1 / V2), rank-value encoding of counts with
known answers, bad input named by file and field, tokenized corpora (the shared Genecorpus sample end to end), the
loader's truncation and genes-only masking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bioscale.data import build_dataloader, get_tokenizer
from bioscale.data.collators import MLMCollator
from bioscale.data.singlecell import (
    CellPolicy,
    gene_token_ids,
    gene_vocabulary,
    geneformer_tokenizer,
    h5ad_writable,
    read_gene_medians,
    read_tokenized_cells,
    read_vocabulary_tokens,
    tokenize_cells,
    vocabulary_of_tokenizer,
)

GENES = [f"ENSG{i:011d}" for i in (1, 2, 3, 4, 5)]  # in the vocabulary: ids 2..6
A, B, C, D, F = GENES
UNKNOWN = "ENSG00000000099"  # an Ensembl id the vocabulary lacks
TOKEN = {gene: i + 2 for i, gene in enumerate(GENES)}


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "genes.txt"
    path.write_text("\n".join(["<pad>", "<mask>", *GENES]) + "\n")
    return path


# Columns A, B, C, D, UNKNOWN; cell1 has only the unknown gene. Medians chosen so that the ranking by normalised
# value differs from the ranking by raw counts.
COUNTS = np.array(
    [
        [4, 8, 1, 0, 7],  # total 20 -> A 2000/1, B 4000/4 = 1000, C 500/0.5 = 1000 (tie: lower id B first)
        [0, 0, 0, 0, 5],  # no known gene
        [1, 40, 2, 6, 0],  # total 49 -> A 204, B 2041, C 816, D 612
    ],
    dtype=np.float32,
)
COLUMNS = [A, B, C, D, UNKNOWN]
MEDIANS = {A: 1.0, B: 4.0, C: 0.5, D: 2.0, F: 3.0}


def _adata(counts: np.ndarray = COUNTS, **obs: list) -> object:
    anndata = pytest.importorskip("anndata")
    import pandas as pd
    import scipy.sparse as sp

    frame = pd.DataFrame({"cell_type": ["t", "n", "t"], **obs}, index=["c0", "c1", "c2"])
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=frame, var=pd.DataFrame(index=COLUMNS))


# ---- vocabulary and tokenizer ---------------------------------------------------------------------------------------


def test_vocabulary_conventions_and_special_tokens(vocab_file: Path) -> None:
    v1 = gene_vocabulary(vocab_file, "v1")
    assert (v1.pad_id, v1.mask_id, v1.cls_id, v1.eos_id) == (0, 1, None, None)
    assert v1.gene_ids.tolist() == [2, 3, 4, 5, 6] and v1.model_input_size == 2048
    v2 = gene_vocabulary(vocab_file, "v2")  # a V1 file: <cls>, <eos> appended, gene ids unchanged
    assert (v2.cls_id, v2.eos_id, v2.index[A]) == (7, 8, 2) and v2.model_input_size == 4096
    assert v2.gene_ids.tolist() == [2, 3, 4, 5, 6] and v2.special_ids == {0, 1, 7, 8}

    tok1, tok2 = geneformer_tokenizer(vocab_file, "v1"), geneformer_tokenizer(vocab_file, "v2")
    assert tok1(f"{B} {A}")["input_ids"] == [3, 2]
    assert tok2(f"{B} {A}")["input_ids"] == [7, 3, 2, 8]  # <cls> genes <eos>
    assert (tok1.pad_token_id, tok1.mask_token_id, tok2.cls_token_id) == (0, 1, 7)
    assert sorted(tok2.all_special_ids) == [0, 1, 7, 8]
    assert gene_token_ids(tok2) == [2, 3, 4, 5, 6]
    assert vocabulary_of_tokenizer(tok2).convention == "v2" and vocabulary_of_tokenizer(tok1).convention == "v1"


def test_saved_tokenizer_loads_with_auto_tokenizer(vocab_file: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    geneformer_tokenizer(vocab_file, "v2").save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(f"{C}")["input_ids"] == [7, 4, 8] and len(loaded) == 9


def test_vocabulary_files_that_do_not_read_are_refused_by_line(tmp_path: Path) -> None:
    dup = tmp_path / "dup.txt"
    dup.write_text(f"<pad>\n<mask>\n{A}\n{A}\n")
    with pytest.raises(ValueError, match=r"dup.txt: line 4: token .* already on line 3"):
        read_vocabulary_tokens(dup)
    blank = tmp_path / "blank.txt"
    blank.write_text(f"<pad>\n\n{A}\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_vocabulary_tokens(blank)
    pkl = tmp_path / "token_dictionary.pkl"
    pkl.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickled vocabularies are not read"):
        read_vocabulary_tokens(pkl)
    as_json = tmp_path / "v.json"
    as_json.write_text(json.dumps({"<pad>": 0, "<mask>": 1, A: 2}))
    assert read_vocabulary_tokens(as_json) == ["<pad>", "<mask>", A]
    as_json.write_text(json.dumps({"<pad>": 0, A: 2}))
    with pytest.raises(ValueError, match="ids must be exactly 0..1"):
        read_vocabulary_tokens(as_json)
    no_mask = tmp_path / "nomask.txt"
    no_mask.write_text(f"<pad>\n{A}\n")
    with pytest.raises(ValueError, match="no <mask> token"):
        gene_vocabulary(no_mask)


# ---- rank-value encoding with known answers -------------------------------------------------------------------------


def test_rank_order_normalisation_and_counts_with_given_medians(vocab_file: Path) -> None:
    result = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file), gene_medians=MEDIANS,
                            obs_columns=["cell_type"])  # fmt: skip
    # cell0: normalised A 2000 > B 1000 = C 1000 (tie: lower id first); raw counts would give B, A, C.
    # cell2: B 2041 > C 816 > D 612 > A 204; raw counts would give B, D, C, A.
    assert result.cell_ids == ["c0", "c2"]
    assert [ids.tolist() for ids in result.input_ids] == [
        [TOKEN[A], TOKEN[B], TOKEN[C]],
        [TOKEN[B], TOKEN[C], TOKEN[D], TOKEN[A]],
    ]
    assert result.obs == {"cell_type": ["t", "t"]}
    stats = result.stats
    assert (stats.num_cells, stats.num_cells_tokenized, stats.cells_without_known_genes) == (3, 2, 1)
    assert (stats.genes_in_input, stats.genes_not_in_vocab, stats.genes_ranked, stats.cells_truncated) == (5, 1, 4, 0)
    assert stats.counts_in_unknown_genes == 12.0 and stats.tokens_written == 7


def test_truncation_keeps_the_top_genes_in_both_conventions(vocab_file: Path) -> None:
    v1 = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file), gene_medians=MEDIANS, model_input_size=3)
    assert v1.input_ids[1].tolist() == [TOKEN[B], TOKEN[C], TOKEN[D]] and v1.stats.cells_truncated == 1
    v2 = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file, "v2"), gene_medians=MEDIANS,
                        model_input_size=4)  # fmt: skip
    assert [ids.tolist() for ids in v2.input_ids] == [[7, TOKEN[A], TOKEN[B], 8], [7, TOKEN[B], TOKEN[C], 8]]
    assert v2.stats.cells_truncated == 2 and v2.convention == "v2"


def test_computed_medians_are_the_nonzero_medians_of_normalised_counts(vocab_file: Path) -> None:
    result = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file))
    # count / total * 10,000 over the cells that express the gene, then the median (two cells: their mean)
    expected = {A: (2000 + 1e4 / 49) / 2, B: (4000 + 40e4 / 49) / 2, C: (500 + 2e4 / 49) / 2, D: 6e4 / 49}
    assert result.medians_source == "computed" and set(result.medians) == set(expected)  # F never expressed
    for gene, value in expected.items():
        assert result.medians[gene] == pytest.approx(value)
    # and the ranking uses them: cell0 A 2000/1102 = 1.81 > C 500/454 = 1.10 > B 4000/6082 = 0.66
    assert result.input_ids[0].tolist() == [TOKEN[A], TOKEN[C], TOKEN[B]]
    # totals come from obs["n_counts"] when the AnnData states them (Geneformer's convention)
    stated = tokenize_cells(_adata(n_counts=[100.0, 5.0, 100.0]), vocabulary=gene_vocabulary(vocab_file))
    assert stated.medians[A] == pytest.approx((400 + 100) / 2)


def test_written_tokens_medians_and_provenance_reproduce_the_ranking(vocab_file: Path, tmp_path: Path) -> None:
    first = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file), obs_columns=["cell_type"])
    parquet, medians, meta = first.write(tmp_path / "cells.parquet")
    assert medians.name == "cells.gene_medians.json" and meta.name == "cells.tokenization.json"
    info = json.loads(meta.read_text())
    assert info["convention"] == "v1" and info["stats"]["cells_without_known_genes"] == 1
    assert info["gene_medians"] == "cells.gene_medians.json" and len(info["vocabulary_sha256"]) == 64
    read = list(read_tokenized_cells(parquet))
    assert [r[0] for r in read] == ["c0", "c2"]
    assert [r[1].tolist() for r in read] == [ids.tolist() for ids in first.input_ids]
    # A second dataset ranked with the saved medians gets exactly the first one's tokens.
    again = tokenize_cells(_adata(), vocabulary=gene_vocabulary(vocab_file), gene_medians=medians)
    assert [ids.tolist() for ids in again.input_ids] == [ids.tolist() for ids in first.input_ids]
    assert read_gene_medians(medians)[0] == pytest.approx(first.medians)


def test_versions_duplicates_parquet_and_matrix_inputs_agree(vocab_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    import pyarrow as pa
    import pyarrow.parquet as pq

    import scipy.sparse as sp

    vocab = gene_vocabulary(vocab_file)
    reference = tokenize_cells(COUNTS, gene_ids=COLUMNS, vocabulary=vocab, gene_medians=MEDIANS)
    # A CSR matrix with integer counts ranks exactly as the AnnData of the known-answer test.
    csr = tokenize_cells(sp.csr_matrix(COUNTS.astype(np.int64)), gene_ids=COLUMNS, cell_ids=["c0", "c1", "c2"],
                         vocabulary=vocab, gene_medians=MEDIANS)  # fmt: skip
    assert csr.cell_ids == ["c0", "c2"] and csr.stats.cells_without_known_genes == 1
    assert [x.tolist() for x in csr.input_ids] == [[TOKEN[A], TOKEN[B], TOKEN[C]],
                                                   [TOKEN[B], TOKEN[C], TOKEN[D], TOKEN[A]]]  # fmt: skip
    table = {gene: pa.array(COUNTS[:, i]) for i, gene in enumerate(COLUMNS)}
    table["cell_id"] = pa.array(["c0", "c1", "c2"])
    pq.write_table(pa.table(table), tmp_path / "counts.parquet")
    wide = tokenize_cells(tmp_path / "counts.parquet", vocabulary=vocab, gene_medians=MEDIANS)
    assert wide.cell_ids == ["c0", "c2"]
    assert [x.tolist() for x in wide.input_ids] == [x.tolist() for x in reference.input_ids]
    # B split over two columns, one with a version suffix: read as one gene, its counts added.
    split = np.concatenate([COUNTS[:, :1], COUNTS[:, 1:2] - 3 * (COUNTS[:, 1:2] > 0), COUNTS[:, 2:],
                            3.0 * (COUNTS[:, 1:2] > 0)], axis=1)  # fmt: skip
    merged = tokenize_cells(split, gene_ids=[A, B + ".7", C, D, UNKNOWN, B], vocabulary=vocab, gene_medians=MEDIANS)
    assert [x.tolist() for x in merged.input_ids] == [x.tolist() for x in reference.input_ids]
    assert merged.stats.duplicate_gene_columns == 1 and merged.stats.gene_versions_stripped == 1


# ---- bad input: ValueError naming the file and the field ------------------------------------------------------------


def _write(adata: object, path: Path) -> Path:
    h5ad_writable(adata).write_h5ad(path)
    return path


def test_counts_that_are_not_raw_are_refused_naming_file_and_field(vocab_file: Path, tmp_path: Path) -> None:
    adata = _adata(COUNTS / 3.0)  # normalised: non-integer
    adata.layers["counts"] = adata.X.copy()
    adata.layers["counts"].data[:] = np.round(adata.layers["counts"].data * 3)
    path = _write(adata, tmp_path / "norm.h5ad")
    vocab = gene_vocabulary(vocab_file)
    with pytest.raises(ValueError, match=r"norm.h5ad: field X holds non-integer values"):
        tokenize_cells(path, vocabulary=vocab)
    assert tokenize_cells(path, vocabulary=vocab, layer="counts").stats.num_cells_tokenized == 2
    with pytest.raises(ValueError, match=r"norm.h5ad: no layer 'raw' \(field layers\['raw'\]\)"):
        tokenize_cells(path, vocabulary=vocab, layer="raw")
    negative = _write(_adata(COUNTS - 2), tmp_path / "neg.h5ad")
    with pytest.raises(ValueError, match=r"neg.h5ad: field X holds negative values"):
        tokenize_cells(negative, vocabulary=vocab)
    with pytest.raises(ValueError, match=r"norm.h5ad: no gene-id column var\['ensembl_id'\]"):
        tokenize_cells(path, vocabulary=vocab, layer="counts", gene_id_column="ensembl_id")


def test_gene_ids_that_are_not_ensembl_are_refused_or_counted(vocab_file: Path, tmp_path: Path) -> None:
    adata = _adata()
    adata.var_names = ["CD3E", B, C, D, UNKNOWN]
    path = _write(adata, tmp_path / "symbols.h5ad")
    vocab = gene_vocabulary(vocab_file)
    with pytest.raises(ValueError, match=r"symbols.h5ad: 1 of 5 gene ids are not Ensembl gene ids \(e.g. 'CD3E'\)"):
        tokenize_cells(path, vocabulary=vocab, gene_medians=MEDIANS)
    counted = tokenize_cells(path, vocabulary=vocab, gene_medians=MEDIANS, non_ensembl="count")
    assert counted.stats.genes_not_ensembl == 1 and counted.input_ids[0].tolist() == [TOKEN[B], TOKEN[C]]


def test_medians_that_do_not_match_are_refused_naming_the_file(vocab_file: Path, tmp_path: Path) -> None:
    vocab = gene_vocabulary(vocab_file)
    other = tmp_path / "mouse_medians.json"
    other.write_text(json.dumps({"ENSMUSG00000000001": 1.0}))
    with pytest.raises(ValueError, match=r"mouse_medians.json: none of its 1 genes is in the vocabulary"):
        tokenize_cells(_adata(), vocabulary=vocab, gene_medians=other)
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"gene\tmedian\n{A}\t-1\n")
    with pytest.raises(ValueError, match=rf"bad.tsv: the median of gene '{A}' is -1.0"):
        tokenize_cells(_adata(), vocabulary=vocab, gene_medians=bad)
    # A vocabulary gene without a median is never ranked, and counted.
    partial = tokenize_cells(_adata(), vocabulary=vocab, gene_medians={A: 1.0, B: 4.0})
    assert partial.stats.genes_without_median == 2 and partial.input_ids[0].tolist() == [TOKEN[A], TOKEN[B]]


def test_tokenized_cells_outside_the_vocabulary_are_refused_naming_row_and_column(vocab_file: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[2, 3], [4, 99]]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: row 1, column 'input_ids': token id 99 is outside"):
        list(read_tokenized_cells(tmp_path / "bad.parquet", vocab_size=7))
    pq.write_table(pa.table({"input_ids": ["ENSG"]}), tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"text.parquet: column 'input_ids' has type string"):
        list(read_tokenized_cells(tmp_path / "text.parquet"))
    policy = CellPolicy(gene_vocabulary(vocab_file, "v2"), max_genes=2)
    assert policy("c", np.array([7, 2, 3, 4, 8]))[0].tolist() == [2, 3]  # wrap stripped, top 2 kept
    assert (policy.stats.cropped, policy.stats.residues_read, policy.stats.residues_used) == (1, 3, 2)
    with pytest.raises(ValueError, match=r"cell 'x' in f.parquet: special token <mask> among its genes"):
        policy("x", np.array([2, 1, 3]), where=" in f.parquet")


# ---- the shared Genecorpus sample, end to end -----------------------------------------------------------------------


def test_shared_corpus_reads_end_to_end(shared_data: Path) -> None:
    import pyarrow.parquet as pq

    path = shared_data / "genecorpus_500_samples.parquet"
    if not path.is_file() or not (shared_data / "geneformer_gene_vocab.txt").is_file():
        pytest.skip("the Genecorpus sample or the gene vocabulary is not in the shared data folder")
    vocab = gene_vocabulary(shared_data / "geneformer_gene_vocab.txt")
    assert len(vocab) == 25426 and vocab.tokens[2] == "ENSG00000000003"
    cells = list(read_tokenized_cells(path, vocab_size=len(vocab)))
    lengths = pq.read_table(path, columns=["length"]).column("length").to_pylist()
    assert len(cells) == 500 and [len(ids) for _, ids in cells] == lengths
    assert cells[0][0] == "genecorpus_500_samples:0"
    every = np.concatenate([ids for _, ids in cells])
    assert every.min() >= 2 and every.max() < 25426  # genes only: V1 cells carry no special token


def test_loader_over_the_shared_corpus_v2_wraps_truncates_and_masks_genes_only(shared_data: Path) -> None:
    path = shared_data / "genecorpus_500_samples.parquet"
    if not path.is_file():
        pytest.skip("genecorpus_500_samples.parquet not in the shared data folder")
    tokenizer = get_tokenizer("geneformer_v2")
    cls_id, eos_id = tokenizer.cls_token_id, tokenizer.eos_token_id
    cfg = dict(source=str(path), tokenizer="geneformer_v2", max_seq_length=64, micro_batch_size=8, shuffle=False)
    loader = build_dataloader(cfg, tokenizer)
    batch = next(iter(loader))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (8, 64) and (ids[:, 0] == cls_id).all() and (ids[:, -1] == eos_id).all()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()  # special tokens are never selected
    first = next(read_tokenized_cells(path))[1]
    original = torch.where(labels[0] != -100, labels[0], ids[0])
    assert original[1:-1].tolist() == first[:62].tolist()  # the cell's top 62 genes, in rank order
    state = loader.state_dict()
    resumed = build_dataloader(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], next(iter(loader))["input_ids"])


def test_mlm_random_replacements_are_genes_and_specials_are_never_selected(vocab_file: Path) -> None:
    tokenizer = geneformer_tokenizer(vocab_file, "v2")
    collator = MLMCollator(tokenizer, 0.15, random_token_ids=gene_token_ids(tokenizer))
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[7], rng.integers(2, 7, 500), [8]]) for _ in range(40)]
    batch = collator(cells, rng=np.random.default_rng(1))
    ids, labels = batch["input_ids"], batch["labels"]
    selected = labels != -100
    assert abs(selected.float().mean().item() - 0.15 * 500 / 502) < 0.01
    assert not selected[:, 0].any() and not selected[:, -1].any()
    replaced = selected & (ids != 1) & (ids != labels)
    assert replaced.sum() > 100 and set(ids[replaced].unique().tolist()) <= {2, 3, 4, 5, 6}
    assert math.isclose((ids[selected] == 1).float().mean().item(), 0.8, abs_tol=0.03)
