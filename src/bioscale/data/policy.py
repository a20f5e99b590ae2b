"""The input policy: what happens to each raw record before tokenisation, and the counts that report it.

Biological data is messy, so every rule is explicit and counted rather than silent (docs/data.md states them):
surrounding whitespace and trailing ``*`` stop codons are stripped; lower case is upper-cased (or, with ``keep_case``
and a case-sensitive tokenizer, kept: soft-masked repeats stay lower case, counted); empty records are
skipped; characters outside the alphabet are mapped to the alphabet's unknown residue (``X`` for proteins, ``N`` for
DNA; for AMPLIFY ``X``, which its tokenizer encodes as ``<unk>``: AMPLIFY keeps ``B`` and the chain separator ``|``
and has no token for X, Z, U, O or J), or the record is rejected (skipped), or the run fails, per
``unknown_residues``; records longer than the maximum are randomly cropped (proteins, as ESM-2 and AMPLIFY were
trained) or cut into windows with a stride (genomes). Each alphabet is the tokenizer's (``tokenizers.TOKENIZERS``).
A record of the other modality (DNA/RNA given to a protein alphabet, whose letters include A C G T N; a protein given
to a nucleotide alphabet) is warned about once per policy and counted (``wrong_modality``), or fails the run under
``unknown_residues="error"`` (see :meth:`InputPolicy._other_modality`). One record can therefore give zero, one or
many training sequences. :class:`PolicyStats` holds the counts; the loader carries them through its state so they
survive workers and restarts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bioscale.data.tokenizers import TOKENIZERS

UnknownResidues = Literal["map", "reject", "error"]
Crop = Literal["random", "window"]

# Tokenizer name -> the characters the policy keeps (the tokenizer's one-character tokens).
ALPHABETS: dict[str, str] = {name: spec.policy_alphabet for name, spec in TOKENIZERS.items()}

logger = logging.getLogger(__name__)

# The modality check. A protein alphabet contains A, C, G, T and N, so DNA passes it silently: a record of at least
# MODALITY_MIN_LENGTH residues that is >= 95 % A/C/G/T/U/N is taken for DNA/RNA (UniProt proteins average ~26 %).
# A nucleotide alphabet maps amino acids to N: a record with >= 10 % of letters no nucleotide code uses (E F I J L O P
# Q Z; ~35 % of a typical protein, 0 in DNA) is taken for a protein. Which check applies is read from the alphabet.
MODALITY_MIN_LENGTH = 16
_NUCLEOTIDE_LETTERS = b"ACGTUN"
_AMINO_ACID_ONLY_LETTERS = b"EFIJLOPQZ"


def _alphabet_modality(alphabet: str) -> str | None:
    letters = set(alphabet)
    if set("EFILPQ") <= letters:
        return "protein"
    if set("ACGT") <= letters:
        return "nucleotide"
    return None


@dataclass
class PolicyStats:
    """Counts of what the input policy did. All fields are plain ints, so the stats pickle into loader state."""

    records_read: int = 0  # records that reached the policy
    records_used: int = 0  # records that gave at least one training sequence
    sequences: int = 0  # training sequences emitted (a windowed record gives several)
    skipped_empty: int = 0  # records empty after stripping (or null in a table)
    rejected_unknown: int = 0  # records skipped for out-of-alphabet characters (unknown_residues="reject")
    records_mapped: int = 0  # records with >= 1 character mapped to the unknown residue
    residues_mapped: int = 0  # characters mapped to the unknown residue
    uppercased: int = 0  # records that contained lower case
    lowercase_kept: int = 0  # records whose lower case (soft-masked repeats) was kept as it is (data.keep_case)
    stop_stripped: int = 0  # records that ended in a '*' stop codon
    cropped: int = 0  # records longer than the maximum, randomly cropped to one window
    windowed: int = 0  # records longer than the maximum, cut into strided windows
    residues_read: int = 0  # residues after stripping, before cropping
    residues_used: int = 0  # residues in emitted sequences (windows may overlap, so can exceed residues_read)
    wrong_modality: int = 0  # records that look like the other modality (DNA for a protein alphabet, or the reverse)
    # Coding sequences (bioscale.data.cds.CdsPolicy; zero for other tokenizers, whose residues_* count characters where
    # the CDS policy counts codons):
    cds_not_multiple_of_3: int = 0  # records whose length is not a multiple of 3 (the trailing 1-2 bases are dropped)
    cds_internal_stop: int = 0  # records with an in-frame stop codon before their last codon
    cds_no_start: int = 0  # records whose first codon is not a start codon of the translation table
    cds_rejected: int = 0  # records skipped by cds_checks="reject" (any of the three above)
    codons_unknown: int = 0  # codons with a base other than ACGT (N, IUPAC codes), encoded as <UNK>
    rna_converted: int = 0  # records written as RNA (U), read as DNA (T)
    # Causal-LM targets (bioscale.data.collators.CLMCollator's genomic options), counted over delivered batches:
    labels_uppercased: int = 0  # lower-case targets trained as their upper-case base (data.uppercase_labels)
    labels_ambiguous_ignored: int = 0  # N / IUPAC-code targets set to -100 (data.ignore_ambiguous_labels)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def add(self, other: PolicyStats | Mapping[str, int]) -> None:
        """Adds ``other``'s counts to these (to sum over workers or ranks)."""
        items = other.as_dict() if isinstance(other, PolicyStats) else other
        for key, value in items.items():
            setattr(self, key, getattr(self, key) + int(value))

    @classmethod
    def from_dict(cls, counts: Mapping[str, int]) -> PolicyStats:
        unknown = set(counts) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown policy stats keys {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in counts.items()})


