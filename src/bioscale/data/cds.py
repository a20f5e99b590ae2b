"""Coding sequences (CDS) for codon language models: the input policy, the fast codon encoder, codon-weighted masking,
CDS FASTA writing and the offline demo CDS corpus.

A CDS record is read codon by codon from its first base (``codon_tokenizer()``: 69 tokens, ``<CLS> codons <SEP>``).
Real CDS files are messier than that, so :class:`CdsPolicy` applies explicit rules and counts each one in the same
:class:`~bioscale.data.policy.PolicyStats` the other tokenizers use (``residues_*`` count codons here):

============================  =====================================================================================
what                          rule (count)
============================  =====================================================================================
whitespace anywhere           removed (FASTA line breaks are already joined by ``read_fasta``)
lower case                    upper-cased (``uppercased``)
RNA (``U``)                   read as ``T`` (``rna_converted``); CodonFM's RNA tokenizer gives the same ids
a base other than ACGT        ``N``, IUPAC codes, anything else: the codon that holds it becomes ``<UNK>``
                              (``records_mapped``, ``residues_mapped`` bases, ``codons_unknown``); or the record is
                              skipped (``unknown_residues="reject"``: ``rejected_unknown``) or the run fails
                              (``"error"``), as for the other alphabets
length not a multiple of 3    ``cds_not_multiple_of_3``; the trailing 1-2 bases are dropped (as CodonFM's tokenizer
                              drops them)
internal stop codon           an in-frame TAA / TAG / TGA before the last codon (``cds_internal_stop``); kept as
                              tokens (the vocabulary has the stop codons; the terminal stop is normal and kept)
missing start codon           a first codon that is not a start of the translation table (11, bacterial: ATG GTG TTG
                              CTG ATT ATC ATA; 1, standard: ATG TTG CTG) (``cds_no_start``)
empty record                  skipped (``skipped_empty``)
longer than the context       one random crop of whole codons (``cropped``), or strided windows (``windowed``)
============================  =====================================================================================

The three CDS checks (length, internal stop, start) follow ``cds_checks``: ``"keep"`` (count and keep), ``"reject"``
(count and skip the record, ``cds_rejected``) or ``"error"``: the strict mode, a ``ValueError`` that names the record,
the base position (1-based) and the codon. :class:`CodonTokenEncoder` turns a cleaned CDS into ids with a numpy lookup
(ids identical to ``codon_tokenizer()``, tested), which is what the training loader uses.
:class:`CodonWeightedMLMCollator` is CodonFM's codon-frequency-weighted masking. :func:`demo_cds_corpus` writes the genes that ``pyrodigal`` predicts on
the genome its wheel ships, the offline demo and test corpus (``data.source=demo:cds``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bioscale.data.collators import MLMCollator
from bioscale.data.demo import demo_corpus
from bioscale.data.packing import IGNORE_INDEX
from bioscale.data.policy import PolicyStats
from bioscale.data.sources import read_fasta
from bioscale.data.tokenizers import CODON_SPECIAL_TOKENS, CODON_VOCAB, CODONS

NUM_SPECIAL = len(CODON_SPECIAL_TOKENS)
UNK_ID = CODON_VOCAB.index("<UNK>")
CLS_ID, SEP_ID = CODON_VOCAB.index("<CLS>"), CODON_VOCAB.index("<SEP>")
STOP_CODONS = frozenset({"TAA", "TAG", "TGA"})
# NCBI translation tables: the start codons the missing-start check accepts (the stops are the same in both).
START_CODONS: dict[int, frozenset[str]] = {
    1: frozenset({"ATG", "TTG", "CTG"}),
    11: frozenset({"ATG", "GTG", "TTG", "CTG", "ATT", "ATC", "ATA"}),
}
CDS_CHECKS = ("keep", "reject", "error")

# byte -> base index: A C G T (any case, U read as T) = 0..3, anything else 4 (the codon holding it is <UNK>)
_BASE_INDEX = np.full(256, 4, dtype=np.uint8)
for _index, _base in enumerate("ACGT"):
    _BASE_INDEX[ord(_base)] = _BASE_INDEX[ord(_base.lower())] = _index
_BASE_INDEX[ord("U")] = _BASE_INDEX[ord("u")] = 3
_STOP_INDICES = np.array(sorted(CODONS.index(c) for c in STOP_CODONS))


def codon_indices(seq: str) -> np.ndarray:
    """``[n]`` codon index 0..63 (``itertools.product("ACGT", repeat=3)`` order) of each whole codon of ``seq``, -1
    for a codon with a base other than ACGT; a trailing partial codon is ignored."""
    codes = _BASE_INDEX[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]
    num_codons = len(codes) // 3
    codes = codes[: 3 * num_codons].reshape(num_codons, 3).astype(np.int16)
    index = 16 * codes[:, 0] + 4 * codes[:, 1] + codes[:, 2]
    index[(codes > 3).any(axis=1)] = -1
    return index


def check_codon_vocabulary(tokenizer: PreTrainedTokenizerBase, *, what: str = "the tokenizer") -> None:
    """``ValueError`` naming the first difference unless ``tokenizer`` has exactly CodonFM's 69-token vocabulary (a
    model trained with other ids would read every codon as another one)."""
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    for token_id, token in enumerate(CODON_VOCAB):
        if by_id.get(token_id) != token:
            raise ValueError(
                f"{what} is not CodonFM's 69-token codon vocabulary: id {token_id} is {by_id.get(token_id)!r}, "
                f"expected {token!r} (<CLS> <SEP> <UNK> <PAD> <MASK>, then AAA..TTT in product('ACGT') order)"
            )
    extra = sorted(set(vocab.values()) - set(range(len(CODON_VOCAB))))
    if extra:
        raise ValueError(f"{what} has {len(vocab)} tokens; CodonFM's codon vocabulary has 69 (extra ids {extra[:5]})")


class CodonTokenEncoder:
    """Encodes cleaned coding sequences with a numpy lookup: ``encode(seq)`` equals
    ``codon_tokenizer()(seq)["input_ids"]`` for any string without whitespace (the tokenizer drops whitespace; here
    it makes its codon ``<UNK>``), lower case, ``U`` and a trailing partial codon included, as ``uint8`` ids.

    The same interface as :class:`~bioscale.data.tokenizers.CharTokenEncoder` (``encode``, ``prefix``, ``suffix``,
    ``num_special``), so the training loader takes either. Pickles cheaply into data-loader workers.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        check_codon_vocabulary(tokenizer)
        self.prefix = np.asarray([CLS_ID], dtype=np.uint8)
        self.suffix = np.asarray([SEP_ID], dtype=np.uint8)
        self.num_special = 2

    def encode(self, seq: str) -> np.ndarray:
        index = codon_indices(seq)
        body = np.where(index >= 0, index + NUM_SPECIAL, UNK_ID).astype(np.uint8)
        return np.concatenate([self.prefix, body, self.suffix])


