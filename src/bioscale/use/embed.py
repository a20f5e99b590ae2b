"""Sequence embeddings from a trained encoder: ``bioscale embed`` and :func:`embed`.

For each input sequence, :func:`embed` returns one pooled vector (mean over the sequence's residues, or the ``<cls>``
token) and optionally one vector per residue, taken from the base model's ``last_hidden_state`` (after ESM-2's final
LayerNorm). Special tokens (``<cls>``/``<bos>``, ``<eos>``) and padding never enter a mean. Sequences are batched by a
token budget: *packed* (all sequences of a batch in one row, attention kept inside each sequence by
``cu_seq_lens``) where the flash varlen kernel runs (CUDA, bf16/fp16), else *padded* (length-sorted, so padding stays
small; the CPU path). Both give the same numbers as embedding each sequence alone (tested).

Sequences longer than the model's context are handled by a stated policy (``long_sequences``), never dropped:

- ``"window"`` (default): overlapping windows of the context length, each with its own special tokens, starting every
  ``window - overlap`` residues, the last one aligned to the sequence end. A residue's embedding is the mean over
  the windows that contain it; the pooled mean is the mean of those residue embeddings; ``cls`` pooling averages the
  windows' ``<cls>`` vectors.
- ``"truncate"``: keep the first ``window`` residues (a warning gives the count).
- ``"error"``: raise ``ValueError`` naming the sequence.

The context length defaults to the model's trained maximum (ESM-2: 1,022 residues + ``<cls>`` + ``<eos>``).

Keeping the device busy (measured 2026-12-02 on an H200: ESM-2 650M at 175k tokens/s against a ~600k compute ceiling;
the gap was host work the GPU waited for). Before the first forward only residue counts are computed; each batch is
tokenised (lookup table), collated and copied into pinned buffers in a background thread (``prefetch``), two
batches ahead; forwards run without the model's per-batch input checks (a host sync each, which drained the queue
between batches; the tokenizer's ids are checked against the vocabulary once instead); pooled sums are reduced on
the device and copied back asynchronously while the next batch runs (one batch in flight). The budget per forward on
CUDA comes from the free memory (:func:`auto_max_tokens`), and the blocks can be compiled (``compile``). None of this
changes a number (tested bit for bit against the serial loop).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.cds import CodonTokenEncoder, clean_coding_sequences
from bioscale.data.tokenizers import CharTokenEncoder, record_affixes, token_unit
from bioscale.models import input_validation, spec_for_model
from bioscale.use.batching import ModelBatch, collate_packed, collate_padded, plan_batches
from bioscale.use.inputs import SequencesLike, read_sequences
from bioscale.use.loading import default_tokenizer, family_of_model, load_config, load_model
from bioscale.models.attention import varlen_available

Pooling = Literal["mean", "cls"]
LongSequences = Literal["window", "truncate", "error"]
Batching = Literal["auto", "packed", "padded"]

# HF/fair-esm ESM-2 configs say max_position_embeddings = 1026: ESM-1b's learned positions were offset by the
# padding index (+2), and ESM-2 kept the number although it uses RoPE. ESM-2 trained on 1,024-token crops.


@dataclass
class Embeddings:
    """What :func:`embed` returns, in input order.

    Attributes:
        ids: sequence ids (FASTA headers up to the first space, the table's id column, or ``seq<i>``).
        pooled: ``[N, hidden]`` float32, one vector per sequence.
        lengths: ``[N]`` residues embedded per sequence (shorter than the input only under ``"truncate"``).
        per_residue: with ``per_residue=True``, one ``[length_i, hidden]`` float32 array per sequence; else ``None``.
        pooling: ``"mean"`` or ``"cls"``.
        num_windowed: sequences longer than the context that were embedded in overlapping windows.
        num_truncated: sequences that were truncated (``long_sequences="truncate"``).
        num_left_out: inputs with nothing to embed, counted rather than dropped silently (cells without a gene of
            the vocabulary: :func:`bioscale.use.embed_cells.embed_cells`).
    """

    ids: list[str]
    pooled: np.ndarray
    lengths: np.ndarray
    per_residue: list[np.ndarray] | None
    pooling: str
    num_windowed: int = 0
    num_truncated: int = 0
    num_left_out: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Chunk:
    """One model input: residues ``[start, end)`` of sequence ``seq``, with its special tokens around them
    (``num_tokens`` in all; ``token_ids`` filled when the chunk's batch is prepared, or by :func:`plan_chunks`)."""

    seq: int
    start: int
    end: int
    token_ids: list[int] | None
    residue_weights: np.ndarray  # [end - start]: 1 / (number of windows covering the residue)
    cls_weight: float  # 1 / (number of windows of the sequence)
    num_tokens: int = 0


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids around each sequence (ESM-2: ``[<cls>]``, ``[<eos>]``; the DNA tokenizers: ``[<bos>]``, ``[<eos>]``).

    The special tokens the training pipeline puts around a record (``bioscale.data.tokenizers.record_affixes``), so
    a model embeds sequences as it saw them in training; ``ValueError`` for a tokenizer that is not
    character-level.
    """
    return record_affixes(tokenizer)


def tokenize_residues(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[str], sequences: Sequence[str]
) -> list[list[int]]:
    """One token id per residue (no special tokens); ``ValueError`` if the tokenizer is not character-level.

    Residues outside the vocabulary become ``<unk>``; a warning reports how many sequences contain one. For the codon
    tokenizer a residue is a codon: the sequences are cleaned as coding sequences first
    (:func:`bioscale.data.cds.clean_coding_sequences`, which warns with its counts).
    """
    if token_unit(tokenizer) == 3:
        codons = CodonTokenEncoder(tokenizer)
        return [codons.encode(seq)[1:-1].tolist() for seq in clean_coding_sequences(ids, sequences)]
    # verbose=False: sequences longer than model_max_length are expected here (they are windowed afterwards).
    encoded = tokenizer(list(sequences), add_special_tokens=False, verbose=False)["input_ids"]
    unk = tokenizer.unk_token_id
    num_with_unknown = 0
    for record_id, sequence, token_ids in zip(ids, sequences, encoded):
        if len(token_ids) != len(sequence):
            raise ValueError(
                f"sequence {record_id!r}: the tokenizer made {len(token_ids)} tokens from {len(sequence)} residues; "
                "bioscale needs a character-level tokenizer (one token per residue)"
            )
        if unk is not None and unk in token_ids:
            num_with_unknown += 1
    if num_with_unknown:
        warnings.warn(
            f"{num_with_unknown} of {len(sequences)} sequences contain characters outside the model's vocabulary; "
            "they are embedded as <unk>",
            stacklevel=3,
        )
    return encoded


def context_residues(model: PreTrainedModel, num_special: int, max_length: int | None) -> int:
    """Residues per model input: ``max_length`` (tokens, special ones included) or the model's trained maximum."""
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 1024))
        max_length -= spec_for_model(model).position_offset
    residues = max_length - num_special
    if residues < 1:
        raise ValueError(f"max_length={max_length} leaves no room for residues next to {num_special} special tokens")
    return residues


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start of each window of ``window`` residues covering ``[0, length)``; the last window ends at ``length``."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def plan_chunks(
    ids: Sequence[str],
    residue_ids: Sequence[list[int]],
    *,
    prefix: list[int],
    suffix: list[int],
    window: int,
    overlap: int,
    long_sequences: str,
) -> tuple[list[_Chunk], np.ndarray, int, int]:
    """Cut tokenised sequences into model inputs per the long-sequence policy (see the module docstring).

    Returns ``(chunks, embedded_lengths, num_windowed, num_truncated)``; each chunk holds its token ids.
    """
    chunks, lengths, num_windowed, num_truncated = plan_windows(
        ids, [len(t) for t in residue_ids], num_special=len(prefix) + len(suffix), window=window, overlap=overlap,
        long_sequences=long_sequences,
    )  # fmt: skip
    for chunk in chunks:
        chunk.token_ids = prefix + list(residue_ids[chunk.seq][chunk.start : chunk.end]) + suffix
    return chunks, lengths, num_windowed, num_truncated


