"""Zero-shot variant scoring with a masked language model: the masked log-likelihood ratio of a substitution.

For a sequence and a substitution ``REF<position>ALT`` (1-based; a codon ``GAA12GAT`` for a codon model such as
EnCodon, a residue ``E12D`` for ESM-2 or AMPLIFY), the score is

    log p(ALT | sequence with position masked) - log p(REF | sequence with position masked)

(the "masked marginal" of Meier et al., 2021; CodonFM's ``predict_mutation`` reports the same two log-likelihoods and
their difference ``ref - alt``: bioscale's sign makes a substitution the model finds likelier positive). One masked
copy of the sequence is scored per distinct position, so every substitution at a position shares one forward; the
copies of all records are batched under a token budget, packed back to back (``cu_seq_lens``) where the varlen kernel
runs and padded elsewhere, and the language-model head runs only at the masked positions. The result equals one
forward per variant (tested).

:func:`score_variants` is the Python entry point, :func:`score_main` the ``bioscale score`` command. Bad input raises
``ValueError`` naming the record and the position: a reference codon / residue that is not the sequence's, a position
outside the sequence, an alternative that is not a token of the model, a CDS whose length is not a multiple of 3, a
sequence longer than the model's context.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.tokenizers import token_unit
from bioscale.models import spec_for_model
from bioscale.use.batching import collate_packed, collate_padded, plan_batches
from bioscale.use.embed import default_max_tokens, resolve_batching

_SUBSTITUTION = re.compile(r"^\s*([A-Za-z*]+)\s*(\d+)\s*([A-Za-z*]+)\s*$")
_ARROW = re.compile(r"^\s*(\d+)\s*:\s*([A-Za-z*]+)\s*>\s*([A-Za-z*]+)\s*$")


@dataclass(frozen=True)
class Substitution:
    """``ref`` replaced by ``alt`` at 1-based ``position`` (in codons for a codon model, residues otherwise)."""

    position: int
    ref: str
    alt: str

    @classmethod
    def parse(cls, text: str | Substitution) -> Substitution:
        """``"GAA12GAT"`` / ``"E12D"`` or ``"12:GAA>GAT"``; ``ValueError`` for anything else."""
        if isinstance(text, Substitution):
            return text
        match = _SUBSTITUTION.match(text)
        if match is not None:
            ref, position, alt = match.groups()
        elif (match := _ARROW.match(text)) is not None:
            position, ref, alt = match.groups()
        else:
            raise ValueError(f"substitution {text!r}: expected REF<position>ALT (GAA12GAT, E12D) or <position>:REF>ALT")
        if len(ref) != len(alt):
            raise ValueError(f"substitution {text!r}: reference {ref!r} and alternative {alt!r} differ in length")
        return cls(int(position), ref.upper(), alt.upper())

    def __str__(self) -> str:
        return f"{self.ref}{self.position}{self.alt}"


@dataclass(frozen=True)
class VariantScore:
    """One scored substitution: the masked log-probabilities of both tokens and ``score = alt_log_prob -
    ref_log_prob``."""

    record: str
    substitution: str
    position: int
    ref: str
    alt: str
    ref_log_prob: float
    alt_log_prob: float
    score: float


@dataclass(frozen=True)
class _Site:
    """One masked copy to score: the record's token ids with ``token_index`` masked."""

    record_index: int
    token_index: int


def _normalise(text: str, unit: int) -> str:
    text = "".join(text.split()).upper()
    return text.replace("U", "T") if unit == 3 else text


def _max_tokens_of(model: PreTrainedModel) -> int | None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    return int(positions) - spec_for_model(model).position_offset


