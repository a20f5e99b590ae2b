"""Language-model quality on held-out sequences: masked-LM perplexity (proteins), per-token NLL and bits per base (DNA).

Masked-LM perplexity depends on which tokens are masked, so the masking here is *fixed*: sequence ``i`` is masked by
a generator seeded from ``(seed, i)``, with the training recipe's statistics (15% of residues selected; of those 80%
``<mask>``, 10% a random canonical residue, 10% unchanged). Two checkpoints evaluated with the same seed therefore
see exactly the same masked inputs, and the number does not depend on batch size or device. Perplexity is
``exp(total NLL / number of masked tokens)`` over the whole set (not a mean of per-sequence perplexities).

For a causal model every residue is scored given the ones before it (the first from ``<bos>``); predictions of
special tokens (``<eos>``) are not scored, so ``bits_per_base`` is exactly the cost of the bases.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bioscale.eval.scoring_inputs import chunk_sequence, encode, padded_batches, resolve_device, special_token_count
from bioscale.data.tokenizers import canonical_token_ids


def _generator(seed: int, index: int) -> torch.Generator:
    # A hash, not seed * K + index: no two (seed, index) pairs collide and any int seed is accepted.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def fixed_mlm_masking(
    token_ids: np.ndarray | torch.Tensor,
    *,
    seed: int,
    index: int,
    special_token_ids: Sequence[int],
    mask_token_id: int,
    random_token_ids: Sequence[int],
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` for one sequence, a pure function of ``(token_ids, seed, index)``.

    Special tokens are never selected; ``labels`` is ``-100`` except at selected positions.
    """
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    g = _generator(seed, index)
    n = ids.numel()
    maskable = ~torch.isin(ids, torch.tensor(list(special_token_ids), dtype=torch.long))
    selected = (torch.rand(n, generator=g) < mlm_probability) & maskable
    action = torch.rand(n, generator=g)
    random_ids = torch.tensor(list(random_token_ids), dtype=torch.long)
    random_draw = random_ids[torch.randint(len(random_ids), (n,), generator=g)]
    inputs = ids.clone()
    use_mask = selected & (action < mask_replace_prob)
    use_random = selected & (action >= mask_replace_prob) & (action < mask_replace_prob + random_replace_prob)
    inputs[use_mask] = mask_token_id
    inputs[use_random] = random_draw[use_random]
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return inputs, labels


def _forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast_dtype):
    device = input_ids.device
    if autocast_dtype is not None:
        with torch.autocast(device.type, dtype=autocast_dtype):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def _prepare(sequences: Sequence[str], tokenizer, max_length: int) -> tuple[list[np.ndarray], int]:
    num_special = special_token_count(tokenizer)
    if max_length <= num_special:
        raise ValueError(f"max_length={max_length} leaves no room for residues next to {num_special} special tokens")
    chunks = [piece for seq in sequences for piece in chunk_sequence(seq, max_length - num_special) if piece]
    if not chunks:
        raise ValueError("no sequences to evaluate (all empty)")
    return encode(tokenizer, chunks), len(chunks)