def plan_windows(
    ids: Sequence[str],
    residue_counts: Sequence[int],
    *,
    num_special: int,
    window: int,
    overlap: int,
    long_sequences: str,
) -> tuple[list[_Chunk], np.ndarray, int, int]:
    """:func:`plan_chunks` from residue counts alone (the chunks' ``token_ids`` stay ``None``), so the tokenisation
    can happen later, batch by batch, beside the device work."""
    if long_sequences not in ("window", "truncate", "error"):
        raise ValueError(f"long_sequences must be 'window', 'truncate' or 'error', got {long_sequences!r}")
    if not 0 <= overlap < window:
        raise ValueError(f"window_overlap must be in [0, {window}) for a window of {window} residues, got {overlap}")
    chunks: list[_Chunk] = []
    lengths = np.zeros(len(residue_counts), dtype=np.int64)
    num_windowed = num_truncated = 0
    for seq, (record_id, length) in enumerate(zip(ids, residue_counts)):
        if length > window:
            if long_sequences == "error":
                raise ValueError(
                    f"sequence {record_id!r} has {length} residues, more than the model's context of {window}; use "
                    "long_sequences='window' or 'truncate'"
                )
            if long_sequences == "truncate":
                length = window
                num_truncated += 1
            else:
                num_windowed += 1
        lengths[seq] = length
        starts = window_starts(length, window, overlap)
        coverage = np.zeros(length, dtype=np.float32)
        for start in starts:
            coverage[start : start + window] += 1
        for start in starts:
            end = min(start + window, length)
            chunks.append(
                _Chunk(
                    seq=seq,
                    start=start,
                    end=end,
                    token_ids=None,
                    residue_weights=1.0 / coverage[start:end],
                    cls_weight=1.0 / len(starts),
                    num_tokens=end - start + num_special,
                )
            )
    return chunks, lengths, num_windowed, num_truncated


