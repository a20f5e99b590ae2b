"""Cell embeddings from a trained Geneformer: ``bioscale embed MODEL cells.h5ad -o emb.parquet`` and
:func:`embed_cells`.

Input is an AnnData ``.h5ad`` (or ``AnnData``) of raw counts, rank-value encoded here with
:func:`bioscale.data.singlecell.tokenize_cells`, or an already tokenized parquet (``input_ids`` lists, optional
``cell_id``), read as it is. Each cell gives one vector from the base model's ``last_hidden_state``: the mean over its
genes (``<cls>`` / ``<eos>`` and padding excluded) or, for V2 models, the ``<cls>`` token. Embeddings are keyed by the
cell ids of the input (``obs_names`` or the named ``obs`` column; the parquet's ``cell_id`` column or
``<file stem>:<row>``) and written as parquet (:func:`bioscale.use.embed.write_embeddings`) or back into a copy of the
AnnData as ``.obsm[key]`` (:func:`write_embeddings_to_anndata`; cells that had no known gene get a row of NaN, and
are counted).

Ranking needs gene medians: ``gene_medians`` given (the ``*.gene_medians.json`` written beside the pretraining
corpus), else a ``gene_medians.json`` in the model directory, else they are computed from the input itself, with a
warning (a cell is then ranked against this dataset rather than the pretraining corpus). Cells longer than the
model's context keep their top-ranked genes (counted as truncated). Batches are packed where the flash varlen kernel
runs (CUDA, bf16) and padded, longest first, elsewhere; both give the numbers of each cell embedded alone (tested).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.singlecell import (
    CountMatrix,
    GeneVocabulary,
    h5ad_writable,
    import_anndata,
    read_tokenized_cells,
    tokenize_cells,
    vocabulary_of_tokenizer,
)
from bioscale.models import spec_for_any_config, spec_for_model
from bioscale.use.batching import collate_packed, collate_padded, plan_batches
from bioscale.use.embed import (
    Embeddings,
    base_model_of,
    default_device,
    default_dtype,
    default_max_tokens,
    resolve_batching,
)
from bioscale.use.loading import default_tokenizer, family_of_model, load_config, load_model

CELL_MATRIX_SUFFIXES = (".h5ad",)
DEFAULT_OBSM_KEY = "X_geneformer"


def is_cell_input(source: Any) -> bool:
    """Whether ``source`` is single-cell input: an ``AnnData``, a :class:`CountMatrix`, an ``.h5ad`` path, or a
    parquet whose ``input_ids`` column holds lists of token ids."""
    if isinstance(source, CountMatrix) or (type(source).__name__ == "AnnData" and hasattr(source, "obs")):
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.suffix.lower() in CELL_MATRIX_SUFFIXES:
        return True
    if path.suffix.lower() in (".parquet", ".pq") and path.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError):
            return False
        return "input_ids" in schema.names and pa.types.is_list(schema.field("input_ids").type)
    return False


def is_cell_model(model: PreTrainedModel | str | Path) -> bool:
    """Whether ``model`` (loaded, or a checkpoint path) reads cells (its family's modality is ``"cells"``)."""
    try:
        spec = spec_for_model(model) if isinstance(model, PreTrainedModel) else spec_for_any_config(load_config(model))
    except ValueError:
        return False
    return spec.modality == "cells"


def _medians_for(model_source: str | Path | None, given: Any) -> Any:
    if given is not None:
        return given
    if model_source is not None and Path(model_source).is_dir() and (Path(model_source) / "gene_medians.json").is_file():
        return Path(model_source) / "gene_medians.json"
    return None


def read_cells(
    source: Any,
    vocabulary: GeneVocabulary,
    *,
    gene_medians: Any = None,
    layer: str | None = None,
    gene_id_column: str | None = None,
    cell_id_column: str | None = None,
    input_ids_column: str = "input_ids",
    non_ensembl: str = "error",
) -> tuple[list[str], list[np.ndarray], int]:
    """``(cell ids, token ids with the convention's special tokens, cells left out)`` of a count matrix (ranked
    here) or a tokenized parquet (read as it is)."""
    tokenized_parquet = isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in (".parquet", ".pq")
    if tokenized_parquet and is_cell_input(source):
        ids, cells = [], []
        for cell_id, tokens in read_tokenized_cells(source, column=input_ids_column, id_column=cell_id_column,
                                                     vocab_size=len(vocabulary)):  # fmt: skip
            ids.append(cell_id)
            cells.append(tokens)
        if not cells:
            raise ValueError(f"no cells in {source}")
        return ids, cells, 0
    if gene_medians is None:
        warnings.warn(
            "no gene medians given (gene_medians=..., or gene_medians.json in the model directory): they are "
            "computed from this input, so cells are ranked against this dataset rather than the pretraining corpus",
            stacklevel=3,
        )
    tokenized = tokenize_cells(source, vocabulary=vocabulary, gene_medians=gene_medians, layer=layer,
                               gene_id_column=gene_id_column, cell_id_column=cell_id_column,
                               non_ensembl=non_ensembl)  # fmt: skip
    if not tokenized.cell_ids:
        raise ValueError(f"{tokenized.origin}: no cell has a gene of the vocabulary ({tokenized.stats.as_dict()})")
    return tokenized.cell_ids, tokenized.input_ids, tokenized.stats.cells_without_known_genes


@torch.inference_mode()
def embed_cells(
    model: PreTrainedModel | str | Path,
    cells: Any,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    pooling: str = "mean",
    gene_medians: str | os.PathLike[str] | Mapping[str, float] | None = None,
    layer: str | None = None,
    gene_id_column: str | None = None,
    cell_id_column: str | None = None,
    input_ids_column: str = "input_ids",
    non_ensembl: str = "error",
    max_length: int | None = None,
    max_tokens_per_batch: int | None = None,
    batching: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Embeddings:
    """One vector per cell (see the module docstring); ``Embeddings.lengths`` counts each cell's genes embedded.

    Args:
        model: a loaded Geneformer (any head: the base model is used) or a checkpoint directory / Hub id (bioscale,
            or a stock ``BertForMaskedLM`` such as the published Geneformer).
        cells: ``.h5ad`` / ``AnnData`` / :class:`~bioscale.data.singlecell.CountMatrix` of raw counts, or a
            tokenized ``.parquet``.
        pooling: ``"mean"`` over genes or ``"cls"`` (V2 models, whose cells start with ``<cls>``).
        gene_medians, layer, gene_id_column, cell_id_column, non_ensembl: how counts are read and ranked
            (:func:`~bioscale.data.singlecell.tokenize_cells`); ``cell_id_column`` / ``input_ids_column`` also name
            the columns of a tokenized parquet.
        max_length: context in tokens (default: the model's ``max_position_embeddings``).

    Raises:
        ValueError: bad input (naming the file and field), ``"cls"`` pooling without ``<cls>`` tokens, a model that
            is not a single-cell model.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model_source = model if isinstance(model, (str, Path)) else None
    if model_source is not None:
        loaded = load_model(model_source, task="base", device=device, dtype=dtype)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    else:
        model.to(device=device, dtype=dtype)
    spec = spec_for_model(model)
    if spec.modality != "cells":
        raise ValueError(f"{family_of_model(model)} is not a single-cell model: embed cells with a Geneformer")
    tokenizer = tokenizer or default_tokenizer(spec.name)
    vocabulary = vocabulary_of_tokenizer(tokenizer)
    if pooling == "cls" and vocabulary.cls_id is None:
        raise ValueError("pooling='cls' needs a V2 model whose cells start with <cls>; this vocabulary has none")
    ids, token_lists, num_left_out = read_cells(
        cells, vocabulary, gene_medians=_medians_for(model_source, gene_medians), layer=layer,
        gene_id_column=gene_id_column, cell_id_column=cell_id_column, input_ids_column=input_ids_column,
        non_ensembl=non_ensembl,
    )  # fmt: skip
    if len(set(ids)) != len(ids):
        duplicated = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"cell id {duplicated!r} appears more than once in the input: embeddings are keyed by cell id")
    result = embed_tokenized_cells(
        model, vocabulary, ids, token_lists, pooling=pooling, max_length=max_length,
        max_tokens_per_batch=max_tokens_per_batch, batching=batching, device=device, dtype=dtype, progress=progress,
    )  # fmt: skip
    result.num_left_out = num_left_out
    return result


def fit_cells_to_context(
    cells: Sequence[np.ndarray], vocabulary: GeneVocabulary, context: int
) -> tuple[list[np.ndarray], int]:
    """Cells of at most ``context`` tokens: a longer one keeps its special tokens and its top-ranked genes.
    Returns the cells and how many were truncated."""
    prefix, suffix = vocabulary.prefix, vocabulary.suffix
    out, truncated = [], 0
    for ids in cells:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) > context:
            genes = ids[len(prefix) : len(ids) - len(suffix)]
            ids = np.concatenate([prefix, genes[: context - len(prefix) - len(suffix)], suffix]).astype(np.int64)
            truncated += 1
        out.append(ids)
    return out, truncated


@torch.inference_mode()
def embed_tokenized_cells(
    model: PreTrainedModel,
    vocabulary: GeneVocabulary,
    ids: Sequence[str],
    token_lists: Sequence[np.ndarray],
    *,
    pooling: str = "mean",
    max_length: int | None = None,
    max_tokens_per_batch: int | None = None,
    batching: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Embeddings:
    """:func:`embed_cells` for cells already tokenized (``token_lists``, special tokens included) with a model
    already on its device: what evaluation's cell-type probe embeds with."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if pooling == "cls" and vocabulary.cls_id is None:
        raise ValueError("pooling='cls' needs a V2 model whose cells start with <cls>; this vocabulary has none")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    context = int(max_length or model.config.max_position_embeddings)
    token_lists, num_truncated = fit_cells_to_context(token_lists, vocabulary, context)
    if pooling == "cls" and any(len(t) == 0 or t[0] != vocabulary.cls_id for t in token_lists):
        raise ValueError("pooling='cls': some cells of the input do not start with <cls> (a V1-tokenized corpus?)")
    encoder = base_model_of(model).eval()

    batching = resolve_batching(batching, device, dtype)
    budget = max_tokens_per_batch or default_max_tokens(device)
    longest = max(len(t) for t in token_lists)
    if budget < longest:
        raise ValueError(f"max_tokens_per_batch={budget} is smaller than the longest cell ({longest} tokens)")
    special = torch.tensor(sorted(vocabulary.special_ids), dtype=torch.long)
    hidden_size = int(model.config.hidden_size)
    pooled = np.zeros((len(ids), hidden_size), dtype=np.float32)
    lengths = np.zeros(len(ids), dtype=np.int64)

    from tqdm.auto import tqdm

    batches = plan_batches([len(t) for t in token_lists], budget, padded=batching == "padded")
    bar = tqdm(total=len(ids), unit="cell", desc="embed", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for indices in batches:
        lists = [token_lists[i].tolist() for i in indices]
        if batching == "packed":
            batch = collate_packed(lists, device=device)
        else:
            batch = collate_padded(lists, pad_token_id=vocabulary.pad_id, device=device)
        hidden = batch.flatten(encoder(**batch.inputs).last_hidden_state).float()  # [T_real, D]
        flat_ids = torch.tensor([t for row in lists for t in row], dtype=torch.long)
        is_gene = (~torch.isin(flat_ids, special)).to(torch.float32)
        if pooling == "mean":
            weights = is_gene
        else:  # the first token of each cell: <cls>
            weights = torch.zeros(len(flat_ids))
            weights[torch.from_numpy(np.cumsum([0] + [len(row) for row in lists[:-1]]))] = 1.0
        example = batch.token_example.cpu()
        counts = torch.zeros(len(lists)).index_add_(0, example, weights)
        genes = torch.zeros(len(lists)).index_add_(0, example, is_gene)
        sums = torch.zeros(len(lists), hidden.shape[1], device=hidden.device)
        sums.index_add_(0, batch.token_example, hidden * weights.to(hidden.device)[:, None])
        vectors = (sums / counts.clamp(min=1).to(hidden.device)[:, None]).cpu().numpy()
        for row, index in enumerate(indices):
            pooled[index] = vectors[row]
            lengths[index] = int(genes[row])
        bar.update(len(indices))
    bar.close()
    if num_truncated:
        warnings.warn(
            f"{num_truncated} of {len(ids)} cells have more tokens than the model's context ({context}): their "
            "top-ranked genes were kept",
            stacklevel=2,
        )
    return Embeddings(ids=list(ids), pooled=pooled, lengths=lengths, per_residue=None, pooling=pooling,
                      num_truncated=num_truncated)  # fmt: skip


def write_embeddings_to_anndata(
    embeddings: Embeddings,
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    key: str = DEFAULT_OBSM_KEY,
    cell_id_column: str | None = None,
) -> Path:
    """A copy of the AnnData ``source`` with the embeddings in ``.obsm[key]`` (``[n_obs, hidden]`` float32), rows
    matched by cell id (``obs_names`` or ``obs[cell_id_column]``); cells without an embedding get NaN. ``output`` may
    be ``source`` itself (rewritten)."""
    anndata = import_anndata()
    source, output = Path(source), Path(output)
    if source.suffix.lower() != ".h5ad" or output.suffix.lower() != ".h5ad":
        raise ValueError(f"writing into .obsm needs an .h5ad input and output, got {source} -> {output}")
    adata = anndata.read_h5ad(source)
    if cell_id_column is not None and cell_id_column not in adata.obs.columns:
        raise ValueError(f"{source}: no cell-id column obs[{cell_id_column!r}]")
    cell_ids = [str(c) for c in (adata.obs[cell_id_column] if cell_id_column else adata.obs_names)]
    row_of = {cell_id: row for row, cell_id in enumerate(embeddings.ids)}
    unknown = [i for i in embeddings.ids if i not in set(cell_ids)]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} embedded cell ids are not in the AnnData (e.g. {unknown[0]!r})")
    matrix = np.full((len(cell_ids), embeddings.pooled.shape[1]), np.nan, dtype=np.float32)
    for row, cell_id in enumerate(cell_ids):
        if cell_id in row_of:
            matrix[row] = embeddings.pooled[row_of[cell_id]]
    adata.obsm[key] = matrix
    adata.uns[f"{key}_pooling"] = embeddings.pooling
    output.parent.mkdir(parents=True, exist_ok=True)
    h5ad_writable(adata).write_h5ad(output)
    return output


__all__ = [
    "DEFAULT_OBSM_KEY",
    "embed_cells",
    "embed_tokenized_cells",
    "fit_cells_to_context",
    "is_cell_input",
    "is_cell_model",
    "read_cells",
    "tokenize_cells",
    "write_embeddings_to_anndata",
]

