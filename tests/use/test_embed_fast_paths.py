"""The embedding fast paths change no number: the background-prefetch pipeline (collation, pinned buffers, pooling
weights in a thread; forwards without per-batch host syncs) gives bit for bit what the serial loop of the previous
implementation gave, for packed and padded batches, windows and per-residue output; the DNA tokenizers still put
``<bos>`` and ``<eos>`` around an embedded sequence; budgets from free GPU memory stay in their bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bioscale.data.tokenizers import nucleotide_ascii_tokenizer, nucleotide_tokenizer
from bioscale.use import embed, load_model
from bioscale.use.batching import collate_packed, collate_padded, plan_batches
from bioscale.use.embed import (
    MAX_AUTO_TOKENS,
    _prefetched,
    auto_max_tokens,
    base_model_of,
    context_residues,
    plan_chunks,
    special_affixes,
    tokenize_residues,
)

from .conftest import PROTEINS


def _previous_implementation(model, tokenizer, sequences: dict[str, str], *, batching: str, budget: int,
                             max_length: int, per_residue: bool) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """The serial loop ``embed`` ran before the prefetch pipeline (2026-12), mean pooling: tokenise, cut into
    windows, plan, collate, forward (input checks on), reduce with per-token weights, accumulate."""
    ids, seqs = list(sequences), list(sequences.values())
    encoder = base_model_of(model)
    prefix, suffix = special_affixes(tokenizer)
    window = context_residues(model, len(prefix) + len(suffix), max_length)
    chunks, lengths, _, _ = plan_chunks(ids, tokenize_residues(tokenizer, ids, seqs), prefix=prefix, suffix=suffix,
                                        window=window, overlap=window // 4, long_sequences="window")  # fmt: skip
    hidden_size = model.config.hidden_size
    pooled = np.zeros((len(ids), hidden_size), dtype=np.float32)
    residues = [np.zeros((int(n), hidden_size), dtype=np.float32) for n in lengths]
    for indices in plan_batches([len(c.token_ids) for c in chunks], budget, padded=batching == "padded"):
        batch_chunks = [chunks[i] for i in indices]
        tokens = [c.token_ids for c in batch_chunks]
        batch = collate_packed(tokens) if batching == "packed" else collate_padded(tokens, pad_token_id=1)
        with torch.inference_mode():
            hidden = batch.flatten(encoder(**batch.inputs).last_hidden_state).float()
        weights = np.zeros(hidden.shape[0], dtype=np.float32)
        offset, spans = 0, []
        for chunk in batch_chunks:
            first = offset + len(prefix)
            weights[first : first + chunk.end - chunk.start] = chunk.residue_weights
            spans.append((first, first + chunk.end - chunk.start))
            offset += len(chunk.token_ids)
        sums = torch.zeros(len(batch_chunks), hidden_size).index_add_(
            0, batch.token_example, hidden * torch.from_numpy(weights)[:, None]
        )
        for row, (chunk, (first, last)) in enumerate(zip(batch_chunks, spans)):
            pooled[chunk.seq] += sums[row].numpy()
            residues[chunk.seq][chunk.start : chunk.end] += hidden[first:last].numpy() * chunk.residue_weights[:, None]
    return pooled / lengths[:, None].astype(np.float32), residues


@pytest.mark.parametrize("batching", ["packed", "padded"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["inline", "prefetch-thread"])
def test_pipeline_equals_the_previous_serial_loop_bit_for_bit(esm_dir: Path, batching: str, prefetch: bool) -> None:
    loaded = load_model(esm_dir, task="base")
    # A 40-token context: hba, hbb and spike (92-107 residues) are windowed; a 96-token budget: several batches.
    kwargs = dict(batching=batching, max_length=40, per_residue=True)
    reference_pooled, reference_residues = _previous_implementation(loaded.model, loaded.tokenizer, PROTEINS,
                                                                    budget=96, **kwargs)  # fmt: skip
    ours = embed(loaded.model, PROTEINS, tokenizer=loaded.tokenizer, max_tokens_per_batch=96, prefetch=prefetch,
                 device="cpu", dtype=torch.float32, progress=False, **kwargs)  # fmt: skip
    assert ours.num_windowed == 3
    np.testing.assert_array_equal(ours.pooled, reference_pooled)
    for got, expected in zip(ours.per_residue, reference_residues):
        np.testing.assert_array_equal(got, expected)


def test_dna_embedding_keeps_bos_and_eos_around_the_bases(llama_dir: Path) -> None:
    """The DNA tokenizers no longer append <eos> to tokenizer(text), but an embedded sequence is still wrapped as in
    training (<bos> bases <eos>), so windows and embeddings are those of before."""
    assert special_affixes(nucleotide_tokenizer()) == ([0], [2])
    assert special_affixes(nucleotide_ascii_tokenizer()) == ([2], [0])
    result = embed(llama_dir, {"a": "ACGTACGTTTGACC", "b": "GGN"}, device="cpu", progress=False, per_residue=True)
    assert [len(r) for r in result.per_residue] == [14, 3]


def test_prefetch_thread_raises_in_the_caller_and_stops() -> None:
    def prepare(indices: list[int]):
        if indices == [2]:
            raise ValueError("bad batch 2")
        return indices

    seen = []
    with pytest.raises(ValueError, match="bad batch 2"):
        with _prefetched(prepare, [[0], [1], [2], [3]], enabled=True) as batches:
            for batch in batches:
                seen.append(batch)
    assert seen == [[0], [1]]
    with _prefetched(prepare, [[0], [1], [3]], enabled=True) as batches:  # leaving early does not hang
        assert next(iter(batches)) == [0]


def test_auto_budget_from_free_gpu_memory(esm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(esm_dir).model
    assert auto_max_tokens(model, torch.device("cpu"), torch.float32) == 4096
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    cuda = torch.device("cuda")
    free["bytes"] = 2**20  # almost nothing free: never below the fixed default
    assert auto_max_tokens(model, cuda, torch.bfloat16) == 32768
    free["bytes"] = 120 * 2**30  # an idle H200: capped
    assert auto_max_tokens(model, cuda, torch.bfloat16) == MAX_AUTO_TOKENS
    free["bytes"] = 2**30  # a debug model in 1 GiB: in between, from the activation estimate
    per_token = 2 * ((6 * 64 + 2 * model.config.intermediate_size) * 2 + 8 * 64)
    assert auto_max_tokens(model, cuda, torch.bfloat16) == min(MAX_AUTO_TOKENS, max(32768, 2**29 // per_token))
