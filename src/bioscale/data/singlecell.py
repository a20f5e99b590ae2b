"""Single-cell data for Geneformer: the gene vocabulary, rank-value encoding of count matrices, and tokenized corpora.

Geneformer reads a cell as its genes ranked by expression (Theodoris et al., 2023). From raw counts, each gene's count
is divided by the cell's total counts (scaled to ``target_sum`` = 10,000) and then by that gene's *non-zero median*
over the pretraining corpus, which puts ubiquitous housekeeping genes below genes that distinguish cell states; the
genes expressed in the cell are sorted by that value, descending (ties: lower token id first, so the order never
depends on the input's column order), and the cell's tokens are their ids, truncated to the model's input size. Two
conventions:

- ``"v1"`` (Genecorpus-30M): ``<pad>`` = 0, ``<mask>`` = 1, then the Ensembl ids of the vocabulary file; a cell is its
  top 2,048 genes, no special tokens.
- ``"v2"`` (Genecorpus-104M): ``<cls> genes <eos>``, 4,096 tokens in all. A vocabulary file that lists ``<cls>`` and
  ``<eos>`` keeps their ids; a V1 file gets them appended after its last gene (ids ``V`` and ``V + 1``), so token ids of
  corpora tokenized with that file stay valid.

What this module gives:

- :class:`GeneVocabulary` / :func:`gene_vocabulary` (a ``.txt`` with one token per line, id = line number, or a
  ``.json`` ``{token: id}``; pickles are never read) and :func:`geneformer_tokenizer` (a ``PreTrainedTokenizerFast``
  over it, saved with the model: ``tokenizer("ENSG… ENSG…")`` gives the ids). Without a path the vocabulary is
  ``$BIOSCALE_GENE_VOCAB`` or ``geneformer_gene_vocab.txt`` in the shared data folder (``$BIOSCALE_SHARED_DATA``,
  ``../shared/data``).
- :func:`read_count_matrix` (AnnData ``.h5ad`` through the optional ``anndata`` package, lazily imported; a parquet
  table with one column per Ensembl id; an in-memory ``AnnData``, scipy sparse or numpy matrix with gene ids) and
  :func:`tokenize_cells`, which ranks every cell and returns :class:`TokenizedCells` with :class:`TokenizationStats`:
  cells with no known gene, genes not in the vocabulary (never dropped without a count), cells truncated, and more.
  Gene medians are given (a ``.json`` / ``.tsv`` / ``.csv`` file, or a mapping) or computed from the input and saved
  beside the tokenized data (:meth:`TokenizedCells.write`), so a run is reproducible.
- Pre-tokenized corpora (``genecorpus_500_samples.parquet``: ``input_ids``, ``length``) are read directly:
  :class:`TokenizedCellSource` (one unit per parquet row group, for the training loader), :func:`read_tokenized_cells`,
  and the loader's :class:`CellPolicy` (truncation to the context, counted) and :class:`GeneTokenEncoder` (the
  convention's special tokens).

Bad input raises ``ValueError`` naming the file and the field: negative or non-integer counts where raw counts are
required, gene ids that are not Ensembl ids, an ``.h5ad`` without the named layer or gene-id column, a vocabulary or
medians file that does not match, token ids outside the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bioscale.data.policy import PolicyStats
from bioscale.data.sources import SequenceSource, Unit

CONVENTIONS = ("v1", "v2")
GENE_VOCAB_FILENAME = "geneformer_gene_vocab.txt"
GENE_VOCAB_ENV = "BIOSCALE_GENE_VOCAB"
SHARED_DATA_ENV = "BIOSCALE_SHARED_DATA"
PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
# The model's input size per convention, special tokens included (Geneformer V1: 2,048 genes; V2: 4,096 tokens).
MODEL_INPUT_SIZE = {"v1": 2048, "v2": 4096}
# Geneformer's normalisation target: counts per 10,000 (only the medians depend on it, never a cell's ranking).
TARGET_SUM = 10_000.0
# ENSG00000000003, ENSMUSG00000000001, ENSGR0000214717 (GENCODE's PAR_Y copies); an optional ".15" version.
ENSEMBL_GENE_ID = re.compile(r"^(ENS[A-Z]*G[A-Z]?\d{6,})(\.\d+)?$")
_PARQUET_BATCH_ROWS = 4096


# ---- shared data ----------------------------------------------------------------------------------------------------


def shared_data_folders() -> list[Path]:
    """Where the shared data folder may be: ``$BIOSCALE_SHARED_DATA``, ``./../shared/data``, ``<checkout>/../shared``."""
    folders = [Path(os.environ[SHARED_DATA_ENV])] if os.environ.get(SHARED_DATA_ENV) else []
    folders.append(Path.cwd().parent / "shared" / "data")
    folders.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")  # <repo>/../shared/data
    return folders


def resolve_shared_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if it exists; for a recipe's ``../shared/data/<name>`` that does not resolve from here, the file of
    that name in :func:`shared_data_folders`; else ``path`` unchanged (the caller's error then names it)."""
    path = Path(path)
    if path.exists() or "shared" not in path.parts:
        return path
    for folder in shared_data_folders():
        if (folder / path.name).exists():
            return folder / path.name
    return path