@torch.no_grad()
def masked_lm_perplexity(
    model: torch.nn.Module,
    sequences: Sequence[str],
    tokenizer,
    *,
    max_length: int = 1024,
    mlm_probability: float = 0.15,
    seed: int = 0,
    random_token_ids: Sequence[int] | None = None,
    max_tokens_per_batch: int = 16_384,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a masked LM on ``sequences`` under fixed, seeded masking.

    Args:
        max_length: tokens per model call, special tokens included (ESM-2: 1024); longer sequences are cut into
            chunks scored independently.
        random_token_ids: ids the 10% random replacement draws from (default: the canonical residues, as in training).
        autocast_dtype: e.g. ``torch.bfloat16`` to run under autocast on GPU; ``None`` runs in the model's dtype.

    Returns:
        ``perplexity``, ``nll_per_token`` (nats per masked token), ``accuracy`` (top-1 at masked positions),
        ``num_masked_tokens``, ``num_sequences``, ``num_chunks``.
    """

    if tokenizer.mask_token_id is None:
        raise ValueError("masked-LM perplexity needs a tokenizer with a mask token")
    device = resolve_device(device)
    token_lists, num_chunks = _prepare(sequences, tokenizer, max_length)
    random_ids = list(random_token_ids) if random_token_ids is not None else canonical_token_ids(tokenizer, "protein")
    masked = [
        fixed_mlm_masking(
            ids, seed=seed, index=i, special_token_ids=tokenizer.all_special_ids, mask_token_id=tokenizer.mask_token_id,
            random_token_ids=random_ids, mlm_probability=mlm_probability,
        )
        for i, ids in enumerate(token_lists)
    ]
    was_training = model.training
    model.eval()
    total_nll, total_count, total_correct = 0.0, 0, 0
    inputs_only = [m[0].numpy() for m in masked]
    batches = padded_batches(inputs_only, max_tokens=max_tokens_per_batch, pad_token_id=tokenizer.pad_token_id)
    with tqdm(total=num_chunks, desc="perplexity", unit="seq", disable=not progress, leave=False) as bar:
        for indices, input_ids, attention_mask in batches:
            labels = torch.full_like(input_ids, -100)
            for row, i in enumerate(indices):
                labels[row, : masked[i][1].numel()] = masked[i][1]
            input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
            logits = _forward_logits(model, input_ids, attention_mask, autocast_dtype)
            scored = labels != -100
            target = labels[scored]
            picked = logits[scored]
            total_nll += F.cross_entropy(picked, target, reduction="sum").item()
            total_correct += int((picked.argmax(-1) == target).sum().item())
            total_count += int(target.numel())
            bar.update(len(indices))
    model.train(was_training)
    if total_count == 0:
        raise ValueError(f"no token was masked: the sequences are too short for mlm_probability={mlm_probability}")
    nll = total_nll / total_count
    return {
        "perplexity": math.exp(nll),
        "nll_per_token": nll,
        "accuracy": total_correct / total_count,
        "num_masked_tokens": total_count,
        "num_sequences": len(sequences),
        "num_chunks": num_chunks,
        "mlm_probability": mlm_probability,
        "masking_seed": seed,
    }


@torch.no_grad()
def causal_lm_nll(
    model: torch.nn.Module,
    sequences: Sequence[str],
    tokenizer,
    *,
    max_length: int = 8192,
    max_tokens_per_batch: int = 65_536,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-token negative log-likelihood of a causal LM on ``sequences``, in nats and in bits per base.

    Every non-special token is scored given everything before it in its chunk (the first from ``<bos>``).

    Returns:
        ``nll_per_token`` (nats), ``bits_per_base`` (``nll / ln 2``), ``perplexity``, ``accuracy`` (next-token
        top-1), ``num_tokens`` (bases scored), ``num_sequences``, ``num_chunks``.
    """
    device = resolve_device(device)
    token_lists, num_chunks = _prepare(sequences, tokenizer, max_length)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    was_training = model.training
    model.eval()
    total_nll, total_count, total_correct = 0.0, 0, 0
    batches = padded_batches(token_lists, max_tokens=max_tokens_per_batch, pad_token_id=tokenizer.pad_token_id)
    with tqdm(total=num_chunks, desc="nll", unit="seq", disable=not progress, leave=False) as bar:
        for indices, input_ids, attention_mask in batches:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = _forward_logits(model, input_ids, attention_mask, autocast_dtype)[:, :-1]
            target = input_ids[:, 1:]
            scored = attention_mask[:, 1:].bool() & ~torch.isin(target, special.to(device))
            picked, target = logits[scored], target[scored]
            total_nll += F.cross_entropy(picked, target, reduction="sum").item()
            total_correct += int((picked.argmax(-1) == target).sum().item())
            total_count += int(target.numel())
            bar.update(len(indices))
    model.train(was_training)
    if total_count == 0:
        raise ValueError("no base to score: every sequence is empty")
    nll = total_nll / total_count
    return {
        "nll_per_token": nll,
        "bits_per_base": nll / math.log(2.0),
        "perplexity": math.exp(nll),
        "accuracy": total_correct / total_count,
        "num_tokens": total_count,
        "num_sequences": len(sequences),
        "num_chunks": num_chunks,
    }