class _Record:
    """A sequence ready for scoring: its token ids, where its units start, and its units as strings."""

    def __init__(
        self, record_id: str, sequence: str, tokenizer: PreTrainedTokenizerBase, unit: int, max_tokens: int | None
    ) -> None:
        self.record_id = record_id
        clean = _normalise(sequence, unit)
        what = "codon" if unit == 3 else "residue"
        if not clean:
            raise ValueError(f"record {record_id!r}: empty sequence")
        if len(clean) % unit:
            raise ValueError(
                f"record {record_id!r}: a coding sequence of {len(clean)} bases is not a whole number of codons "
                f"({len(clean) % unit} trailing base(s) at position {len(clean) - len(clean) % unit + 1})"
            )
        encoded = tokenizer(clean, add_special_tokens=True, return_special_tokens_mask=True, verbose=False)
        ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
        num_units = len(clean) // unit
        regular = [i for i, s in enumerate(special) if not s]
        if len(regular) != num_units:
            raise ValueError(
                f"record {record_id!r}: the tokenizer made {len(regular)} {what} tokens from {num_units} {what}s"
            )
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(
                f"record {record_id!r}: {len(ids)} tokens ({num_units} {what}s and special tokens) exceed the model's "
                f"context of {max_tokens} tokens; score a window of the sequence around the substitutions"
            )
        self.ids = ids
        self.first = regular[0]
        self.units = [clean[i * unit : (i + 1) * unit] for i in range(num_units)]
        self.what = what


def _resolve(
    record: _Record, substitution: Substitution, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, int, int]:
    """``(token_index, ref_id, alt_id)`` of ``substitution`` in ``record``; ``ValueError`` naming both otherwise."""
    where = f"record {record.record_id!r}, substitution {substitution}"
    count = len(record.units)
    if not 1 <= substitution.position <= count:
        raise ValueError(f"{where}: position {substitution.position} is out of range 1..{count} ({record.what}s)")
    unit = len(record.units[0])
    ref, alt = _normalise(substitution.ref, unit), _normalise(substitution.alt, unit)
    if len(ref) != unit:
        raise ValueError(f"{where}: the reference must be one {record.what} ({unit} character(s)), got {ref!r}")
    actual = record.units[substitution.position - 1]
    if ref != actual:
        raise ValueError(f"{where}: the reference {record.what} at position {substitution.position} is {actual!r}, "
                         f"not {ref!r}")  # fmt: skip
    token_index = record.first + substitution.position - 1
    ref_id = record.ids[token_index]
    alt_id = tokenizer.convert_tokens_to_ids(alt)
    unk = tokenizer.unk_token_id
    if ref_id == unk:
        raise ValueError(f"{where}: the reference {record.what} {ref!r} is <unk> to the model: nothing to compare")
    if alt_id is None or alt_id == unk or alt_id in tokenizer.all_special_ids:
        raise ValueError(f"{where}: the alternative {alt!r} is not a {record.what} token of the model's vocabulary")
    return token_index, ref_id, int(alt_id)


def _accepts(model: PreTrainedModel, name: str) -> bool:
    # A forward parameter, or a keyword option the model declares (bioscale.models.hf_contract: options whose names
    # contain "label" are keywords, so that transformers' Trainer does not take them for labels).
    return name in inspect.signature(model.forward).parameters or name in getattr(model, "forward_options", ())


