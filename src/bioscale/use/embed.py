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
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.models import spec_for_model
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
    """

    ids: list[str]
    pooled: np.ndarray
    lengths: np.ndarray
    per_residue: list[np.ndarray] | None
    pooling: str
    num_windowed: int = 0
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Chunk:
    """One model input: residues ``[start, end)`` of sequence ``seq``, with its special tokens around them."""

    seq: int
    start: int
    end: int
    token_ids: list[int]
    residue_weights: np.ndarray  # [end - start]: 1 / (number of windows covering the residue)
    cls_weight: float  # 1 / (number of windows of the sequence)


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer puts before and after a sequence (ESM-2: ``[<cls>]``, ``[<eos>]``)."""
    probe = next(
        tok
        for tok in tokenizer.get_vocab()
        if len(tok) == 1 and tok.isalpha() and tok not in tokenizer.all_special_tokens
    )
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    if len(core) != 1 or core[0] not in full:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not character-level: {probe!r} -> {core}")
    at = full.index(core[0])
    return list(full[:at]), list(full[at + 1 :])


def tokenize_residues(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[str], sequences: Sequence[str]
) -> list[list[int]]:
    """One token id per residue (no special tokens); ``ValueError`` if the tokenizer is not character-level.

    Residues outside the vocabulary become ``<unk>``; a warning reports how many sequences contain one.
    """
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
    """Cut sequences into model inputs per the long-sequence policy (see the module docstring).

    Returns ``(chunks, embedded_lengths, num_windowed, num_truncated)``.
    """
    if long_sequences not in ("window", "truncate", "error"):
        raise ValueError(f"long_sequences must be 'window', 'truncate' or 'error', got {long_sequences!r}")
    if not 0 <= overlap < window:
        raise ValueError(f"window_overlap must be in [0, {window}) for a window of {window} residues, got {overlap}")
    chunks: list[_Chunk] = []
    lengths = np.zeros(len(residue_ids), dtype=np.int64)
    num_windowed = num_truncated = 0
    for seq, (record_id, tokens) in enumerate(zip(ids, residue_ids)):
        length = len(tokens)
        if length > window:
            if long_sequences == "error":
                raise ValueError(
                    f"sequence {record_id!r} has {length} residues, more than the model's context of {window}; use "
                    "long_sequences='window' or 'truncate'"
                )
            if long_sequences == "truncate":
                tokens, length = tokens[:window], window
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
                    token_ids=prefix + list(tokens[start:end]) + suffix,
                    residue_weights=1.0 / coverage[start:end],
                    cls_weight=1.0 / len(starts),
                )
            )
    return chunks, lengths, num_windowed, num_truncated


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
) -> Embeddings:
    """Embed protein (ESM-2) or DNA (Llama 3) sequences.

    Args:
        model: a loaded bioscale model (any head: the base model is used) or a checkpoint directory / Hub id.
            A loaded model is moved to ``device`` / ``dtype`` in place and put in eval mode.
        sequences: a FASTA / parquet / CSV path, a list of sequences, ``(id, sequence)`` pairs or ``{id: sequence}``.
        tokenizer: defaults to the checkpoint's tokenizer (when ``model`` is a path) or the family's bioscale one.
        pooling: ``"mean"`` over residues (special tokens and padding excluded) or ``"cls"`` (the ``<cls>`` token;
            bidirectional models only: in a causal model the first token sees nothing else).
        per_residue: also return one vector per residue.
        max_tokens_per_batch: token budget per forward (default 32,768 on GPU, 4,096 on CPU; padded batches count
            their padding). Must hold at least one full context window.
        max_length: context in tokens, special tokens included (default: the model's trained maximum).
        long_sequences: ``"window"``, ``"truncate"`` or ``"error"`` (see the module docstring).
        window_overlap: residues shared by consecutive windows (default: a quarter of the window).
        batching: ``"packed"``, ``"padded"`` or ``"auto"`` (packed where the varlen kernel runs).
        device, dtype: default CUDA + bf16 when available, else CPU + float32.
        sequence_column, id_column: column names for parquet/CSV input (default: ``sequence``/``id`` variants).
        progress: show a progress bar on stderr.

    Raises:
        ValueError: empty or unreadable input, an unknown model path, a non-character-level tokenizer, a sequence
            longer than the context with ``long_sequences="error"``, or ``"cls"`` pooling on a causal model.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
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
    if pooling == "cls" and not prefix:
        raise ValueError("pooling='cls' needs a tokenizer that puts a <cls> token before each sequence")
    window = context_residues(model, len(prefix) + len(suffix), max_length)
    overlap = window // 4 if window_overlap is None else window_overlap
    residue_ids = tokenize_residues(tokenizer, ids, seqs)
    chunks, lengths, num_windowed, num_truncated = plan_chunks(
        ids, residue_ids, prefix=prefix, suffix=suffix, window=window, overlap=overlap, long_sequences=long_sequences
    )
    if num_truncated:
        warnings.warn(
            f"{num_truncated} of {len(ids)} sequences are longer than the model's context ({window} residues) and "
            "were truncated to their first residues (long_sequences='truncate')",
            stacklevel=2,
        )

    batching = resolve_batching(batching, device, dtype)
    budget = max_tokens_per_batch or default_max_tokens(device)
    longest = max(len(c.token_ids) for c in chunks)
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

    batches = plan_batches([len(c.token_ids) for c in chunks], budget, padded=batching == "padded")
    bar = tqdm(total=len(ids), unit="seq", desc="embed", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    remaining_chunks = np.bincount([c.seq for c in chunks], minlength=len(ids))

    def finish(pending: _PendingBatch) -> None:
        pending.add_to(pooled, residues)
        done = np.bincount([c.seq for c in pending.chunks], minlength=len(ids))
        remaining_chunks[:] -= done
        bar.update(int(((remaining_chunks == 0) & (done > 0)).sum()))

    # One batch in flight: batch i's forward is queued on the GPU before batch i-1's results are read on the host,
    # so collating the next batch and the host-side bookkeeping overlap with GPU compute.
    in_flight: _PendingBatch | None = None
    for indices in batches:
        batch_chunks = [chunks[i] for i in indices]
        token_lists = [c.token_ids for c in batch_chunks]
        if batching == "packed":
            batch = collate_packed(token_lists, device=device)
        else:
            batch = collate_padded(token_lists, pad_token_id=pad_id, device=device)
        hidden = batch.flatten(encoder(**batch.inputs).last_hidden_state)  # [T_real, hidden]
        launched = _reduce_on_device(batch, hidden, batch_chunks, pooling, len(prefix), per_residue)
        if in_flight is not None:
            finish(in_flight)
        in_flight = launched
    if in_flight is not None:
        finish(in_flight)
    bar.close()

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


def _reduce_on_device(
    batch: ModelBatch, hidden: torch.Tensor, chunks: list[_Chunk], pooling: str, prefix_len: int, per_residue: bool
) -> _PendingBatch:
    """Reduce one batch's hidden states ``[T_real, hidden]`` to one weighted sum per chunk, on the device, and start
    copying the results to the host without waiting for them.

    Each token carries a weight: ``1 / coverage`` on residues for mean pooling (so a residue seen by two windows
    counts once), ``1 / num_windows`` on the ``<cls>`` token for cls pooling, 0 on other special tokens. Sums are
    float32 whatever the model dtype.
    """
    weights = np.zeros(hidden.shape[0], dtype=np.float32)
    offset = 0
    spans: list[tuple[int, int]] = []  # where each chunk's residues sit in ``hidden``
    for chunk in chunks:
        first = offset + prefix_len
        last = first + (chunk.end - chunk.start)
        if pooling == "mean":
            weights[first:last] = chunk.residue_weights
        else:
            weights[offset] = chunk.cls_weight
        spans.append((first, last))
        offset += len(chunk.token_ids)
    assert offset == hidden.shape[0], (offset, hidden.shape)
    hidden = hidden.float()
    token_weights = torch.from_numpy(weights).to(hidden.device, non_blocking=True)
    sums = torch.zeros(len(chunks), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, batch.token_example, hidden * token_weights[:, None])
    asynchronous = hidden.device.type == "cuda"
    # non_blocking device->host copies land in pinned memory; the event says when they are complete.
    sums_host = sums.to("cpu", non_blocking=asynchronous)
    states_host = hidden.to("cpu", non_blocking=asynchronous) if per_residue else None
    event = None
    if asynchronous:
        event = torch.cuda.Event()
        event.record()
    return _PendingBatch(chunks=chunks, sums=sums_host, residue_states=states_host, spans=spans, event=event)


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
