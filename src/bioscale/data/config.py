"""``DataConfig``: every knob of the data pipeline, as a plain dataclass the trainer nests under ``data:``.

Only plain types (str, int, float, bool, Optional, list, and the nested ``image`` section of the same kind), so
Hydra/OmegaConf can build its schema from this class;
unknown keys are rejected there, and :meth:`DataConfig.validate` rejects bad values with a ``ValueError`` naming the
key. The loader (loader.py) is the only consumer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from bioscale.data.image_config import ImageDataConfig
from bioscale.data.tokenizers import TOKENIZERS


@dataclass
class DataConfig:
    # --- where the sequences come from -----------------------------------------------------------------------------
    # A FASTA file (.fasta/.fa/.faa/.fna/.ffn/.fas, optionally .gz), a .parquet file, a directory of parquet shards
    # (or FASTA files), "demo:protein" / "demo:dna" / "demo:dna-small" (files shipped by pyhmmer/pyrodigal), or
    # "hf:<hub dataset name or local path>".
    source: str = "demo:protein"
    sequence_column: str = "sequence"  # parquet / HF column holding the residues
    id_column: Optional[str] = None  # parquet / HF column holding record ids (for error messages); None = row number
    hf_split: str = "train"
    hf_streaming: bool = False

    # --- tokens and objective --------------------------------------------------------------------------------------
    tokenizer: str = "protein"  # "protein" (ESM-2 alphabet) | "nucleotide" | "amplify" (AMPLIFY's 27 tokens)
    # | "codon" (CodonFM's 69 tokens, one per codon: the records are coding sequences, see data/cds.py)
    # | "nucleotide_ascii" (the reference's byte-level DNA vocabulary: ASCII codes, case kept; 256 tokens)
    objective: str = "mlm"  # "mlm" (masked LM, ESM-2) | "clm" (causal LM, Llama on DNA)
    mlm_probability: float = 0.15
    # codon tokenizer only: a JSON file of codon counts ({"AAA": 123, ...}, or a list of 69 counts by token id) for
    # CodonFM's codon-weighted masking (per-codon probability mlm_probability x weight, weights = mean count / count
    # normalised to mean 1 per sequence, clipped to [0.05, 0.4]); None = uniform masking
    codon_weights: Optional[str] = None

    # --- input policy (policy.py) ----------------------------------------------------------------------------------
    max_seq_length: int = 1024  # tokens per sequence, special tokens included (ESM-2: 1022 residues + 2)
    crop: str = "auto"  # longer records: "random" crop (ESM-2) | "window" (genomes) | "auto" = by tokenizer
    window_stride: Optional[int] = None  # residues between window starts; None = window length (no overlap)
    unknown_residues: str = "map"  # out-of-alphabet characters: "map" to X/N | "reject" the record | "error"
    # codon tokenizer only: a length not a multiple of 3, an internal stop, a missing start codon: "keep" (counted;
    # the trailing partial codon is dropped) | "reject" the record (counted) | "error" (ValueError naming it)
    cds_checks: str = "keep"
    # Genomic options (docs/data.md). keep_case: lower-case (soft-masked repeat) bases stay lower case in the inputs
    # instead of being upper-cased; needs a case-sensitive tokenizer (nucleotide_ascii, where "a" is its own id 97).
    keep_case: bool = False
    # clm only: train lower-case targets as their upper-case base (inputs keep their case).
    uppercase_labels: bool = False
    # clm only: N and IUPAC ambiguity codes are not targets (labels -100; they stay in the inputs).
    ignore_ambiguous_labels: bool = False

    # --- batching --------------------------------------------------------------------------------------------------
    use_sequence_packing: bool = False  # False: padded [B, S] batches; True: packed THD [1, T] micro-batches
    micro_batch_size: int = 8  # sequences per padded micro-batch
    max_tokens_per_batch: int = 8192  # token budget of a packed micro-batch (T <= this, padding included)
    pad_to_multiple_of: Optional[int] = None  # round S (padded) or T (packed) up to a multiple (16 for FP8)
    split_overflow: bool = False  # packed: cut a sequence that overflows the budget, continue it in the next batch
    # packed: sequences of lookahead for first-fit-decreasing packing; 0 or 1 = greedy, in stream order. Ignored with
    # split_overflow (which fills every micro-batch already). See docs/data.md for the default.
    packing_buffer_size: int = 0
    # packed: a micro-batch of equal-length sequences that fills its budget exactly (Geneformer cells cut to the
    # context, every step) runs as the padded [N, L] batch without a mask: dense attention kernels, one static shape,
    # the same loss (bioscale.data.packing.uniform_pack_as_padded); one mostly of its longest length as those rows
    # plus a packed micro-batch of the rest (rows_and_rest). Applied by the trainer without context parallelism.
    dense_uniform_packs: bool = True

    # --- order and loading -----------------------------------------------------------------------------------------
    shuffle: bool = True  # reshuffle units and sequences every epoch (from seed + epoch)
    shuffle_buffer_size: int = 4096  # sequences shuffled together in one block (per worker)
    seed: int = 0
    num_workers: int = 0  # data-loader worker processes per rank (0: load in the training process)
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies (set True on GPU)

    # --- images (objective "image_classification": bioscale.data.images; data.image.*) ------------------------------
    image: ImageDataConfig = dataclasses.field(default_factory=ImageDataConfig)

    def __post_init__(self) -> None:
        if isinstance(self.image, Mapping):  # from_dict / a plain mapping: the nested section as a dataclass
            self.image = ImageDataConfig(**self.image)
        self.validate()

    @property
    def resolved_crop(self) -> str:
        """``crop`` with ``"auto"`` resolved by the tokenizer: random crops for proteins, windows for nucleotides."""
        if self.crop != "auto":
            return self.crop
        return TOKENIZERS[self.tokenizer].crop

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first key with an invalid value."""

        def choice(key: str, options: tuple[str, ...]) -> None:
            value = getattr(self, key)
            if value not in options:
                raise ValueError(f"data.{key}={value!r}: expected one of {', '.join(map(repr, options))}")

        def at_least(key: str, low: int, optional: bool = False) -> None:
            value = getattr(self, key)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}={value!r}: expected an integer >= {low}")

        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source={self.source!r}: expected a path, 'demo:<kind>' or 'hf:<dataset>'")
        choice("tokenizer", tuple(TOKENIZERS))
        choice("objective", ("mlm", "clm", "image_classification"))
        self.image.validate()
        choice("crop", ("auto", "random", "window"))
        choice("unknown_residues", ("map", "reject", "error"))
        choice("cds_checks", ("keep", "reject", "error"))
        if self.codon_weights is not None and TOKENIZERS[self.tokenizer].unit != "codon":
            raise ValueError(
                f"data.codon_weights is set but data.tokenizer={self.tokenizer!r} is not a codon tokenizer "
                "(codon-weighted masking needs data.tokenizer=codon)"
            )
        for key in ("keep_case", "uppercase_labels", "ignore_ambiguous_labels"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"data.{key}={getattr(self, key)!r}: expected true or false")
        if self.keep_case and not TOKENIZERS[self.tokenizer].case_sensitive:
            raise ValueError(
                f"data.keep_case=true but data.tokenizer={self.tokenizer!r} upper-cases every base; use a "
                "case-sensitive tokenizer (data.tokenizer=nucleotide_ascii: lower-case bases are their own ids)"
            )
        for key in ("uppercase_labels", "ignore_ambiguous_labels"):
            if getattr(self, key) and self.objective != "clm":
                raise ValueError(f"data.{key}=true applies to causal-LM labels; data.objective is {self.objective!r}")
        if not 0.0 < float(self.mlm_probability) < 1.0:
            raise ValueError(f"data.mlm_probability={self.mlm_probability!r}: expected a value in (0, 1)")
        at_least("max_seq_length", 3)  # room for the two special tokens and one residue
        at_least("window_stride", 1, optional=True)
        if self.window_stride is not None and self.window_stride > self.max_seq_length - 2:
            raise ValueError(
                f"data.window_stride={self.window_stride}: must not exceed the window length "
                f"max_seq_length - 2 = {self.max_seq_length - 2} (residues would be skipped)"
            )
        at_least("micro_batch_size", 1)
        at_least("max_tokens_per_batch", 1)
        at_least("pad_to_multiple_of", 1, optional=True)
        at_least("shuffle_buffer_size", 1)
        at_least("packing_buffer_size", 0)
        at_least("num_workers", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r}: expected an integer >= 0")
        if self.use_sequence_packing:
            if not self.split_overflow and self.max_tokens_per_batch < self.max_seq_length:
                raise ValueError(
                    f"data.max_tokens_per_batch={self.max_tokens_per_batch} is smaller than data.max_seq_length="
                    f"{self.max_seq_length}: a full-length sequence could never be packed (raise it, or set "
                    f"data.split_overflow=true)"
                )
            if self.pad_to_multiple_of and self.max_tokens_per_batch % self.pad_to_multiple_of:
                raise ValueError(
                    f"data.max_tokens_per_batch={self.max_tokens_per_batch} must be a multiple of "
                    f"data.pad_to_multiple_of={self.pad_to_multiple_of}, so padding never exceeds the budget"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """Builds a config from a mapping (e.g. an OmegaConf ``DictConfig``), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: values[k] for k in values})