class InputPolicy:
    """Cleans one raw record into zero or more training sequences, counting everything it does in ``self.stats``.

    Args:
        kind: a tokenizer name (``"protein"``, ``"nucleotide"``, ``"amplify"``): the alphabet (the tokenizer's
            residues) and the unknown residue.
        max_length: longest sequence to emit, in residues (the model length minus the tokenizer's special tokens);
            ``None`` for no limit.
        crop: for records longer than ``max_length``: ``"random"`` keeps one uniformly placed window (ESM-2),
            ``"window"`` emits windows starting every ``window_stride`` residues until the end is covered (the last
            one may be shorter).
        window_stride: stride of ``"window"`` cropping, 1…max_length; ``None`` means ``max_length`` (no overlap).
        unknown_residues: ``"map"`` out-of-alphabet characters to ``X``/``N``; ``"reject"`` skips such records
            (counted); ``"error"`` raises ``ValueError`` naming the record.
        keep_case: keep lower-case letters of the alphabet as they are instead of upper-casing them (counted as
            ``lowercase_kept``); needs a case-sensitive tokenizer (``nucleotide_ascii``, whose lower-case bases are
            their own ids, as the reference's genomic checkpoints were trained).
    """

    def __init__(
        self,
        kind: str = "protein",
        *,
        max_length: int | None = None,
        crop: str = "random",
        window_stride: int | None = None,
        unknown_residues: str = "map",
        keep_case: bool = False,
    ) -> None:
        if kind not in ALPHABETS:
            raise ValueError(f"unknown alphabet kind {kind!r}: expected one of {sorted(ALPHABETS)}")
        if TOKENIZERS[kind].unit == "gene":
            raise ValueError(f"{kind!r} cells are token ids, not text: their policy is bioscale.data.singlecell.CellPolicy")
        if TOKENIZERS[kind].unit == "codon":  # lengths, crops and checks are in codons there
            raise ValueError(f"{kind!r} records are coding sequences: their policy is bioscale.data.cds.CdsPolicy")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 residue, got {max_length}")
        if crop not in ("random", "window"):
            raise ValueError(f"crop must be 'random' or 'window', got {crop!r}")
        if unknown_residues not in ("map", "reject", "error"):
            raise ValueError(f"unknown_residues must be 'map', 'reject' or 'error', got {unknown_residues!r}")
        if keep_case and not TOKENIZERS[kind].case_sensitive:
            case_sensitive = [name for name, spec in TOKENIZERS.items() if spec.case_sensitive]
            raise ValueError(
                f"keep_case needs a tokenizer with lower-case tokens of their own ({', '.join(case_sensitive)}); "
                f"the {kind!r} tokenizer upper-cases everything"
            )
        stride = window_stride or max_length
        if crop == "window" and max_length is not None and not (stride is not None and 1 <= stride <= max_length):
            raise ValueError(f"window_stride must be in 1..max_length={max_length}, got {window_stride}")
        self.kind = kind
        self.max_length = max_length
        self.crop = crop
        self.window_stride = stride
        self.unknown_residues = unknown_residues
        self.keep_case = bool(keep_case)
        self.alphabet = ALPHABETS[kind]
        self.unknown_char = TOKENIZERS[kind].unknown_residue
        self.stats = PolicyStats()
        valid = self.alphabet.encode("ascii")
        # bytes.translate tables: ``_invalid`` deletes every valid byte (what is left is invalid), ``_to_unknown``
        # maps every byte outside the alphabet to the unknown residue. Both run in C, so a clean 30 kb record costs
        # two passes at memory speed instead of a Python loop per residue.
        self._valid = valid
        kept = valid + valid.lower() if self.keep_case else valid  # the bytes that pass unchanged
        self._to_unknown = bytes(b if b in kept else ord(self.unknown_char) for b in range(256))
        self._modality = _alphabet_modality(self.alphabet)
        self._warned_modality = False

    def _other_modality(self, raw: bytes) -> str | None:
        """Why upper-cased record ``raw`` looks like the other modality than this alphabet's, or None."""
        if self._modality is None or len(raw) < MODALITY_MIN_LENGTH:
            return None
        if self._modality == "protein":
            share = 1 - len(raw.translate(None, _NUCLEOTIDE_LETTERS)) / len(raw)
            if share >= 0.95:
                return (f"{share:.0%} of its {len(raw)} residues are A/C/G/T/U/N: it looks like DNA or RNA, and the "
                        f"{self.kind} alphabet is a protein one")  # fmt: skip
        else:
            share = 1 - len(raw.translate(None, _AMINO_ACID_ONLY_LETTERS)) / len(raw)
            if share >= 0.10:
                return (f"{share:.0%} of its {len(raw)} letters are ones only amino acids use (E F I L P Q ...): it "
                        f"looks like a protein, and the {self.kind} alphabet is a nucleotide one")  # fmt: skip
        return None

    def __call__(
        self, record_id: str, sequence: str | None, rng: np.random.Generator | None = None, *, where: str = ""
    ) -> list[str]:
        """The training sequences for one record (possibly none), updating ``self.stats``.

        ``rng`` places random crops (a fresh unseeded generator when ``None``); ``where`` (e.g. the file name)
        is added to error messages.
        """
        stats = self.stats
        stats.records_read += 1
        seq = (sequence or "").strip()
        if seq.endswith("*"):
            seq = seq.rstrip("*")
            stats.stop_stripped += 1
        if not seq:
            stats.skipped_empty += 1
            return []
        raw = seq.encode("ascii", errors="replace")  # non-ASCII becomes '?', which is outside every alphabet
        upper = raw.upper()  # bytes.upper touches ASCII letters only
        if upper != raw:
            if self.keep_case:
                stats.lowercase_kept += 1
            else:
                stats.uppercased += 1
                raw = upper
        mismatch = self._other_modality(upper)
        if mismatch is not None:
            if self.unknown_residues == "error":
                raise ValueError(f"record {record_id!r}{where}: {mismatch} (check data.tokenizer and the model; "
                                 "unknown_residues='map' keeps such records, counted as wrong_modality)")  # fmt: skip
            stats.wrong_modality += 1
            if not self._warned_modality:
                self._warned_modality = True
                logger.warning("record %r%s: %s; such records are kept and counted (wrong_modality in the input-"
                               "policy counts); data.unknown_residues=error refuses them", record_id, where,
                               mismatch)  # fmt: skip
        num_invalid = len(upper.translate(None, self._valid))
        if num_invalid:
            if self.unknown_residues == "error":
                pos, char = next((i, c) for i, c in enumerate(seq) if c.upper() not in self.alphabet)
                raise ValueError(
                    f"record {record_id!r}{where}: character {char!r} at position {pos + 1} is not in the "
                    f"{self.kind} alphabet {self.alphabet!r} (set unknown_residues='map' to map it to "
                    f"{self.unknown_char!r}, or 'reject' to skip such records)"
                )
            if self.unknown_residues == "reject":
                stats.rejected_unknown += 1
                return []
            raw = raw.translate(self._to_unknown)
            stats.records_mapped += 1
            stats.residues_mapped += num_invalid
        seq = raw.decode("ascii")
        stats.residues_read += len(seq)
        out = list(self._crop(seq, rng))
        stats.records_used += 1
        stats.sequences += len(out)
        stats.residues_used += sum(len(s) for s in out)
        return out

    def _crop(self, seq: str, rng: np.random.Generator | None) -> Iterator[str]:
        limit = self.max_length
        if limit is None or len(seq) <= limit:
            yield seq
            return
        if self.crop == "random":
            self.stats.cropped += 1
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, len(seq) - limit + 1))
            yield seq[start : start + limit]
            return
        self.stats.windowed += 1
        stride = self.window_stride
        assert stride is not None
        start = 0
        while True:
            yield seq[start : start + limit]
            if start + limit >= len(seq):
                return
            start += stride