class _CodonEncoder:
    """Token ids of the codons of a cleaned coding sequence (:class:`~bioscale.data.cds.CodonTokenEncoder`, no special
    tokens); the interface of :class:`_ResidueEncoder`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.codons = CodonTokenEncoder(tokenizer)
        self.unk = tokenizer.unk_token_id
        self.with_unknown: set[int] = set()

    def __call__(self, seq: int, record_id: str, text: str) -> list[int]:
        ids = self.codons.encode(text)[1:-1].tolist()
        if self.unk in ids:
            self.with_unknown.add(seq)
        return ids


class _ResidueEncoder:
    """Token ids of residues, thread-safe: the lookup table of :class:`~bioscale.data.tokenizers.CharTokenEncoder`
    (the tokenizer's own ids, ~50x faster) for ASCII text, the tokenizer otherwise (checked to be one token per
    residue). Records which sequences held a character outside the vocabulary (``<unk>``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        try:
            self.lut: np.ndarray | None = CharTokenEncoder(tokenizer).lut
        except ValueError:  # not a lookup-table tokenizer: call it (the length check below still applies)
            self.lut = None
        self.unk = tokenizer.unk_token_id
        self.with_unknown: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, seq: int, record_id: str, text: str) -> list[int]:
        if self.lut is not None and text.isascii():
            ids = self.lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)].tolist()
        else:
            with self._lock:  # one tokenizer object: not shared between threads concurrently
                ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) != len(text):
                raise ValueError(
                    f"sequence {record_id!r}: the tokenizer made {len(ids)} tokens from {len(text)} residues; "
                    "bioscale needs a character-level tokenizer (one token per residue)"
                )
        if self.unk is not None and self.unk in ids:
            self.with_unknown.add(seq)
        return ids


def base_model_of(model: PreTrainedModel) -> PreTrainedModel:
    """The encoder/decoder without head (``model.esm`` / ``model.model``), or ``model`` when it is one."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, PreTrainedModel) else model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (inference needs no float32 master weights), float32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_batching(batching: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"`` -> ``"packed"`` where the varlen kernel runs, else ``"padded"``.

    On CPU (and in float32) a packed batch would run ``sdpa`` over a dense block-diagonal mask, computing attention
    between every pair of tokens of the batch; length-sorted padded batches compute far less there.
    """
    if batching not in ("auto", "packed", "padded"):
        raise ValueError(f"batching must be 'auto', 'packed' or 'padded', got {batching!r}")
    if batching != "auto":
        return batching

    return "packed" if varlen_available(device, dtype) else "padded"


def default_max_tokens(device: torch.device) -> int:
    return 32768 if device.type == "cuda" else 4096


# Automatic token budgets on CUDA (auto_max_tokens): at least the fixed default, at most this (past ~256k tokens a
# forward's GEMMs are long saturated; a larger batch only delays the first result and grows pinned host buffers).
MAX_AUTO_TOKENS = 262144
# compile=None compiles the blocks only for inputs this large (tokens): compiling 33 ESM-2 blocks costs tens of
# seconds, which a few million tokens at ~200k tokens/s do not pay back.
AUTO_COMPILE_MIN_TOKENS = 1 << 23