@torch.inference_mode()
def score_variants(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    variants: Iterable[tuple[str, str, Sequence[str | Substitution]]] | Mapping[str, tuple[str, Sequence[str]]],
    *,
    max_tokens_per_batch: int | None = None,
    batching: str = "auto",
) -> list[VariantScore]:
    """Score substitutions with a masked LM, in the order given.

    Args:
        model: a bioscale masked LM (``EnCodonForMaskedLM``, ``Esm2ForMaskedLM``, ``AmplifyForMaskedLM``), on the
            device and in the dtype to run in.
        tokenizer: its tokenizer; the codon tokenizer makes positions codon indices, a residue tokenizer residues.
        variants: ``(record_id, sequence, substitutions)`` triples (or ``{record_id: (sequence, substitutions)}``),
            substitutions as ``"GAA12GAT"`` / ``"E12D"`` / ``"12:GAA>GAT"`` strings or :class:`Substitution`.
        max_tokens_per_batch: token budget per forward (default 32,768 on GPU, 4,096 on CPU).
        batching: ``"packed"``, ``"padded"`` or ``"auto"`` (packed where the varlen kernel runs).

    Raises:
        ValueError: naming the record and position (see the module docstring), or a model without a mask token.
    """
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no mask token: variant scoring needs a masked LM")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    batching = resolve_batching(batching, device, dtype)
    budget = max_tokens_per_batch or default_max_tokens(device)
    unit, max_tokens = token_unit(tokenizer), _max_tokens_of(model)
    items = [(k, *v) for k, v in variants.items()] if isinstance(variants, Mapping) else list(variants)

    records: list[_Record] = []
    sites: dict[tuple[int, int], int] = {}  # (record, token index) -> index into site_list
    site_list: list[_Site] = []
    requests: list[tuple[int, Substitution, int, int, int]] = []  # record, substitution, site, ref id, alt id
    for record_index, (record_id, sequence, substitutions) in enumerate(items):
        record = _Record(str(record_id), sequence, tokenizer, unit, max_tokens)
        records.append(record)
        for text in substitutions:
            substitution = Substitution.parse(text)
            token_index, ref_id, alt_id = _resolve(record, substitution, tokenizer)
            key = (record_index, token_index)
            if key not in sites:
                sites[key] = len(site_list)
                site_list.append(_Site(record_index, token_index))
            requests.append((record_index, substitution, sites[key], ref_id, alt_id))
    if not requests:
        return []

    log_probs: list[torch.Tensor | None] = [None] * len(site_list)  # [V] float32 per site, on the host
    lengths = [len(records[s.record_index].ids) for s in site_list]
    on_labels = _accepts(model, "logits_on_labels_only")
    for batch_sites in plan_batches(lengths, budget, padded=batching == "padded"):
        token_ids, labels = [], []
        for index in batch_sites:
            site = site_list[index]
            ids = list(records[site.record_index].ids)
            target = ids[site.token_index]
            ids[site.token_index] = mask_id
            row_labels = [-100] * len(ids)
            row_labels[site.token_index] = target
            token_ids.append(ids)
            labels.append(row_labels)
        if batching == "packed":
            batch = collate_packed(token_ids, labels=labels, device=device)
        else:
            batch = collate_padded(token_ids, pad_token_id=tokenizer.pad_token_id, labels=labels, device=device)
        inputs = dict(batch.inputs)
        label_tensor = inputs.pop("labels")
        if on_labels:  # the head runs only at the masked positions, one row per site, in batch order
            logits = model(**inputs, labels=label_tensor, logits_on_labels_only=True).logits
        else:
            logits = batch.flatten(model(**inputs).logits)[batch.flatten(label_tensor) != -100]
        assert logits.shape[0] == len(batch_sites), (logits.shape, len(batch_sites))
        rows = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, index in enumerate(batch_sites):
            log_probs[index] = rows[row]

    scores = []
    for record_index, substitution, site_index, ref_id, alt_id in requests:
        row = log_probs[site_index]
        assert row is not None
        ref_lp, alt_lp = float(row[ref_id]), float(row[alt_id])
        scores.append(
            VariantScore(
                record=records[record_index].record_id,
                substitution=str(substitution),
                position=substitution.position,
                ref=substitution.ref,
                alt=substitution.alt,
                ref_log_prob=ref_lp,
                alt_log_prob=alt_lp,
                score=alt_lp - ref_lp,
            )
        )
    return scores


def score_substitutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sequence: str,
    substitutions: Sequence[str | Substitution],
    *,
    record: str = "sequence",
    **kwargs: Any,
) -> list[VariantScore]:
    """:func:`score_variants` for one sequence."""
    return score_variants(model, tokenizer, [(record, sequence, substitutions)], **kwargs)


# ---- bioscale score ------------------------------------------------------------------------------------------------