class CdsPolicy:
    """Cleans one CDS record into zero or more training sequences (uppercase ACGT/N strings whose length is a multiple
    of 3), counting everything in ``self.stats`` (see the module docstring for the rules).

    The same call interface as :class:`~bioscale.data.policy.InputPolicy`, so the loader takes either.

    Args:
        max_length: longest sequence to emit, in *codons* (the model length minus ``<CLS>`` and ``<SEP>``);
            ``None`` for no limit.
        crop: ``"random"`` (one uniformly placed window of whole codons) or ``"window"`` (windows every
            ``window_stride`` codons until the end is covered).
        window_stride: stride of ``"window"`` cropping in codons; ``None`` means ``max_length``.
        unknown_residues: bases other than ACGT: ``"map"`` (their codon is ``<UNK>``), ``"reject"``, ``"error"``.
        cds_checks: length not a multiple of 3, internal stop, missing start: ``"keep"``, ``"reject"``, ``"error"``.
        translation_table: NCBI table whose start codons the start check accepts: 11 (bacteria, the default) or 1.
    """

    def __init__(
        self,
        *,
        max_length: int | None = None,
        crop: str = "random",
        window_stride: int | None = None,
        unknown_residues: str = "map",
        cds_checks: str = "keep",
        translation_table: int = 11,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 codon, got {max_length}")
        if crop not in ("random", "window"):
            raise ValueError(f"crop must be 'random' or 'window', got {crop!r}")
        if unknown_residues not in ("map", "reject", "error"):
            raise ValueError(f"unknown_residues must be 'map', 'reject' or 'error', got {unknown_residues!r}")
        if cds_checks not in CDS_CHECKS:
            raise ValueError(f"cds_checks must be one of {CDS_CHECKS}, got {cds_checks!r}")
        if translation_table not in START_CODONS:
            raise ValueError(
                f"translation_table={translation_table!r} is not supported; choose one of {sorted(START_CODONS)} "
                "(NCBI genetic codes: 1 standard, 11 bacterial / archaeal / plastid)"
            )
        stride = window_stride or max_length
        if crop == "window" and max_length is not None and not (stride is not None and 1 <= stride <= max_length):
            raise ValueError(f"window_stride must be in 1..max_length={max_length} codons, got {window_stride}")
        self.max_length = max_length
        self.crop = crop
        self.window_stride = stride
        self.unknown_residues = unknown_residues
        self.cds_checks = cds_checks
        self.translation_table = translation_table
        self._starts = np.array(sorted(CODONS.index(c) for c in START_CODONS[translation_table]))
        self.stats = PolicyStats()

    def __call__(
        self, record_id: str, sequence: str | None, rng: np.random.Generator | None = None, *, where: str = ""
    ) -> list[str]:
        """The training sequences of one record (possibly none); ``where`` (e.g. the file) is added to errors."""
        stats = self.stats
        stats.records_read += 1
        seq = "".join((sequence or "").split())
        if not seq:
            stats.skipped_empty += 1
            return []
        raw = seq.encode("ascii", errors="replace")  # non-ASCII becomes '?', not a base
        upper = raw.upper()
        if upper != raw:
            stats.uppercased += 1
            raw = upper
        if b"U" in raw:
            stats.rna_converted += 1
            raw = raw.replace(b"U", b"T")
        num_invalid = len(raw.translate(None, b"ACGT"))
        if num_invalid:
            if self.unknown_residues == "error":
                pos = next(i for i, b in enumerate(raw) if b not in b"ACGT")
                raise ValueError(
                    f"record {record_id!r}{where}: base {seq[pos]!r} at position {pos + 1} (codon {pos // 3 + 1}) is "
                    "not A, C, G or T (set data.unknown_residues='map' to read its codon as <UNK>, or 'reject' to skip "
                    "such records)"
                )
            if self.unknown_residues == "reject":
                stats.rejected_unknown += 1
                return []
            stats.records_mapped += 1
            stats.residues_mapped += num_invalid
            raw = raw.translate(_TO_N)
        seq = raw.decode("ascii")
        problems = self._check(seq, where=f"record {record_id!r}{where}")
        if problems:
            if self.cds_checks == "error":
                raise ValueError(
                    f"{problems[0]} (strict CDS policy: set data.cds_checks='keep' to count and keep such records, or "
                    "'reject' to skip them)"
                )
            if self.cds_checks == "reject":
                stats.cds_rejected += 1
                return []
        seq = seq[: len(seq) - len(seq) % 3]
        if not seq:
            stats.skipped_empty += 1
            return []
        num_codons = len(seq) // 3
        if num_invalid:
            stats.codons_unknown += int((codon_indices(seq) < 0).sum())
        stats.residues_read += num_codons
        out = list(self._crop(seq, rng))
        stats.records_used += 1
        stats.sequences += len(out)
        stats.residues_used += sum(len(piece) // 3 for piece in out)
        return out

    def _check(self, seq: str, *, where: str) -> list[str]:
        """The CDS checks that ``seq`` (uppercase, ACGT/N) fails, each as a message naming ``where`` and the
        position; counts them."""
        stats = self.stats
        problems = []
        remainder = len(seq) % 3
        if remainder:
            stats.cds_not_multiple_of_3 += 1
            problems.append(
                f"{where}: length {len(seq)} is not a multiple of 3 (a partial codon of {remainder} base(s) at "
                f"position {len(seq) - remainder + 1})"
            )
        index = codon_indices(seq)
        if len(index) and not np.isin(index[0], self._starts):
            stats.cds_no_start += 1
            problems.append(
                f"{where}: first codon {seq[:3]!r} at position 1 is not a start codon of translation table "
                f"{self.translation_table} ({', '.join(sorted(START_CODONS[self.translation_table]))})"
            )
        internal = np.flatnonzero(np.isin(index[:-1], _STOP_INDICES))
        if len(internal):
            stats.cds_internal_stop += 1
            codon = int(internal[0])
            problems.append(
                f"{where}: in-frame stop codon {seq[3 * codon : 3 * codon + 3]!r} at position {3 * codon + 1} "
                f"(codon {codon + 1} of {len(index)}) before the last codon"
            )
        return problems

    def _crop(self, seq: str, rng: np.random.Generator | None) -> Iterator[str]:
        limit, num_codons = self.max_length, len(seq) // 3
        if limit is None or num_codons <= limit:
            yield seq
            return
        if self.crop == "random":
            self.stats.cropped += 1
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, num_codons - limit + 1))
            yield seq[3 * start : 3 * (start + limit)]
            return
        self.stats.windowed += 1
        stride = self.window_stride
        assert stride is not None
        start = 0
        while True:
            yield seq[3 * start : 3 * (start + limit)]
            if start + limit >= num_codons:
                return
            start += stride