# ---- the gene vocabulary --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneVocabulary:
    """Geneformer's tokens in id order and the convention that reads them.

    Attributes:
        tokens: token of each id (``<pad>``, ``<mask>``, Ensembl ids, and in V2 ``<cls>`` / ``<eos>``).
        convention: ``"v1"`` or ``"v2"``.
        source: the file it came from (for messages and provenance).
    """

    tokens: tuple[str, ...]
    convention: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention={self.convention!r}: expected one of {CONVENTIONS}")
        for token in (PAD, MASK) + ((CLS, EOS) if self.convention == "v2" else ()):
            if token not in self.index:
                raise ValueError(f"gene vocabulary {self.source or '(given)'}: no {token} token")

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Token → id."""
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    @property
    def mask_id(self) -> int:
        return self.index[MASK]

    @property
    def cls_id(self) -> int | None:
        return self.index[CLS] if self.convention == "v2" else None

    @property
    def eos_id(self) -> int | None:
        return self.index[EOS] if self.convention == "v2" else None

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of every ``<…>`` token (never a gene: never masked, never a random replacement)."""
        return frozenset(i for t, i in self.index.items() if t.startswith("<") and t.endswith(">"))

    @functools.cached_property
    def gene_ids(self) -> np.ndarray:
        """Ids of the genes (every token that is not ``<…>``), ascending: what MLM replacements draw from."""
        return np.asarray(sorted(set(range(len(self.tokens))) - self.special_ids), dtype=np.int64)

    @property
    def prefix(self) -> list[int]:
        """Tokens before a cell's genes (V2: ``[<cls>]``)."""
        return [self.index[CLS]] if self.convention == "v2" else []

    @property
    def suffix(self) -> list[int]:
        """Tokens after a cell's genes (V2: ``[<eos>]``)."""
        return [self.index[EOS]] if self.convention == "v2" else []

    @property
    def model_input_size(self) -> int:
        return MODEL_INPUT_SIZE[self.convention]


def find_gene_vocabulary(path: str | os.PathLike[str] | None = None) -> Path:
    """The vocabulary file: ``path``, else ``$BIOSCALE_GENE_VOCAB``, else ``geneformer_gene_vocab.txt`` in the shared
    data folder; ``ValueError`` saying where it looked."""
    if path is None and os.environ.get(GENE_VOCAB_ENV):
        path = os.environ[GENE_VOCAB_ENV]
    if path is not None:
        resolved = resolve_shared_path(path)
        if not resolved.is_file():
            raise ValueError(f"gene vocabulary file {str(path)!r} does not exist")
        return resolved
    for folder in shared_data_folders():
        if (folder / GENE_VOCAB_FILENAME).is_file():
            return folder / GENE_VOCAB_FILENAME
    looked = ", ".join(str(f) for f in shared_data_folders())
    raise ValueError(
        f"no Geneformer gene vocabulary: pass one (a .txt with one token per line, or a .json {{token: id}}), set "
        f"${GENE_VOCAB_ENV}, or put {GENE_VOCAB_FILENAME} in the shared data folder (looked in {looked})"
    )


def read_vocabulary_tokens(path: str | os.PathLike[str]) -> list[str]:
    """Tokens in id order from a ``.txt`` (one per line) or ``.json`` (``{token: id}``, ids 0…n-1) file.

    Raises ``ValueError`` naming the file and the line or token: blank lines, duplicates, ids that are not 0…n-1.
    Pickled dictionaries (Geneformer's ``token_dictionary.pkl``) are refused: unpickling runs code.
    """
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        raise ValueError(
            f"{path}: pickled vocabularies are not read (unpickling can run code); convert it once to JSON: "
            "json.dump(pickle.load(f), out)"
        )
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not a JSON {{token: id}} vocabulary ({err})") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise ValueError(f"{path}: expected a JSON object mapping each token to an integer id")
        ids = sorted(mapping.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"{path}: token ids must be exactly 0..{len(ids) - 1} (each once)")
        tokens = [""] * len(ids)
        for token, i in mapping.items():
            tokens[i] = token
        return tokens
    tokens = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        token = line.strip()
        if not token:
            raise ValueError(f"{path}: line {line_no} is empty (one token per line, id = line number - 1)")
        if token in seen:
            raise ValueError(f"{path}: line {line_no}: token {token!r} already on line {seen[token]}")
        seen[token] = line_no
        tokens.append(token)
    if not tokens:
        raise ValueError(f"{path}: the vocabulary file is empty")
    return tokens


@functools.lru_cache(maxsize=8)
def _cached_vocabulary(path: str, mtime_ns: int, convention: str) -> GeneVocabulary:
    del mtime_ns  # part of the cache key only: an edited file is read again
    tokens = read_vocabulary_tokens(path)
    if convention == "v2":
        tokens += [t for t in (CLS, EOS) if t not in tokens]  # appended: the file's gene ids keep their meaning
    return GeneVocabulary(tuple(tokens), convention, source=path)


def gene_vocabulary(path: str | os.PathLike[str] | None = None, convention: str = "v1") -> GeneVocabulary:
    """The :class:`GeneVocabulary` of ``path`` (default: :func:`find_gene_vocabulary`) in ``convention``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    resolved = find_gene_vocabulary(path)
    return _cached_vocabulary(str(resolved), resolved.stat().st_mtime_ns, convention)


def geneformer_tokenizer(vocab: str | os.PathLike[str] | GeneVocabulary | None = None, convention: str = "v1") -> Any:
    """Geneformer's tokenizer, a ``PreTrainedTokenizerFast`` over the gene vocabulary (saved with a model).

    Words are Ensembl ids separated by whitespace; V1 adds no special tokens, V2 wraps a cell as ``<cls> … <eos>``;
    ``model_input_size`` is ``model_max_length`` (2,048 / 4,096). It encodes an already *ranked* gene list: ranking
    counts is :func:`tokenize_cells`'s job.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    from bioscale.data.tokenizers import _PortableTokenizerFast

    vocabulary = vocab if isinstance(vocab, GeneVocabulary) else gene_vocabulary(vocab, convention)
    tok = Tokenizer(models.WordLevel(dict(vocabulary.index), unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [PAD, MASK] + ([CLS, EOS] if vocabulary.convention == "v2" else [])
    if vocabulary.convention == "v2":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {EOS}",
            pair=f"{CLS} $A {EOS} $B:1 {EOS}:1",
            special_tokens=[(CLS, vocabulary.index[CLS]), (EOS, vocabulary.index[EOS])],
        )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    extra = {"cls_token": CLS, "eos_token": EOS} if vocabulary.convention == "v2" else {}
    return _PortableTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        mask_token=MASK,
        model_max_length=vocabulary.model_input_size,
        **extra,
    )