def read_variant_table(path: str | Path) -> list[tuple[str | None, str]]:
    """``(record or None, substitution)`` rows of a CSV / TSV file with a ``substitution`` (or ``variant`` /
    ``mutation``) column and optionally a ``record`` (or ``id``) column, or of a plain text file with one
    ``[record<TAB>]substitution`` per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"variants file {str(path)!r} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise ValueError(f"variants file {str(path)!r} has no variants")
    delimiter = "\t" if "\t" in lines[0] or path.suffix.lower() == ".tsv" else ","
    header = [cell.strip().lower() for cell in lines[0].split(delimiter)]
    sub_col = next((header.index(n) for n in ("substitution", "variant", "mutation") if n in header), None)
    if sub_col is None:  # no header: "[record<TAB>]substitution" lines
        rows = [line.split("\t") if "\t" in line else line.split(",") for line in lines]
        return [(cells[0].strip(), cells[1].strip()) if len(cells) > 1 else (None, cells[0].strip()) for cells in rows]
    rec_col = next((header.index(n) for n in ("record", "id", "sequence_id") if n in header), None)
    out: list[tuple[str | None, str]] = []
    for row in csv.reader(lines[1:], delimiter=delimiter):
        out.append((row[rec_col].strip() if rec_col is not None else None, row[sub_col].strip()))
    return out


def score_main(argv: list[str]) -> int:
    """``bioscale score MODEL INPUT --variant GAA12GAT ... [--variants FILE] [-o OUT.tsv]``."""
    parser = argparse.ArgumentParser(
        prog="bioscale score",
        description="Zero-shot variant scores: the masked log-likelihood ratio log p(alt) - log p(ref) of codon "
        "(EnCodon) or amino-acid (ESM-2, AMPLIFY) substitutions.",
    )
    parser.add_argument("model", help="masked-LM checkpoint directory (bioscale, CodonFM, ESM-2, AMPLIFY) or Hub id")
    parser.add_argument("input", help="FASTA / parquet / CSV of the sequences (CDS for a codon model)")
    parser.add_argument("--variant", action="append", default=[],
                        help="a substitution, GAA12GAT / E12D, or RECORD:GAA12GAT; repeatable")  # fmt: skip
    parser.add_argument("--variants", default=None,
                        help="CSV/TSV with a substitution column (and a record column), or one per line")  # fmt: skip
    parser.add_argument("-o", "--output", default=None, help="OUT.tsv (default: stdout)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="token budget per forward")
    parser.add_argument("--batching", choices=("auto", "packed", "padded"), default="auto")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args(argv)
    try:
        from bioscale.use.embed import default_device, default_dtype
        from bioscale.use.inputs import read_sequences
        from bioscale.use.loading import load_model

        ids, sequences = read_sequences(args.input)
        by_id = dict(zip(ids, sequences))
        wanted: list[tuple[str | None, str]] = []
        for text in args.variant:  # "SUB", "RECORD:SUB" (a record id without ':'), "12:GAA>GAT"
            head, sep, tail = text.partition(":")
            named = bool(sep) and not head.strip().isdigit()
            wanted.append((head.strip(), tail) if named else (None, text))
        if args.variants is not None:
            wanted += read_variant_table(args.variants)
        if not wanted:
            raise ValueError("no substitutions given: pass --variant SUB (repeatable) or --variants FILE")
        grouped: dict[str, list[str]] = {}
        for record, sub in wanted:
            if record is None:
                if len(ids) != 1:
                    raise ValueError(f"substitution {sub!r} names no record but {args.input!r} has {len(ids)}; "
                                     "write RECORD:SUB or add a record column")  # fmt: skip
                record = ids[0]
            if record not in by_id:
                raise ValueError(f"substitution {sub!r}: record {record!r} is not in {args.input!r}")
            grouped.setdefault(record, []).append(sub)
        device = torch.device(args.device) if args.device else default_device()
        dtypes = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                  "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
        if args.dtype is not None and args.dtype not in dtypes:
            raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {args.dtype!r}")
        dtype = dtypes[args.dtype] if args.dtype else default_dtype(device)
        loaded = load_model(args.model, task="masked_lm", device=device, dtype=dtype)
        scores = score_variants(loaded.model, loaded.tokenizer,
                                [(record, by_id[record], subs) for record, subs in grouped.items()],
                                max_tokens_per_batch=args.max_tokens_per_batch, batching=args.batching)  # fmt: skip
    except (ValueError, ImportError) as err:
        print(f"bioscale score: error: {err}", file=sys.stderr)
        return 2
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.DictWriter(out, fieldnames=list(VariantScore.__dataclass_fields__), delimiter="\t")
        writer.writeheader()
        for score in scores:
            row = asdict(score)
            row.update({k: f"{row[k]:.6g}" for k in ("ref_log_prob", "alt_log_prob", "score") if math.isfinite(row[k])})
            writer.writerow(row)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


__all__ = ["Substitution", "VariantScore", "read_variant_table", "score_main", "score_substitutions", "score_variants",
           "token_unit"]  # fmt: skip