def clean_coding_sequences(ids: Sequence[str], sequences: Sequence[str]) -> list[str]:
    """The coding sequences of an inference input (embedding, fine-tuning) cleaned by the lenient :class:`CdsPolicy`
    (``cds_checks="keep"``, ``unknown_residues="map"``): upper case, ``U`` read as ``T``, a codon with a base other
    than ACGT read as ``<UNK>``, a trailing partial codon (1-2 bases) dropped, nothing cropped. One warning counts what
    was changed or is unusual for a CDS (no start codon, an internal stop); ``ValueError`` names a record without a
    whole codon."""
    policy = CdsPolicy(max_length=None, cds_checks="keep", unknown_residues="map")
    cleaned = []
    for record_id, sequence in zip(ids, sequences):
        out = policy(record_id, sequence)
        if not out:
            raise ValueError(f"record {record_id!r}: no whole codon to read (a coding sequence needs at least 3 bases)")
        cleaned.append(out[0])
    stats = policy.stats
    notes = [
        (stats.cds_not_multiple_of_3, "are not a whole number of codons (the trailing 1-2 bases were dropped)"),
        (stats.records_mapped, f"hold bases other than ACGT ({stats.codons_unknown} codons read as <UNK>)"),
        (stats.cds_internal_stop, "have an in-frame stop codon before the last codon (kept)"),
        (stats.cds_no_start, "do not begin with a start codon (kept)"),
    ]
    found = [f"{count} {what}" for count, what in notes if count]
    if found:
        warnings.warn(f"of {len(cleaned)} coding sequences, " + "; ".join(found), stacklevel=3)
    return cleaned