def auto_max_tokens(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> int:
    """A token budget per forward from the free memory of ``device`` (CUDA; elsewhere :func:`default_max_tokens`).

    Activations live one block at a time in inference: per token about ``(6 * hidden + 2 * intermediate)`` values of
    ``dtype`` (residual, norm, q/k/v, attention output, the MLP's two wide tensors), plus the float32 copy the pooling
    reduces; twice that for headroom (allocator fragmentation, kernels' workspaces). Half the free memory is used.
    """
    if device.type != "cuda":
        return default_max_tokens(device)
    hidden = int(model.config.hidden_size)
    intermediate = int(getattr(model.config, "intermediate_size", 4 * hidden))
    item = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * ((6 * hidden + 2 * intermediate) * item + 8 * hidden)
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * 0.5) // per_token
    return int(min(MAX_AUTO_TOKENS, max(default_max_tokens(device), budget)))


@torch.inference_mode()
def embed(
    model: PreTrainedModel | str | Path,
    sequences: SequencesLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    pooling: Pooling = "mean",
    per_residue: bool = False,
    max_tokens_per_batch: int | None = None,
    max_length: int | None = None,
    long_sequences: LongSequences = "window",
    window_overlap: int | None = None,
    batching: Batching = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    sequence_column: str | None = None,
    id_column: str | None = None,
    progress: bool = True,
    compile: bool | None = None,
    prefetch: bool | None = None,
) -> Embeddings:
    """Embed protein (ESM-2, AMPLIFY), DNA (Llama 3) or coding sequences (CodonFM EnCodon: one "residue" per codon).

    Args:
        model: a loaded bioscale model (any head: the base model is used) or a checkpoint directory / Hub id.
            A loaded model is moved to ``device`` / ``dtype`` in place and put in eval mode.
        sequences: a FASTA / parquet / CSV path, a list of sequences, ``(id, sequence)`` pairs or ``{id: sequence}``.
        tokenizer: defaults to the checkpoint's tokenizer (when ``model`` is a path) or the family's bioscale one.
        pooling: ``"mean"`` over residues (special tokens and padding excluded) or ``"cls"`` (the ``<cls>`` token;
            bidirectional models only: in a causal model the first token sees nothing else).
        per_residue: also return one vector per residue.
        max_tokens_per_batch: token budget per forward (default on GPU: from the free memory, 32,768 to 262,144
            (:func:`auto_max_tokens`); 4,096 on CPU; padded batches count their padding). Must hold at least one full
            context window.
        max_length: context in tokens, special tokens included (default: the model's trained maximum).
        long_sequences: ``"window"``, ``"truncate"`` or ``"error"`` (see the module docstring).
        window_overlap: residues shared by consecutive windows (default: a quarter of the window).
        batching: ``"packed"``, ``"padded"`` or ``"auto"`` (packed where the varlen kernel runs).
        device, dtype: default CUDA + bf16 when available, else CPU + float32.
        sequence_column, id_column: column names for parquet/CSV input (default: ``sequence``/``id`` variants).
        progress: show a progress bar on stderr.
        compile: ``torch.compile`` the encoder's blocks in place (``nn.Module.compile``, dynamic shapes) before
            running packed batches; ``None``: on CUDA for inputs of at least 8M tokens, where the compile pays.
        prefetch: prepare batches (tokenisation, collation, pinned host buffers, pooling weights) in a background
            thread while the device runs the previous ones; ``None``: on CUDA.

    Raises:
        ValueError: empty or unreadable input, an unknown model path, a non-character-level tokenizer, a sequence
            longer than the context with ``long_sequences="error"``, or ``"cls"`` pooling on a causal model.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    # Single cells (an .h5ad of counts or a tokenized parquet, or a Geneformer): one vector per cell, keyed by cell id.
    from bioscale.use.embed_cells import embed_cells, is_cell_input, is_cell_model  # built on this module

    if is_cell_input(sequences) or is_cell_model(model):
        if per_residue:
            raise ValueError("per_residue=True: per-gene embeddings of cells are not supported; embed cells pooled")
        return embed_cells(
            model, sequences, tokenizer=tokenizer, pooling=pooling, cell_id_column=id_column,
            input_ids_column=sequence_column or "input_ids", max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch, batching=batching, device=device, dtype=dtype, progress=progress,
        )  # fmt: skip
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if isinstance(model, (str, Path)):
        load_config(model)  # a bad model path fails here, before the input is read
    # The input is read before the weights are loaded, so a bad file fails in seconds, not after loading 650M weights.
    ids, seqs = read_sequences(sequences, sequence_column=sequence_column, id_column=id_column)
    if isinstance(model, (str, Path)):
        loaded = load_model(model, task="base", device=device, dtype=dtype)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    else:
        model.to(device=device, dtype=dtype)
    family = family_of_model(model)
    if pooling == "cls" and spec_for_model(model).causal:
        raise ValueError(
            f"pooling='cls' needs a bidirectional encoder; {family} is causal (its first token sees nothing after "
            "it): use pooling='mean'"
        )
    tokenizer = tokenizer or default_tokenizer(family)
    encoder = base_model_of(model).eval()

    prefix, suffix = special_affixes(tokenizer)
    # Characters per residue: 3 for a codon model, whose "residues" are codons (cleaned as coding sequences here,
    # with a counted warning; per-residue outputs are per codon).
    unit = token_unit(tokenizer)
    if unit == 3:
        seqs = clean_coding_sequences(ids, seqs)
    if pooling == "cls" and not prefix:
        raise ValueError("pooling='cls' needs a tokenizer that puts a <cls> token before each sequence")
    window = context_residues(model, len(prefix) + len(suffix), max_length)
    overlap = window // 4 if window_overlap is None else window_overlap
    # Only the residue counts now (one token per residue: a character-level tokenizer, checked as each batch is
    # tokenised); the token ids come batch by batch, in the prefetch thread, beside the device work.
    chunks, lengths, num_windowed, num_truncated = plan_windows(
        ids, [len(s) // unit for s in seqs], num_special=len(prefix) + len(suffix), window=window, overlap=overlap,
        long_sequences=long_sequences,
    )  # fmt: skip
    if num_truncated:
        warnings.warn(
            f"{num_truncated} of {len(ids)} sequences are longer than the model's context ({window} residues) and "
            "were truncated to their first residues (long_sequences='truncate')",
            stacklevel=2,
        )

    batching = resolve_batching(batching, device, dtype)
    budget = max_tokens_per_batch or auto_max_tokens(model, device, dtype)
    longest = max(c.num_tokens for c in chunks)
    if budget < longest:
        raise ValueError(
            f"max_tokens_per_batch={budget} is smaller than the longest model input ({longest} tokens); raise it or "
            "lower max_length"
        )
    hidden_size = int(model.config.hidden_size)
    pooled = np.zeros((len(ids), hidden_size), dtype=np.float32)
    residues = [np.zeros((int(n), hidden_size), dtype=np.float32) for n in lengths] if per_residue else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    from tqdm.auto import tqdm

    batches = plan_batches([c.num_tokens for c in chunks], budget, padded=batching == "padded")
    bar = tqdm(total=len(ids), unit="seq", desc="embed", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    remaining_chunks = np.bincount([c.seq for c in chunks], minlength=len(ids))

    def finish(pending: _PendingBatch) -> None:
        pending.add_to(pooled, residues)
        done = np.bincount([c.seq for c in pending.chunks], minlength=len(ids))
        remaining_chunks[:] -= done
        bar.update(int(((remaining_chunks == 0) & (done > 0)).sum()))

    num_tokens = sum(c.num_tokens for c in chunks)
    compiled = _compile_blocks(encoder, compile, device=device, batching=batching, num_tokens=num_tokens)
    # Every id the tokenizer makes is inside the model's vocabulary (checked once here), so the forward's per-batch
    # value checks, a host synchronisation each that would drain the GPU queue between batches, are skipped.
    validate = max(tokenizer.get_vocab().values()) >= int(model.config.vocab_size)
    encode = _CodonEncoder(tokenizer) if unit == 3 else _ResidueEncoder(tokenizer)

    def tokenize(chunk: _Chunk) -> list[int]:
        text = seqs[chunk.seq][chunk.start * unit : chunk.end * unit]
        return prefix + encode(chunk.seq, ids[chunk.seq], text) + suffix

    prepare = functools.partial(
        _prepare_batch, chunks=chunks, tokenize=tokenize, batching=batching, pad_id=pad_id, pooling=pooling,
        prefix_len=len(prefix), pin=device.type == "cuda", fixed_max_length=longest if compiled else None,
    )  # fmt: skip
    background = device.type == "cuda" if prefetch is None else prefetch
    # One batch in flight: batch i's forward is queued on the GPU before batch i-1's results are read on the host, and
    # batch i+1 is collated (in the background thread) meanwhile, so host work overlaps with GPU compute.
    in_flight: _PendingBatch | None = None
    with input_validation(validate), _prefetched(prepare, batches, enabled=background) as prepared:
        for host in prepared:
            batch = host.to(device)
            hidden = batch.flatten(encoder(**batch.inputs).last_hidden_state)  # [T_real, hidden]
            launched = _reduce_on_device(batch, hidden, host, per_residue)
            if in_flight is not None:
                finish(in_flight)
            in_flight = launched
    if in_flight is not None:
        finish(in_flight)
    bar.close()
    if encode.with_unknown and unit == 1:  # codons: clean_coding_sequences has counted them
        warnings.warn(
            f"{len(encode.with_unknown)} of {len(seqs)} sequences contain characters outside the model's vocabulary; "
            "they are embedded as <unk>",
            stacklevel=2,
        )

    if pooling == "mean":
        pooled /= lengths[:, None].astype(np.float32)
    return Embeddings(
        ids=ids,
        pooled=pooled,
        lengths=lengths,
        per_residue=residues,
        pooling=pooling,
        num_windowed=num_windowed,
        num_truncated=num_truncated,
    )


@dataclass
class _PendingBatch:
    """A batch's pooled sums (and residue states) being copied to the host; ``event`` marks the copies' end."""

    chunks: list[_Chunk]
    sums: torch.Tensor  # [num_chunks, hidden] float32, host
    residue_states: torch.Tensor | None  # [T_real, hidden] float32, host
    spans: list[tuple[int, int]]
    event: torch.cuda.Event | None

    def add_to(self, pooled: np.ndarray, residues: list[np.ndarray] | None) -> None:
        if self.event is not None:
            self.event.synchronize()
        sums = self.sums.numpy()
        for row, chunk in enumerate(self.chunks):
            pooled[chunk.seq] += sums[row]
        if residues is None:
            return
        assert self.residue_states is not None
        states = self.residue_states.numpy()
        for chunk, (first, last) in zip(self.chunks, self.spans):
            residues[chunk.seq][chunk.start : chunk.end] += states[first:last] * chunk.residue_weights[:, None]


@dataclass
class _HostBatch:
    """One batch ready on the host: model inputs (pinned when bound for CUDA), the per-token pooling weights and
    where each chunk's residues sit among the batch's real tokens."""

    chunks: list[_Chunk]
    batch: ModelBatch
    weights: torch.Tensor  # [T_real] float32
    spans: list[tuple[int, int]]

    def to(self, device: torch.device) -> ModelBatch:
        """The model batch on ``device`` (asynchronous copies from pinned memory); the weights travel with it."""
        self.weights = self.weights.to(device, non_blocking=True)
        moved = ModelBatch(
            inputs={k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in self.batch.inputs.items()},
            token_example=self.batch.token_example.to(device, non_blocking=True),
            token_mask=None if self.batch.token_mask is None else self.batch.token_mask.to(device, non_blocking=True),
        )  # fmt: skip
        if "cu_seq_lens_q" in moved.inputs and self.fixed_max_length:
            # Compiled blocks: a sequence count that changes per batch is a dynamic dimension, not a recompile.
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                torch._dynamo.maybe_mark_dynamic(moved.inputs[key], 0)
        return moved

    fixed_max_length: bool = False


def _prepare_batch(
    indices: list[int],
    *,
    chunks: list[_Chunk],
    tokenize: Callable[[_Chunk], list[int]],
    batching: str,
    pad_id: int,
    pooling: str,
    prefix_len: int,
    pin: bool,
    fixed_max_length: int | None,
) -> _HostBatch:
    """Tokenise and collate the chunks ``indices`` into a :class:`_HostBatch` (runs in the prefetch thread).

    Each token carries a pooling weight: ``1 / coverage`` on residues for mean pooling (so a residue seen by two
    windows counts once), ``1 / num_windows`` on the ``<cls>`` token for cls pooling, 0 on other special tokens.
    ``fixed_max_length``: compiled blocks see this constant ``max_length_q/k`` (an upper bound is all the varlen
    kernel needs) instead of a Python int that changes every batch and would recompile them.
    """
    batch_chunks = [chunks[i] for i in indices]
    # Tokenised here, batch by batch, and not kept: the host holds the ids of the batches in flight only.
    token_lists = [c.token_ids if c.token_ids is not None else tokenize(c) for c in batch_chunks]
    if batching == "packed":
        batch = collate_packed(token_lists)
        if fixed_max_length is not None:
            for key in ("max_length_q", "max_length_k"):
                batch.inputs[key] = max(int(batch.inputs[key]), fixed_max_length)
    else:
        batch = collate_padded(token_lists, pad_token_id=pad_id)
    total = sum(len(t) for t in token_lists)
    weights = np.zeros(total, dtype=np.float32)
    offset = 0
    spans: list[tuple[int, int]] = []  # where each chunk's residues sit among the real tokens
    for chunk in batch_chunks:
        first = offset + prefix_len
        last = first + (chunk.end - chunk.start)
        if pooling == "mean":
            weights[first:last] = chunk.residue_weights
        else:
            weights[offset] = chunk.cls_weight
        spans.append((first, last))
        offset += chunk.num_tokens
    token_weights = torch.from_numpy(weights)
    if pin:  # page-locked, so the host-to-device copies run asynchronously
        batch = ModelBatch(
            inputs={k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()},
            token_example=batch.token_example.pin_memory(),
            token_mask=None if batch.token_mask is None else batch.token_mask.pin_memory(),
        )
        token_weights = token_weights.pin_memory()
    return _HostBatch(chunks=batch_chunks, batch=batch, weights=token_weights, spans=spans,
                      fixed_max_length=fixed_max_length is not None)  # fmt: skip


@contextlib.contextmanager
def _prefetched(
    prepare: Callable[[list[int]], _HostBatch], batches: list[list[int]], *, enabled: bool, depth: int = 2
) -> Iterator[Iterator[_HostBatch]]:
    """``prepare(batch)`` for every batch, in order: in a background thread ``depth`` batches ahead when
    ``enabled`` (collation is Python and numpy work that would otherwise leave the GPU idle), else inline. An
    exception in the thread is raised in the caller at the batch that failed."""
    if not enabled:
        yield (prepare(b) for b in batches)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for indices in batches:
                if stop.is_set():
                    return
                ready.put(prepare(indices))
            ready.put(end)
        except BaseException as err:  # noqa: BLE001  (re-raised in the consumer)
            ready.put(err)

    thread = threading.Thread(target=work, name="bioscale-embed-prefetch", daemon=True)
    thread.start()

    def results() -> Iterator[_HostBatch]:
        while True:
            item = ready.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield results()
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _compile_blocks(
    encoder: PreTrainedModel, compile: bool | None, *, device: torch.device, batching: str, num_tokens: int
) -> bool:
    """Compile ``encoder``'s blocks in place (once) when asked, or by the ``compile=None`` rule; returns whether
    they are compiled."""
    if compile is None:
        compile = device.type == "cuda" and batching == "packed" and num_tokens >= AUTO_COMPILE_MIN_TOKENS
    if not compile:
        return False
    blocks = getattr(encoder, "layers", None)
    if blocks is None:
        raise ValueError(f"compile=True: {type(encoder).__name__} exposes no transformer blocks (`layers`)")
    # As training's apply_compile: nn.Module.compile keeps parameter names free of "_orig_mod."; dynamic shapes
    # because every packed batch has another token count.
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=True)
    return True


def _reduce_on_device(batch: ModelBatch, hidden: torch.Tensor, host: _HostBatch, per_residue: bool) -> _PendingBatch:
    """Reduce one batch's hidden states ``[T_real, hidden]`` to one weighted sum per chunk, on the device, and start
    copying the results to the host without waiting for them (weights: :func:`_prepare_batch`). Sums are float32
    whatever the model dtype.
    """
    assert host.weights.shape[0] == hidden.shape[0], (host.weights.shape, hidden.shape)
    hidden = hidden.float()
    token_weights = host.weights.to(hidden.device, non_blocking=True)
    sums = torch.zeros(len(host.chunks), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, batch.token_example, hidden * token_weights[:, None])
    asynchronous = hidden.device.type == "cuda"
    # non_blocking device->host copies land in pinned memory; the event says when they are complete.
    sums_host = sums.to("cpu", non_blocking=asynchronous)
    states_host = hidden.to("cpu", non_blocking=asynchronous) if per_residue else None
    event = None
    if asynchronous:
        event = torch.cuda.Event()
        event.record()
    return _PendingBatch(chunks=host.chunks, sums=sums_host, residue_states=states_host, spans=host.spans, event=event)


def write_embeddings(embeddings: Embeddings, path: str | Path) -> list[Path]:
    """Write ``embeddings`` to ``.parquet`` or ``.npy``; returns the files written.

    - ``.parquet``: one row per sequence with columns ``id``, ``length``, ``embedding`` (fixed-size list of float32)
      and, with per-residue embeddings, ``per_residue`` (list of fixed-size lists, ``length`` rows).
    - ``.npy``: ``OUT.npy`` holds the ``[N, hidden]`` pooled float32 array, ``OUT.ids.txt`` the ids (one per line,
      same order); with per-residue embeddings, ``OUT.per_residue.npy`` ``[sum(lengths), hidden]`` (all residues
      back to back) and ``OUT.offsets.npy`` ``[N + 1]`` int64, so sequence ``i`` is ``rows[offsets[i]:offsets[i+1]]``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".npy"):
        raise ValueError(f"output {str(path)!r} must end in .parquet or .npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = embeddings.pooled.shape[1]
    if suffix == ".npy":
        np.save(path, embeddings.pooled)
        ids_path = path.with_suffix(".ids.txt")
        ids_path.write_text("".join(f"{i}\n" for i in embeddings.ids))
        written = [path, ids_path]
        if embeddings.per_residue is not None:
            offsets = np.zeros(len(embeddings) + 1, dtype=np.int64)
            np.cumsum([len(r) for r in embeddings.per_residue], out=offsets[1:])
            rows_path, offsets_path = path.with_suffix(".per_residue.npy"), path.with_suffix(".offsets.npy")
            np.save(
                rows_path, np.concatenate(embeddings.per_residue) if embeddings.per_residue else np.zeros((0, hidden))
            )
            np.save(offsets_path, offsets)
            written += [rows_path, offsets_path]
        return written

    import pyarrow as pa
    import pyarrow.parquet as pq

    vector = pa.list_(pa.float32(), hidden)
    columns = {
        "id": pa.array(embeddings.ids, pa.string()),
        "length": pa.array(embeddings.lengths, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.pooled.reshape(-1), pa.float32()), hidden),
    }
    if embeddings.per_residue is not None:
        flat = pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(embeddings.per_residue).reshape(-1), pa.float32()), hidden
        )
        offsets = np.zeros(len(embeddings) + 1, dtype=np.int32)
        np.cumsum([len(r) for r in embeddings.per_residue], out=offsets[1:])
        columns["per_residue"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, type=pa.list_(vector))
    table = pa.table(columns)
    table = table.replace_schema_metadata({"bioscale.pooling": embeddings.pooling})
    pq.write_table(table, path)
    return [path]


