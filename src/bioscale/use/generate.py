"""DNA generation with a causal bioscale model (Llama 3): ``bioscale generate`` and :func:`generate_dna`.

A thin layer over the model's own ``generate()`` (``transformers``' ``GenerationMixin`` with a KV cache), which
the model implements so that greedy output equals that of the same weights converted to ``LlamaForCausalLM``.
This module adds what a DNA user needs around it: prompts checked against the tokenizer's nucleotide alphabet (a
``ValueError`` names the first bad character and its position), batched prompts of different lengths left-padded
with an attention mask, greedy or sampled decoding (temperature, top-k, top-p, several samples per prompt, a seed),
generation restricted to nucleotides and ``<eos>`` (the model's other special tokens are suppressed, so the output
is always DNA), and decoding back to strings with timing for tokens/s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from bioscale.models import spec_for_model
from bioscale.use.embed import default_device, default_dtype, special_affixes
from bioscale.use.loading import default_tokenizer, load_model


@dataclass
class GeneratedSequence:
    """One sample: ``generated`` holds only the new bases (the prompt is not repeated)."""

    prompt_index: int
    sample_index: int
    prompt: str
    generated: str
    num_new_tokens: int
    stopped_at_eos: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """Samples in prompt-major order (all samples of prompt 0, then prompt 1...) and throughput."""

    samples: list[GeneratedSequence]
    elapsed_s: float
    num_new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def residue_alphabet(tokenizer: PreTrainedTokenizerBase) -> str:
    """The single-character, non-special tokens of ``tokenizer`` (the nucleotide tokenizer: ACGTN + IUPAC codes)."""
    special = set(tokenizer.all_special_tokens)
    return "".join(sorted(t for t in tokenizer.get_vocab() if len(t) == 1 and t not in special))


def validate_prompt(prompt: str, alphabet: str, *, index: int = 0) -> str:
    """``prompt`` upper-cased, surrounding whitespace removed; ``ValueError`` naming the first invalid character."""
    cleaned = prompt.strip().upper()
    for position, char in enumerate(cleaned):
        if char not in alphabet:
            raise ValueError(
                f"prompt {index}: character {char!r} at position {position + 1} is not a valid base "
                f"(allowed: {alphabet})"
            )
    return cleaned


def encode_prompts(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, S]``: each prompt is ``<bos>`` + its bases (no
    ``<eos>``: the model continues the sequence)."""
    prefix, _ = special_affixes(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    rows = [prefix + list(ids) for ids in encoded]
    if any(len(row) == 0 for row in rows):
        raise ValueError("an empty prompt needs a tokenizer with a <bos> token to start from")
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row) :] = torch.tensor(row)
        attention_mask[i, longest - len(row) :] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def generate_dna(
    model: PreTrainedModel | str | Path,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    stop_at_eos: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> GenerationResult:
    """Continue DNA prompts with a causal model.

    Args:
        model: a loaded Llama 3 bioscale model (``ForCausalLM``) or a checkpoint directory / Hub id (bioscale or
            plain ``transformers`` Llama). A loaded model is moved to ``device`` / ``dtype`` in place.
        prompts: one prompt or a list (different lengths are fine; an empty prompt starts from ``<bos>``).
        max_new_tokens: bases to generate per sample (fewer when ``<eos>`` is produced and ``stop_at_eos``).
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy decoding.
        num_samples: samples per prompt (greedy decoding gives identical samples).
        seed: seeds torch's generators before sampling, for reproducible samples.
        stop_at_eos: stop a sample at ``<eos>``; ``False`` forbids ``<eos>`` so every sample has exactly
            ``max_new_tokens`` bases.
        device, dtype: default CUDA + bf16 when available, else CPU + float32.

    Raises:
        ValueError: invalid prompt characters (naming prompt, character and position), a non-causal model,
            ``max_new_tokens < 1``, or invalid sampling parameters.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if isinstance(model, (str, Path)):
        loaded = load_model(model, task="causal_lm", device=device, dtype=dtype)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    else:
        model.to(device=device, dtype=dtype)
    spec = spec_for_model(model)
    # A bioscale causal LM, or the stock transformers class a causal family converts to (a baseline, an export).
    with_head = spec.task_of(type(model)) == "causal_lm" or type(model).__name__.endswith("ForCausalLM")
    if not spec.causal or not with_head or not hasattr(model, "generate"):
        raise ValueError(f"generation needs a causal model with its LM head, got {type(model).__name__}")
    model.eval()
    tokenizer = tokenizer or default_tokenizer(spec.name)
    alphabet = residue_alphabet(tokenizer)
    cleaned = [validate_prompt(p, alphabet, index=i) for i, p in enumerate(prompts)]

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    input_ids, attention_mask = encode_prompts(cleaned, tokenizer, pad_token_id=pad_id)
    # Only bases (and <eos> when it may end a sample) can be generated: <bos>/<pad>/<mask>/<unk> never are.
    vocab = tokenizer.get_vocab()
    allowed = {vocab[c] for c in alphabet} | ({eos_id} if stop_at_eos and eos_id is not None else set())
    suppress = sorted(i for i in range(int(model.config.vocab_size)) if i not in allowed)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_samples,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id if stop_at_eos else None,
        suppress_tokens=suppress or None,
        **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {"top_k": None}),
    )
    if seed is not None:
        torch.manual_seed(seed)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start

    new_tokens = output[:, input_ids.shape[1] :].cpu().tolist()
    id_to_token = {i: t for t, i in vocab.items()}
    samples: list[GeneratedSequence] = []
    total = 0
    for row, tokens in enumerate(new_tokens):
        prompt_index, sample_index = divmod(row, num_samples)
        stopped = False
        bases = []
        for token in tokens:
            if stop_at_eos and token == eos_id:
                stopped = True
                break
            bases.append(id_to_token[token])
        total += len(bases) + int(stopped)
        samples.append(
            GeneratedSequence(
                prompt_index=prompt_index,
                sample_index=sample_index,
                prompt=cleaned[prompt_index],
                generated="".join(bases),
                num_new_tokens=len(bases) + int(stopped),
                stopped_at_eos=stopped,
            )
        )
    return GenerationResult(samples=samples, elapsed_s=elapsed, num_new_tokens=total)