_TO_N = bytes(b if b in b"ACGT" else ord("N") for b in range(256))


# ---- codon-weighted masking (CodonFM's "cdswt" objective) ------------------------------------------------------------


def codon_weights_from_counts(counts: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    """Per-token masking weights ``[69]`` from codon counts: ``mean(count) / count`` over the codons with a count > 0
    (CodonFM's ``get_group_codon_weights``: rare codons are masked more often); 0 for special tokens and for codons
    never counted.

    ``counts``: ``{"AAA": 1234, ...}`` (codons, any case, ``U`` read as ``T``; missing ones count 0) or a list of 69
    counts by token id (CodonFM's codon-weights file holds one such list per group). ``ValueError`` for an unknown
    codon, a list of another length, or negative counts.
    """
    values = np.zeros(len(CODON_VOCAB), dtype=np.float64)
    if isinstance(counts, Mapping):
        for codon, count in counts.items():
            key = str(codon).upper().replace("U", "T")
            if key not in CODONS:
                raise ValueError(f"codon counts: {codon!r} is not one of the 64 codons")
            values[NUM_SPECIAL + CODONS.index(key)] = float(count)
    else:
        if len(counts) != len(CODON_VOCAB):
            raise ValueError(f"codon counts by token id must have {len(CODON_VOCAB)} entries, got {len(counts)}")
        values[:] = np.asarray(counts, dtype=np.float64)
    if (values < 0).any() or not np.isfinite(values).all():
        raise ValueError("codon counts must be finite and >= 0")
    weights = np.zeros_like(values)
    codon_counts = values[NUM_SPECIAL:]
    seen = codon_counts > 0
    if not seen.any():
        raise ValueError("codon counts are all zero: no codon to weight")
    weights[NUM_SPECIAL:][seen] = codon_counts[seen].mean() / codon_counts[seen]
    return weights


def load_codon_weights(path: str | os.PathLike[str]) -> np.ndarray:
    """:func:`codon_weights_from_counts` of a JSON file (a ``{codon: count}`` object or a list of 69 counts)."""
    try:
        counts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"data.codon_weights={str(path)!r}: cannot read a JSON file of codon counts ({err})") from err
    if not isinstance(counts, (dict, list)):
        raise ValueError(f"data.codon_weights={str(path)!r}: expected a JSON object {{codon: count}} or a list")
    return codon_weights_from_counts(counts)