def vocabulary_of_tokenizer(tokenizer: Any) -> GeneVocabulary:
    """The :class:`GeneVocabulary` a (saved) Geneformer tokenizer encodes: V2 when it has ``<cls>`` and ``<eos>``."""
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(tokens):
            raise ValueError(f"tokenizer ids are not 0..{len(vocab) - 1}: a Geneformer tokenizer has dense ids")
        tokens[i] = token
    convention = "v2" if CLS in vocab and EOS in vocab else "v1"
    return GeneVocabulary(tuple(tokens), convention, source=getattr(tokenizer, "name_or_path", "") or "tokenizer")


def gene_token_ids(tokenizer: Any) -> list[int]:
    """Ids the masked-LM 10% random replacements draw from: the genes only (no ``<pad>``/``<mask>``/``<cls>``/…)."""
    return vocabulary_of_tokenizer(tokenizer).gene_ids.tolist()


# ---- count matrices -------------------------------------------------------------------------------------------------


@dataclass
class CountMatrix:
    """A cells × genes count matrix with its ids, and where it came from (for messages).

    Attributes:
        counts: ``scipy.sparse.csr_matrix`` ``[cells, genes]`` (float64 or integer).
        gene_ids: one Ensembl id per column (as read: may carry versions).
        cell_ids: one id per row.
        obs: per-cell metadata columns the caller asked to keep (``cell_type`` …), lists aligned with the rows.
        total_counts: per-cell totals when the input states them (AnnData ``obs['n_counts']``), else ``None``.
        origin: the file (or ``"<AnnData>"`` …); field: the matrix read (``"X"``, ``"layers['counts']"`` …).
    """

    counts: Any
    gene_ids: list[str]
    cell_ids: list[str]
    obs: dict[str, list[Any]] = field(default_factory=dict)
    total_counts: np.ndarray | None = None
    origin: str = "<matrix>"
    field: str = "X"


def _scipy_sparse() -> Any:
    try:
        import scipy.sparse as sp
    except ImportError as err:
        raise ImportError("single-cell tokenization needs scipy: pip install 'bioscale[singlecell]'") from err
    return sp


def import_anndata() -> Any:
    try:
        import anndata
    except ImportError as err:
        raise ImportError("reading .h5ad files needs the anndata package: pip install 'bioscale[singlecell]'") from err
    return anndata


def h5ad_writable(adata: Any) -> Any:
    """``adata`` with its ``obs`` / ``var`` strings as Python objects, so ``write_h5ad`` can store them.

    pandas 3 stores strings as Arrow arrays, which the anndata releases that accept pandas 3 (0.12.6; later ones
    require pandas < 3) cannot write (``IORegistryError`` for ``ArrowStringArray``): index, string columns and
    categorical categories are converted to ``object``. Values do not change; the AnnData is modified in place.
    """
    import pandas as pd

    def fix(frame: Any) -> Any:
        frame = frame.copy()
        frame.index = pd.Index([str(i) for i in frame.index], dtype=object, name=frame.index.name)
        for column in frame.columns:
            dtype = frame[column].dtype
            if isinstance(dtype, pd.CategoricalDtype):
                categories = pd.Index(list(dtype.categories), dtype=object)
                frame[column] = pd.Categorical(frame[column].astype(object), categories=categories,
                                               ordered=dtype.ordered)  # fmt: skip
            elif pd.api.types.is_string_dtype(dtype):
                frame[column] = frame[column].astype(object)
        return frame

    adata.obs = fix(adata.obs)
    adata.var = fix(adata.var)
    return adata


def _is_anndata(obj: Any) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obs") and hasattr(obj, "var")


def _from_anndata(
    adata: Any,
    origin: str,
    *,
    layer: str | None,
    gene_id_column: str | None,
    cell_id_column: str | None,
    obs_columns: Sequence[str],
    total_counts_column: str | None,
) -> CountMatrix:
    sp = _scipy_sparse()
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"{origin}: no layer {layer!r} (field layers['{layer}']); layers: {list(adata.layers)}")
        matrix, where = adata.layers[layer], f"layers['{layer}']"
    else:
        matrix, where = adata.X, "X"
    if matrix is None:
        raise ValueError(f"{origin}: field {where} is empty (no count matrix); name a layer")
    if gene_id_column is not None:
        if gene_id_column not in adata.var.columns:
            raise ValueError(
                f"{origin}: no gene-id column var[{gene_id_column!r}]; var columns: {list(adata.var.columns)}"
            )
        gene_ids = [str(g) for g in adata.var[gene_id_column].tolist()]
    else:
        gene_ids = [str(g) for g in adata.var_names]
    if cell_id_column is not None:
        if cell_id_column not in adata.obs.columns:
            raise ValueError(f"{origin}: no cell-id column obs[{cell_id_column!r}]; obs columns: {list(adata.obs.columns)}")
        cell_ids = [str(c) for c in adata.obs[cell_id_column].tolist()]
    else:
        cell_ids = [str(c) for c in adata.obs_names]
    obs = {}
    for name in obs_columns:
        if name not in adata.obs.columns:
            raise ValueError(f"{origin}: no obs column obs[{name!r}]; obs columns: {list(adata.obs.columns)}")
        obs[name] = adata.obs[name].tolist()
    totals = None
    if total_counts_column is not None:
        if total_counts_column in adata.obs.columns:
            totals = np.asarray(adata.obs[total_counts_column], dtype=np.float64)
        elif total_counts_column != "n_counts":  # the default name is optional; a named column is not
            raise ValueError(f"{origin}: no total-counts column obs[{total_counts_column!r}]")
    counts = matrix if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
    return CountMatrix(sp.csr_matrix(counts), gene_ids, cell_ids, obs, totals, origin, where)


