"""bioscale's data pipeline: tokenizers, sequence sources, the input policy, collators, packing, resumable loading.

The public API (kept stable; code outside the repository calls it) is re-exported here; docs/data.md describes the
input policy and the batch format. This package knows no model: batches are dicts of tensors that any
``transformers``-convention model accepts as ``model(**batch)``.
"""

from bioscale.data.collators import CLMCollator, MLMCollator
from bioscale.data.config import DataConfig
from bioscale.data.demo import demo_corpus
from bioscale.data.loader import BioscaleDataLoader, SequenceDataset, build_dataloader, get_policy_stats
from bioscale.data.packing import (
    IGNORE_INDEX,
    PAD_TOKEN_ID,
    collate_packed,
    count_tokens,
    buffered_pack,
    greedy_pack,
    pack_sequences,
    pad_sequences,
    rows_and_rest,
    uniform_pack_as_padded,
)
from bioscale.data.policy import InputPolicy, PolicyStats
from bioscale.data.sources import (
    FastaSource,
    HFSource,
    ParquetSource,
    SequenceSource,
    iter_sequences,
    open_source,
    read_fasta,
    read_parquet,
)
from bioscale.data.tokenizers import (
    CharTokenEncoder,
    canonical_token_ids,
    get_tokenizer,
    nucleotide_ascii_tokenizer,
    nucleotide_tokenizer,
    protein_tokenizer,
    record_affixes,
    tokenizer_kind,
)

__all__ = [
    "IGNORE_INDEX",
    "PAD_TOKEN_ID",
    "BioscaleDataLoader",
    "CLMCollator",
    "CharTokenEncoder",
    "DataConfig",
    "FastaSource",
    "HFSource",
    "InputPolicy",
    "MLMCollator",
    "ParquetSource",
    "PolicyStats",
    "SequenceDataset",
    "SequenceSource",
    "build_dataloader",
    "canonical_token_ids",
    "collate_packed",
    "count_tokens",
    "demo_corpus",
    "get_policy_stats",
    "get_tokenizer",
    "buffered_pack",
    "greedy_pack",
    "iter_sequences",
    "nucleotide_ascii_tokenizer",
    "nucleotide_tokenizer",
    "open_source",
    "pack_sequences",
    "pad_sequences",
    "rows_and_rest",
    "uniform_pack_as_padded",
    "protein_tokenizer",
    "read_fasta",
    "read_parquet",
    "record_affixes",
    "tokenizer_kind",
]