def count_codons(sequences: Iterable[str]) -> dict[str, int]:
    """Counts of the 64 codons over ``sequences`` (whole ACGT codons only), e.g. to write a ``data.codon_weights``
    file: ``json.dumps(count_codons(seqs))``."""
    total = np.zeros(64, dtype=np.int64)
    for seq in sequences:
        index = codon_indices(seq)
        total += np.bincount(index[index >= 0], minlength=64)
    return {codon: int(n) for codon, n in zip(CODONS, total)}


class CodonWeightedMLMCollator(MLMCollator):
    """CodonFM's codon-weighted masking: each codon is selected with probability ``mlm_probability x w`` clipped to
    ``[min_probability, max_probability]`` (0.05, 0.4), where ``w`` is its token's weight
    (:func:`codon_weights_from_counts`) divided by the mean weight of its sequence's codons, so every sequence keeps ~15 % selected on average while rare
    codons are selected more often. Selected codons then follow the usual 80 / 10 / 10 (``<mask>`` / a random codon /
    unchanged); special tokens are never selected.

    One divergence from CodonFM (``mlm_memmap.process_item``): the per-sequence mean is over the codons only; CodonFM
    includes ``<UNK>`` positions in it (with weight 0) and can select them (at the 0.05 floor), where bioscale never
    selects a special token. Padded and packed batches give each sequence its own mean (rows, or ``cu_seq_lens_q``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mlm_probability: float = 0.15,
        *,
        codon_weights: np.ndarray,
        min_probability: float = 0.05,
        max_probability: float = 0.4,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, mlm_probability, **kwargs)
        weights = np.asarray(codon_weights, dtype=np.float64)
        if weights.shape != (len(CODON_VOCAB),):
            raise ValueError(f"codon_weights must have one weight per token ({len(CODON_VOCAB)}), got {weights.shape}")
        if not 0.0 <= min_probability <= max_probability <= 1.0:
            raise ValueError(
                f"need 0 <= min_probability <= max_probability <= 1, got {min_probability}, {max_probability}"
            )
        self.codon_weights = weights
        self.min_probability = min_probability
        self.max_probability = max_probability

    def selection_probability(self, ids: np.ndarray, sequence_index: np.ndarray) -> np.ndarray:
        """Per-token selection probability for ``ids`` (any shape), ``sequence_index`` (same shape) naming the
        sequence each token belongs to; 0 at special tokens."""
        regular = ~np.isin(ids, self.special_token_ids)
        weights = self.codon_weights[ids]
        num_sequences = int(sequence_index.max()) + 1 if sequence_index.size else 0
        sums = np.bincount(sequence_index[regular], weights[regular], minlength=num_sequences)
        counts = np.bincount(sequence_index[regular], minlength=num_sequences)
        mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        seq_mean = mean[sequence_index]
        relative = np.divide(weights, seq_mean, out=np.ones_like(weights), where=seq_mean > 0)
        probability = np.clip(self.mlm_probability * relative, self.min_probability, self.max_probability)
        return np.where(regular, probability, 0.0)

    def apply(self, batch: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        rng = self._rng if rng is None else rng
        input_ids = batch["input_ids"]
        assert isinstance(input_ids, torch.Tensor)
        ids = input_ids.numpy().copy()
        cu = batch.get("cu_seq_lens_q")
        if isinstance(cu, torch.Tensor):  # packed [1, T]: sequence of each token from the boundaries
            positions = np.arange(ids.shape[-1])
            sequence_index = np.searchsorted(cu.numpy()[1:], positions, side="right").reshape(ids.shape)
        else:  # padded [B, S]: one sequence per row
            sequence_index = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        selected = rng.random(ids.shape) < self.selection_probability(ids, sequence_index)
        # From here on exactly MLMCollator.apply's 80 / 10 / 10, with the same random draws.
        action = rng.random(ids.shape)
        labels = np.where(selected, ids, IGNORE_INDEX)
        ids[selected & (action < 0.8)] = self.mask_token_id
        randomize = selected & (action >= 0.8) & (action < 0.9)
        ids[randomize] = rng.choice(self.random_token_ids, size=int(randomize.sum()))
        batch["input_ids"] = torch.from_numpy(ids)
        batch["labels"] = torch.from_numpy(labels)
        return batch


# ---- CDS FASTA and the demo corpus -----------------------------------------------------------------------------------


def write_cds_fasta(records: Iterable[tuple[str, str]], path: str | os.PathLike[str], *, width: int = 60) -> Path:
    """Write ``(header, sequence)`` records as FASTA to ``path`` atomically (a temporary file renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for header, seq in records:
                f.write(f">{header}\n")
                for start in range(0, len(seq), width):
                    f.write(seq[start : start + width] + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def predict_cds(genome: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """The genes ``pyrodigal`` predicts on the contigs of the FASTA file ``genome`` (trained on the genome itself,
    Prodigal's single-genome mode), as ``(header, CDS)``: header ``<contig>_<n> # begin # end # strand # partial=..
    start_type=..`` as Prodigal writes it, the CDS on the coding strand from its start codon to its stop codon."""
    import pyrodigal

    contigs = [(record_id, seq) for record_id, seq in read_fasta(genome) if seq]
    if not contigs:
        raise ValueError(f"{genome}: no sequence to predict genes on")
    finder = pyrodigal.GeneFinder()
    finder.train(*(seq for _, seq in contigs))
    for contig_id, seq in contigs:
        for number, gene in enumerate(finder.find_genes(seq), start=1):
            partial = f"{int(gene.partial_begin)}{int(gene.partial_end)}"
            header = (f"{contig_id}_{number} # {gene.begin} # {gene.end} # {gene.strand} # partial={partial} "
                      f"start_type={gene.start_type}")  # fmt: skip
            yield header, gene.sequence()


def _cache_dir() -> Path:
    root = os.environ.get("BIOSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bioscale")
    return Path(root) / "demo"


def demo_cds_corpus(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The demo CDS FASTA: the genes ``pyrodigal`` predicts on the *C. diphtheriae* NCTC11397 chromosome its wheel
    ships (2,343 CDS with pyrodigal 3.7: 730k codons, 30-2,978 codons each, each from its start to its stop codon).

    Written once (about 2 s) to ``cache_dir`` (default ``$BIOSCALE_CACHE/demo`` or ``~/.cache/bioscale/demo``; the
    system's temporary directory when that is not writable), named by the pyrodigal version, and reused.
    """
    import pyrodigal

    genome = demo_corpus("dna")
    name = f"pyrodigal-{pyrodigal.__version__}_{genome.name.split('.fna')[0]}_cds.fna"
    fallback = Path(tempfile.gettempdir()) / "bioscale-demo"
    candidates = [Path(cache_dir)] if cache_dir is not None else [_cache_dir(), fallback]
    for folder in candidates:
        path = folder / name
        if path.is_file():
            return path
    last_error: OSError | None = None
    for folder in candidates:
        try:
            return write_cds_fasta(predict_cds(genome), folder / name)
        except OSError as err:  # a read-only home: try the next folder
            last_error = err
    raise ValueError(f"cannot write the demo CDS corpus to any of {[str(c) for c in candidates]}: {last_error}")


__all__ = [
    "CDS_CHECKS",
    "START_CODONS",
    "STOP_CODONS",
    "CdsPolicy",
    "CodonTokenEncoder",
    "CodonWeightedMLMCollator",
    "check_codon_vocabulary",
    "codon_indices",
    "codon_weights_from_counts",
    "count_codons",
    "demo_cds_corpus",
    "load_codon_weights",
    "predict_cds",
    "write_cds_fasta",
]