def _from_parquet(path: Path, *, cell_id_column: str | None, obs_columns: Sequence[str]) -> CountMatrix:
    """A wide parquet table: one numeric column per gene (named by its Ensembl id), plus id / metadata columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sp = _scipy_sparse()
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    names = table.column_names
    if cell_id_column is None:
        cell_id_column = next((c for c in ("cell_id", "barcode", "obs_names") if c in names), None)
    elif cell_id_column not in names:
        raise ValueError(f"{path}: no cell-id column {cell_id_column!r}; columns: {names[:10]}…")
    for name in obs_columns:
        if name not in names:
            raise ValueError(f"{path}: no metadata column {name!r}")
    skip = {cell_id_column, *obs_columns} - {None}
    gene_columns = [c for c in names if c not in skip]
    non_numeric = [c for c in gene_columns if not (pa.types.is_integer(table.schema.field(c).type)
                                                   or pa.types.is_floating(table.schema.field(c).type))]  # fmt: skip
    if non_numeric:
        raise ValueError(
            f"{path}: columns {non_numeric[:5]} are not numeric counts; name id / metadata columns with "
            "cell_id_column / obs_columns (every other column must be a gene)"
        )
    if not gene_columns:
        raise ValueError(f"{path}: no gene columns")
    blocks = [sp.csr_matrix(np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in gene_columns], axis=1))]
    cell_ids = (
        [str(c) for c in table.column(cell_id_column).to_pylist()]
        if cell_id_column
        else [f"{path.stem}:{i}" for i in range(table.num_rows)]
    )
    obs = {name: table.column(name).to_pylist() for name in obs_columns}
    return CountMatrix(sp.vstack(blocks).tocsr(), gene_columns, cell_ids, obs, None, str(path), "gene columns")


def read_count_matrix(
    source: Any,
    *,
    gene_ids: Sequence[str] | None = None,
    cell_ids: Sequence[str] | None = None,
    layer: str | None = None,
    gene_id_column: str | None = None,
    cell_id_column: str | None = None,
    obs_columns: Sequence[str] = (),
    total_counts_column: str | None = "n_counts",
) -> CountMatrix:
    """A :class:`CountMatrix` from an ``.h5ad`` path, an ``AnnData``, a wide parquet table or a matrix.

    Args:
        source: ``.h5ad`` file (read with ``anndata``), ``.parquet`` file (a numeric column per gene), an
            ``AnnData``, or a scipy sparse / numpy matrix ``[cells, genes]`` with ``gene_ids`` (and ``cell_ids``).
        layer: AnnData layer holding the raw counts (default ``X``).
        gene_id_column: AnnData ``var`` column with the Ensembl ids (default: ``var_names``; Geneformer's own
            datasets use ``var['ensembl_id']``).
        cell_id_column: ``obs`` (or parquet) column with the cell ids (default: ``obs_names`` / ``cell_id``).
        obs_columns: per-cell metadata to keep beside the tokens (``cell_type`` for a probe).
        total_counts_column: ``obs`` column with each cell's total counts (Geneformer's ``n_counts``; used when
            present); otherwise the totals are the row sums of the matrix.
    """
    if isinstance(source, CountMatrix):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"count matrix {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".h5ad":
            anndata = import_anndata()
            try:
                adata = anndata.read_h5ad(path)
            except (OSError, KeyError, ValueError) as err:
                raise ValueError(f"{path}: not a readable .h5ad file ({err})") from err
            return _from_anndata(adata, str(path), layer=layer, gene_id_column=gene_id_column,
                                 cell_id_column=cell_id_column, obs_columns=obs_columns,
                                 total_counts_column=total_counts_column)  # fmt: skip
        if suffix in (".parquet", ".pq"):
            if layer is not None or gene_id_column is not None:
                raise ValueError(f"{path}: layer / gene_id_column apply to .h5ad input; parquet genes are columns")
            return _from_parquet(path, cell_id_column=cell_id_column, obs_columns=obs_columns)
        raise ValueError(f"{path}: expected an .h5ad or a .parquet count matrix")
    if _is_anndata(source):
        return _from_anndata(source, "<AnnData>", layer=layer, gene_id_column=gene_id_column,
                             cell_id_column=cell_id_column, obs_columns=obs_columns,
                             total_counts_column=total_counts_column)  # fmt: skip
    sp = _scipy_sparse()
    matrix = sp.csr_matrix(source)
    if gene_ids is None:
        raise ValueError("a count matrix given as an array needs gene_ids (one Ensembl id per column)")
    if len(gene_ids) != matrix.shape[1]:
        raise ValueError(f"gene_ids has {len(gene_ids)} entries but the matrix has {matrix.shape[1]} columns")
    ids = [str(c) for c in cell_ids] if cell_ids is not None else [f"cell{i}" for i in range(matrix.shape[0])]
    if len(ids) != matrix.shape[0]:
        raise ValueError(f"cell_ids has {len(ids)} entries but the matrix has {matrix.shape[0]} rows")
    return CountMatrix(matrix, [str(g) for g in gene_ids], ids, origin="<matrix>", field="counts")


# ---- rank-value encoding --------------------------------------------------------------------------------------------


@dataclass
class TokenizationStats:
    """What :func:`tokenize_cells` did, all plain counts (written to ``<out>.tokenization.json``).

    ``genes_*`` count matrix columns (genes of the input), ``cells_*`` count rows.
    """

    num_cells: int = 0  # rows of the input
    num_cells_tokenized: int = 0  # cells written (at least one known, expressed gene)
    cells_without_known_genes: int = 0  # no expressed gene is in the vocabulary (with a median): not written
    cells_truncated: int = 0  # more expressed known genes than the model input holds: the top-ranked kept
    genes_in_input: int = 0  # matrix columns
    genes_not_in_vocab: int = 0  # columns whose Ensembl id the vocabulary lacks: never ranked
    genes_without_median: int = 0  # in the vocabulary but without a (positive) median: never ranked
    genes_not_ensembl: int = 0  # ids that are not Ensembl ids (counted only with non_ensembl="count")
    gene_versions_stripped: int = 0  # "ENSG….15" read as "ENSG…"
    duplicate_gene_columns: int = 0  # columns of an id seen before: their counts are added to the first
    genes_ranked: int = 0  # columns that take part in the ranking
    tokens_written: int = 0  # tokens of all cells, special tokens included
    counts_in_unknown_genes: float = 0.0  # counts of the columns never ranked (they still enter each cell's total)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class TokenizedCells:
    """Rank-value-encoded cells, the medians that ranked them and the counts of what happened.

    Attributes:
        cell_ids: one id per tokenized cell (cells without a known gene are left out and counted).
        input_ids: one int32 array per cell, special tokens included (V2 ``<cls> … <eos>``).
        obs: the kept metadata columns, aligned with ``cell_ids``.
        medians: Ensembl id → non-zero median used for ranking (computed or given).
        medians_source: the medians file, or ``"computed"``.
        stats: :class:`TokenizationStats`.
        convention / vocabulary_source: how the tokens read.
    """

    cell_ids: list[str]
    input_ids: list[np.ndarray]
    obs: dict[str, list[Any]]
    medians: dict[str, float]
    medians_source: str
    stats: TokenizationStats
    convention: str
    vocabulary_source: str
    origin: str = ""

    def __len__(self) -> int:
        return len(self.cell_ids)

    def write(self, path: str | os.PathLike[str]) -> list[Path]:
        """``path`` (``.parquet``: ``cell_id``, ``input_ids`` list<int32>, ``length``, the kept ``obs`` columns),
        ``<stem>.gene_medians.json`` beside it (so the same ranking can be reproduced: pass it as ``gene_medians``)
        and ``<stem>.tokenization.json`` (convention, vocabulary and medians files with their sha256, the counts)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"tokenized output {str(path)!r} must end in .parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.zeros(len(self.input_ids) + 1, dtype=np.int32)
        np.cumsum([len(ids) for ids in self.input_ids], out=offsets[1:])
        flat = np.concatenate(self.input_ids) if self.input_ids else np.zeros(0, np.int32)
        columns: dict[str, Any] = {
            "cell_id": pa.array(self.cell_ids, pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32))),
            "length": pa.array(np.diff(offsets).astype(np.int64)),
        }
        for name, values in self.obs.items():
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        pq.write_table(pa.table(columns), path)
        medians_path = path.with_name(path.stem + ".gene_medians.json")
        medians_path.write_text(json.dumps(dict(sorted(self.medians.items())), indent=0) + "\n")
        meta_path = path.with_name(path.stem + ".tokenization.json")
        meta = {
            "convention": self.convention,
            "vocabulary": self.vocabulary_source,
            "vocabulary_sha256": _sha256(self.vocabulary_source),
            "gene_medians": medians_path.name if self.medians_source == "computed" else self.medians_source,
            "gene_medians_computed_from": self.origin if self.medians_source == "computed" else None,
            "gene_medians_sha256": _sha256(medians_path),
            "target_sum": TARGET_SUM,
            "stats": self.stats.as_dict(),
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return [path, medians_path, meta_path]


def _sha256(path: str | os.PathLike[str]) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def read_gene_medians(source: str | os.PathLike[str] | Mapping[str, float]) -> tuple[dict[str, float], str]:
    """Ensembl id → non-zero median from a mapping or a file: ``.json`` (``{id: median}``), ``.tsv`` / ``.csv`` (two
    columns, an optional header) or ``.parquet`` (columns ``gene_id``/``ensembl_id`` and ``median``).

    Raises ``ValueError`` naming the file and gene for a non-numeric, non-positive or non-finite median.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "the given gene medians"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"gene medians file {where!r} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".pkl", ".pickle"):
            raise ValueError(f"{path}: pickled medians are not read (unpickling can run code); convert them to JSON")
        if suffix == ".json":
            try:
                raw = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"{path}: not a JSON {{gene: median}} file ({err})") from err
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a JSON object mapping Ensembl ids to medians")
        elif suffix in (".tsv", ".csv", ".txt"):
            delimiter = "," if suffix == ".csv" else "\t"
            raw = {}
            for line_no, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split(delimiter)
                if len(parts) != 2:
                    raise ValueError(f"{path}: line {line_no}: expected 'gene{delimiter}median'")
                gene, value = parts[0].strip(), parts[1].strip()
                if line_no == 1 and not ENSEMBL_GENE_ID.match(gene):
                    continue  # a header
                raw[gene] = value
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            gene_col = next((c for c in ("gene_id", "ensembl_id", "gene") if c in table.column_names), None)
            if gene_col is None or "median" not in table.column_names:
                raise ValueError(f"{path}: expected columns gene_id (or ensembl_id) and median")
            raw = dict(zip(table.column(gene_col).to_pylist(), table.column("median").to_pylist()))
        else:
            raise ValueError(f"{path}: gene medians must be .json, .tsv, .csv or .parquet")
    medians: dict[str, float] = {}
    for gene, value in raw.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the median of gene {gene!r} is not a number ({value!r})") from None
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"{where}: the median of gene {gene!r} is {number}: medians must be positive and finite")
        medians[str(gene)] = number
    if not medians:
        raise ValueError(f"{where}: no gene medians")
    return medians, where


def _check_counts(counts: Any, origin: str, where: str) -> None:
    data = counts.data
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{origin}: field {where} holds NaN or infinite values; raw counts are required")
    if data.min() < 0:
        raise ValueError(f"{origin}: field {where} holds negative values (min {data.min():g}); raw counts are required")
    if np.issubdtype(data.dtype, np.floating) and not np.all(data == np.round(data)):
        example = data[data != np.round(data)][0]
        raise ValueError(
            f"{origin}: field {where} holds non-integer values (e.g. {example:g}): Geneformer ranks raw counts, "
            "not normalised or log-transformed data; name the layer with the raw counts (layer='counts'), or pass "
            "require_raw_counts=False if these are counts scaled on purpose"
        )


def _canonical_gene_ids(gene_ids: Sequence[str], origin: str, non_ensembl: str, stats: TokenizationStats) -> list[str | None]:
    """Ensembl ids without versions; ``None`` for an id that is not Ensembl (``non_ensembl="count"``)."""
    out: list[str | None] = []
    bad = []
    for gene in gene_ids:
        match = ENSEMBL_GENE_ID.match(gene.strip())
        if match is None:
            bad.append(gene)
            out.append(None)
            continue
        if match.group(2):
            stats.gene_versions_stripped += 1
        out.append(match.group(1))
    if bad:
        if non_ensembl == "error":
            raise ValueError(
                f"{origin}: {len(bad)} of {len(gene_ids)} gene ids are not Ensembl gene ids (e.g. "
                f"{', '.join(map(repr, bad[:3]))}); Geneformer's vocabulary is Ensembl ids: name the var column that "
                "holds them (gene_id_column='ensembl_id'), or pass non_ensembl='count' to count and skip these"
            )
        stats.genes_not_ensembl += len(bad)
    return out


def compute_gene_medians(
    counts: Any, gene_ids: Sequence[str | None], totals: np.ndarray, *, target_sum: float = TARGET_SUM
) -> dict[str, float]:
    """Each gene's median of ``count / total * target_sum`` over the cells that express it (Geneformer's non-zero
    median), exactly, in memory. Genes never expressed get no median."""
    sp = _scipy_sparse()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    normalised = sp.csc_matrix(sp.diags(scale) @ counts.astype(np.float64))
    normalised.eliminate_zeros()
    medians: dict[str, float] = {}
    for column, gene in enumerate(gene_ids):
        if gene is None:
            continue
        values = normalised.data[normalised.indptr[column] : normalised.indptr[column + 1]]
        if values.size:
            medians[gene] = float(np.median(values))
    return medians


def tokenize_cells(
    source: Any,
    *,
    vocabulary: GeneVocabulary | str | os.PathLike[str] | None = None,
    convention: str = "v1",
    gene_medians: str | os.PathLike[str] | Mapping[str, float] | None = None,
    model_input_size: int | None = None,
    layer: str | None = None,
    gene_id_column: str | None = None,
    cell_id_column: str | None = None,
    obs_columns: Sequence[str] = (),
    total_counts_column: str | None = "n_counts",
    gene_ids: Sequence[str] | None = None,
    cell_ids: Sequence[str] | None = None,
    non_ensembl: str = "error",
    require_raw_counts: bool = True,
    target_sum: float = TARGET_SUM,
) -> TokenizedCells:
    """Rank-value encode every cell of a count matrix (see the module docstring).

    Args:
        source: see :func:`read_count_matrix` (``.h5ad``, parquet, ``AnnData``, a matrix with ``gene_ids``).
        vocabulary: a :class:`GeneVocabulary` or its file (default: :func:`find_gene_vocabulary`), read in
            ``convention``.
        gene_medians: medians file or mapping; ``None`` computes them from ``source`` (save them with
            :meth:`TokenizedCells.write`, and pass that file when tokenizing more data for the same model).
        model_input_size: tokens per cell, special tokens included (default: 2,048 for V1, 4,096 for V2).
        non_ensembl: ``"error"`` (default) for gene ids that are not Ensembl ids, or ``"count"`` them and skip.
        require_raw_counts: refuse negative and non-integer values (Geneformer ranks raw counts).
        target_sum: the normalisation target of the medians (10,000, Geneformer's).

    Raises:
        ValueError: naming the file and field (see the module docstring); ``ImportError`` without ``anndata`` for
            an ``.h5ad``.
    """
    if non_ensembl not in ("error", "count"):
        raise ValueError(f"non_ensembl={non_ensembl!r}: expected 'error' or 'count'")
    vocab = vocabulary if isinstance(vocabulary, GeneVocabulary) else gene_vocabulary(vocabulary, convention)
    size = model_input_size or vocab.model_input_size
    num_special = len(vocab.prefix) + len(vocab.suffix)
    if size <= num_special:
        raise ValueError(f"model_input_size={size} leaves no room for genes next to {num_special} special tokens")
    matrix = read_count_matrix(source, gene_ids=gene_ids, cell_ids=cell_ids, layer=layer,
                               gene_id_column=gene_id_column, cell_id_column=cell_id_column,
                               obs_columns=obs_columns, total_counts_column=total_counts_column)  # fmt: skip
    sp = _scipy_sparse()
    counts = sp.csr_matrix(matrix.counts)
    if require_raw_counts:
        _check_counts(counts, matrix.origin, matrix.field)
    stats = TokenizationStats(num_cells=counts.shape[0], genes_in_input=counts.shape[1])
    totals = matrix.total_counts if matrix.total_counts is not None else np.asarray(counts.sum(axis=1)).ravel()
    totals = np.asarray(totals, dtype=np.float64)
    if totals.shape != (counts.shape[0],):
        raise ValueError(f"{matrix.origin}: total counts has shape {totals.shape}, expected ({counts.shape[0]},)")

    genes = _canonical_gene_ids(matrix.gene_ids, matrix.origin, non_ensembl, stats)
    # Duplicate ids (two columns of one gene): their counts are added into the first column of the id.
    first_column: dict[str, int] = {}
    keep = np.ones(len(genes), dtype=bool)
    remap = np.arange(len(genes))
    for column, gene in enumerate(genes):
        if gene is None:
            continue
        if gene in first_column:
            keep[column] = False
            remap[column] = first_column[gene]
            stats.duplicate_gene_columns += 1
        else:
            first_column[gene] = column
    if stats.duplicate_gene_columns:
        merge = sp.csr_matrix((np.ones(len(genes)), (np.arange(len(genes)), remap)), shape=(len(genes), len(genes)))
        counts = sp.csr_matrix(counts @ merge)
        genes = [g if keep[c] else None for c, g in enumerate(genes)]

    if gene_medians is None:
        medians = compute_gene_medians(counts, genes, totals, target_sum=target_sum)
        medians = {g: m for g, m in medians.items() if g in vocab.index}
        medians_source = "computed"
    else:
        medians, medians_source = read_gene_medians(gene_medians)
        known = [g for g in medians if g in vocab.index]
        if not known:
            raise ValueError(
                f"{medians_source}: none of its {len(medians)} genes is in the vocabulary {vocab.source} (e.g. "
                f"{next(iter(medians))!r}): the medians file does not match the vocabulary"
            )
    # Column -> token id and median, for the columns that take part in the ranking.
    token_of_column = np.full(len(genes), -1, dtype=np.int64)
    median_of_column = np.ones(len(genes), dtype=np.float64)
    for column, gene in enumerate(genes):
        if gene is None:
            continue
        if gene not in vocab.index:
            stats.genes_not_in_vocab += 1
        elif gene not in medians:
            stats.genes_without_median += 1
        else:
            token_of_column[column] = vocab.index[gene]
            median_of_column[column] = medians[gene]
    ranked = token_of_column >= 0
    stats.genes_ranked = int(ranked.sum())
    stats.counts_in_unknown_genes = float(counts[:, ~ranked].sum()) if (~ranked).any() else 0.0

    max_genes = size - num_special
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out_ids, out_cells = [], []
    kept_rows = []
    prefix = np.asarray(vocab.prefix, dtype=np.int32)
    suffix = np.asarray(vocab.suffix, dtype=np.int32)
    for row in range(counts.shape[0]):
        start, end = counts.indptr[row], counts.indptr[row + 1]
        columns = counts.indices[start:end]
        values = counts.data[start:end].astype(np.float64)
        usable = ranked[columns] & (values > 0)
        columns, values = columns[usable], values[usable]
        if columns.size == 0:
            stats.cells_without_known_genes += 1
            continue
        normalised = values * scale[row] / median_of_column[columns]
        tokens = token_of_column[columns]
        order = np.lexsort((tokens, -normalised))  # by value, descending; ties: lower token id first
        if order.size > max_genes:
            order = order[:max_genes]
            stats.cells_truncated += 1
        out_ids.append(np.concatenate([prefix, tokens[order].astype(np.int32), suffix]))
        out_cells.append(matrix.cell_ids[row])
        kept_rows.append(row)
    stats.num_cells_tokenized = len(out_ids)
    stats.tokens_written = int(sum(len(ids) for ids in out_ids))
    obs = {name: [values[r] for r in kept_rows] for name, values in matrix.obs.items()}
    return TokenizedCells(
        cell_ids=out_cells,
        input_ids=out_ids,
        obs=obs,
        medians=medians,
        medians_source=medians_source,
        stats=stats,
        convention=vocab.convention,
        vocabulary_source=vocab.source,
        origin=matrix.origin,
    )


# ---- pre-tokenized corpora ------------------------------------------------------------------------------------------

TOKENIZED_SUFFIXES = (".parquet", ".pq")


def _tokenized_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise ValueError(f"{path}: directory contains no *.parquet files of tokenized cells")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"tokenized cells not found: {path}")
    if path.suffix.lower() not in TOKENIZED_SUFFIXES:
        raise ValueError(
            f"{path}: tokenized cells are read from parquet (column input_ids); tokenize a count matrix first "
            "(bioscale.data.singlecell.tokenize_cells, or `bioscale tokenize-cells`)"
        )
    return [path]


def _open_tokenized(path: Path, column: str, id_column: str | None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    schema = pf.schema_arrow
    for key, name in (("column", column), ("id_column", id_column)):
        if name is not None and name not in schema.names:
            raise ValueError(f"{path}: no column {name!r} (columns: {schema.names}); set {key}")
    kind = schema.field(column).type
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)):
        raise ValueError(f"{path}: column {column!r} has type {kind}, expected lists of integer token ids")
    return pf


class TokenizedCellSource(SequenceSource):
    """Tokenized cells in a parquet file or a directory of shards: one unit per row group, records ``(cell id,
    int64 token ids)``. Ids come from ``id_column`` (``cell_id`` when present) or are ``<file stem>:<row>``; token ids
    are checked against ``vocab_size`` (``ValueError`` naming the file, the row and the column)."""

    def __init__(
        self, path: str | os.PathLike[str], *, column: str = "input_ids", id_column: str | None = None,
        vocab_size: int | None = None,
    ) -> None:  # fmt: skip
        import pyarrow.parquet as pq

        path = resolve_shared_path(path)
        self.files = _tokenized_files(path)
        self.name = str(path)
        self.column = column
        self.vocab_size = vocab_size
        if id_column is None:
            names = pq.read_schema(self.files[0]).names
            id_column = "cell_id" if "cell_id" in names else None
        self.id_column = id_column
        self._units: list[Unit] = []
        for f in self.files:
            meta = _open_tokenized(f, column, id_column).metadata
            row = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                self._units.append(Unit(path=str(f), index=rg, num_records=n, first_row=row))
                row += n

    def units(self) -> list[Unit]:
        return list(self._units)

    def read_unit(self, unit: Unit, start: int = 0, step: int = 1) -> Iterator[tuple[str, np.ndarray]]:
        pf = _open_tokenized(Path(unit.path), self.column, self.id_column)
        columns = [self.column] + ([self.id_column] if self.id_column else [])
        stem = Path(unit.path).stem
        row = unit.first_row
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[unit.index], columns=columns):
            lists = batch.column(0)
            offsets = lists.offsets.to_numpy()
            values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
            ids = [str(x) for x in batch.column(1).to_pylist()] if self.id_column else None
            for i in range(batch.num_rows):
                local = row + i - unit.first_row  # record index within the unit
                if local < start or (local - start) % step:
                    continue
                tokens = values[offsets[i] : offsets[i + 1]]
                if tokens.size and self.vocab_size is not None and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                    bad = int(tokens[(tokens < 0) | (tokens >= self.vocab_size)][0])
                    raise ValueError(
                        f"{unit.path}: row {row + i}, column {self.column!r}: token id {bad} is outside the "
                        f"vocabulary [0, {self.vocab_size}): the corpus was tokenized with another vocabulary"
                    )
                yield (ids[i] if ids is not None else f"{stem}:{row + i}"), tokens
            row += batch.num_rows


def read_tokenized_cells(
    path: str | os.PathLike[str], *, column: str = "input_ids", id_column: str | None = None,
    vocab_size: int | None = None,
) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    """Every ``(cell id, token ids)`` of a tokenized corpus (parquet file or shard directory), in order."""
    source = TokenizedCellSource(path, column=column, id_column=id_column, vocab_size=vocab_size)
    for unit in source.units():
        yield from source.read_unit(unit)


class CellPolicy:
    """What happens to each tokenized cell before batching, counted in ``self.stats`` (a :class:`PolicyStats`, the
    loader's counts: a record is a cell, a residue a gene).

    A leading ``<cls>`` and a trailing ``<eos>`` are taken off (the encoder puts the convention's back); an empty cell
    is skipped (``skipped_empty``); a cell with more genes than ``max_genes`` keeps its top-ranked genes, the head of
    the list (``cropped``: Geneformer truncates, never crops at random); any other special token inside a cell, or a
    token id outside the vocabulary, raises ``ValueError`` naming the cell and file.
    """

    def __init__(self, vocabulary: GeneVocabulary, *, max_genes: int | None = None) -> None:
        if max_genes is not None and max_genes < 1:
            raise ValueError(f"max_genes must be >= 1, got {max_genes}")
        self.max_genes = max_genes
        self.vocab_size = len(vocabulary)
        self.wrap = {i for i in (vocabulary.index.get(CLS), vocabulary.index.get(EOS)) if i is not None}
        self.cls_id, self.eos_id = vocabulary.index.get(CLS), vocabulary.index.get(EOS)
        self.special = np.asarray(sorted(vocabulary.special_ids), dtype=np.int64)
        self.tokens = vocabulary.tokens
        self.stats = PolicyStats()

    def __call__(
        self, record_id: str, token_ids: Any, rng: np.random.Generator | None = None, *, where: str = ""
    ) -> list[np.ndarray]:
        del rng  # truncation is deterministic
        stats = self.stats
        stats.records_read += 1
        ids = np.asarray(token_ids if token_ids is not None else [], dtype=np.int64)
        if ids.size and self.cls_id is not None and ids[0] == self.cls_id:
            ids = ids[1:]
        if ids.size and self.eos_id is not None and ids[-1] == self.eos_id:
            ids = ids[:-1]
        if ids.size == 0:
            stats.skipped_empty += 1
            return []
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"cell {record_id!r}{where}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        inside = np.isin(ids, self.special)
        if inside.any():
            token = self.tokens[int(ids[inside][0])]
            raise ValueError(
                f"cell {record_id!r}{where}: special token {token} among its genes (a cell is a list of genes, with "
                "at most a leading <cls> and a trailing <eos>)"
            )
        stats.residues_read += int(ids.size)
        if self.max_genes is not None and ids.size > self.max_genes:
            ids = ids[: self.max_genes]
            stats.cropped += 1
        stats.records_used += 1
        stats.sequences += 1
        stats.residues_used += int(ids.size)
        return [ids]


class GeneTokenEncoder:
    """Puts the convention's special tokens around a cell's genes (V1: none; V2: ``<cls> … <eos>``). Holds ids only,
    so it pickles into data-loader workers; the loader's counterpart of ``CharTokenEncoder``."""

    def __init__(self, vocabulary: GeneVocabulary) -> None:
        self.vocabulary = vocabulary
        self.prefix = np.asarray(vocabulary.prefix, dtype=np.int64)
        self.suffix = np.asarray(vocabulary.suffix, dtype=np.int64)
        self.num_special = len(self.prefix) + len(self.suffix)

    def encode(self, genes: np.ndarray) -> np.ndarray:
        return np.concatenate([self.prefix, np.asarray(genes, dtype=np.int64), self.suffix])


def open_cell_source(spec: str | os.PathLike[str], *, column: str, id_column: str | None, vocab_size: int) -> TokenizedCellSource:
    """The training loader's source for ``data.source`` under a gene tokenizer: tokenized parquet cells.

    ``column`` is ``data.sequence_column`` (its default ``"sequence"`` means ``input_ids`` here). A count matrix
    (``.h5ad``) is refused with how to tokenize it: ranking needs corpus medians, computed once and saved.
    """
    path = resolve_shared_path(spec)
    if path.suffix.lower() == ".h5ad":
        raise ValueError(
            f"{path}: training reads tokenized cells; rank-value encode the count matrix once (computing and saving "
            "the gene medians): `bioscale tokenize-cells {path} -o cells.parquet`, then data.source=cells.parquet"
        )
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {spec}")
    column = "input_ids" if column == "sequence" else column
    return TokenizedCellSource(path, column=column, id_column=id_column, vocab_size=vocab_size)


__all__ = [
    "CONVENTIONS",
    "CellPolicy",
    "CountMatrix",
    "GeneTokenEncoder",
    "GeneVocabulary",
    "TokenizationStats",
    "TokenizedCellSource",
    "TokenizedCells",
    "compute_gene_medians",
    "find_gene_vocabulary",
    "gene_token_ids",
    "gene_vocabulary",
    "geneformer_tokenizer",
    "h5ad_writable",
    "import_anndata",
    "open_cell_source",
    "read_count_matrix",
    "read_gene_medians",
    "read_tokenized_cells",
    "read_vocabulary_tokens",
    "resolve_shared_path",
    "tokenize_cells",
    "vocabulary_of_tokenizer",
]