def read_embeddings(path: str | Path) -> Embeddings:
    """Read back what :func:`write_embeddings` wrote (``.parquet`` or ``.npy`` with its side files)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embeddings file {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        pooled = np.load(path)
        ids = path.with_suffix(".ids.txt").read_text().splitlines()
        per_residue = None
        rows_path = path.with_suffix(".per_residue.npy")
        if rows_path.is_file():
            rows, offsets = np.load(rows_path), np.load(path.with_suffix(".offsets.npy"))
            per_residue = [rows[offsets[i] : offsets[i + 1]] for i in range(len(ids))]
        lengths = np.array([len(r) for r in per_residue]) if per_residue is not None else np.zeros(len(ids), np.int64)
        return Embeddings(ids=ids, pooled=pooled, lengths=lengths, per_residue=per_residue, pooling="unknown")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    hidden = table.schema.field("embedding").type.list_size
    pooled = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, hidden)
    per_residue = None
    if "per_residue" in table.column_names:
        column = table.column("per_residue").combine_chunks()
        offsets = column.offsets.to_numpy()
        rows = column.values.flatten().to_numpy().reshape(-1, hidden)
        per_residue = [rows[offsets[i] : offsets[i + 1]] for i in range(len(column))]
    metadata = table.schema.metadata or {}
    return Embeddings(
        ids=table.column("id").to_pylist(),
        pooled=pooled.astype(np.float32),
        lengths=table.column("length").to_numpy(),
        per_residue=per_residue,
        pooling=metadata.get(b"bioscale.pooling", b"unknown").decode(),
    )
