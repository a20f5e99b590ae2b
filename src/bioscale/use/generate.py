"""DNA generation with a causal bioscale model (Llama 3): ``bioscale generate`` and :func:`generate_dna`.

Two engines behind one function. ``"static"`` (the default for bioscale causal models,
:mod:`bioscale.use.generation_engine`): a preallocated KV cache, the decode step replayed as a CUDA graph, packed
prefill of prompts of different lengths, per-sample seeded sampling, per-sample stop at ``<eos>`` and refill of
finished slots when there are more samples than slots; its greedy output equals ``transformers``' token for token in
float32. ``"transformers"`` (the generic path, for any causal model with a ``generate()``: stock
``LlamaForCausalLM`` baselines and exports): the model's own ``generate()`` with left padding.

This module adds what a DNA user needs around them: prompts checked against the tokenizer's nucleotide alphabet (a
``ValueError`` names the first bad character and its position), generation restricted to nucleotides and ``<eos>``
(the other special tokens are suppressed, so the output is always DNA), greedy or sampled decoding (temperature,
top-k, top-p, several samples per prompt, a seed), each token's log-probability, and decoding back to strings with
timing for tokens/s. A prompt is ``<bos>`` + its bases, never followed by ``<eos>`` (the tokenizers' own
``tokenizer(prompt)`` gives the same ids; ``bioscale.data.tokenizers`` says which call adds which special token).
With a case-sensitive tokenizer (``nucleotide_ascii``) lower-case (soft-masked) bases stay lower case, in prompts
and outputs; the compact tokenizer upper-cases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.tokenizers import TOKENIZERS, tokenizer_kind
from bioscale.models import spec_for_model
from bioscale.models.decoding import decoder_parts
from bioscale.use.embed import default_device, default_dtype, special_affixes
from bioscale.use.generation_engine import RequestOutput, SamplingParams, engine_for, sample_key
from bioscale.use.loading import default_tokenizer, load_model

Engine = Literal["auto", "static", "transformers"]


@dataclass
class GeneratedSequence:
    """One sample: ``generated`` holds only the new bases (the prompt is not repeated).

    ``token_log_probs`` has one entry per new token (``<eos>`` included when the sample stopped there): the model's
    log-probability of that token (``log_softmax`` of its unmodified logits, before temperature, top-k/p and the
    suppression of non-DNA tokens), so ``sum(token_log_probs)`` scores the continuation.
    """

    prompt_index: int
    sample_index: int
    prompt: str
    generated: str
    num_new_tokens: int
    stopped_at_eos: bool
    token_log_probs: list[float] = field(default_factory=list)

    def as_dict(self, *, log_probs: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not log_probs:
            out.pop("token_log_probs")
        return out


@dataclass
class GenerationResult:
    """Samples in prompt-major order (all samples of prompt 0, then prompt 1...) and throughput."""

    samples: list[GeneratedSequence]
    elapsed_s: float
    num_new_tokens: int
    engine: str = "static"

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def residue_alphabet(tokenizer: PreTrainedTokenizerBase) -> str:
    """The bases a prompt may hold and generation may produce: for a bioscale DNA tokenizer its alphabet (ACGTN +
    IUPAC codes; both cases where lower case has its own ids), else every single-character non-special token."""
    kind = tokenizer_kind(tokenizer)
    if kind is not None and TOKENIZERS[kind].unit == "char":
        spec = TOKENIZERS[kind]
        return spec.policy_alphabet + (spec.policy_alphabet.lower() if spec.case_sensitive else "")
    special = set(tokenizer.all_special_tokens)
    return "".join(sorted(t for t in tokenizer.get_vocab() if len(t) == 1 and t not in special))


def _case_sensitive(tokenizer: PreTrainedTokenizerBase) -> bool:
    kind = tokenizer_kind(tokenizer)
    return kind is not None and TOKENIZERS[kind].case_sensitive


def validate_prompt(prompt: str, alphabet: str, *, index: int = 0, keep_case: bool = False) -> str:
    """``prompt`` without surrounding whitespace, upper-cased unless ``keep_case``; ``ValueError`` naming the first
    invalid character."""
    cleaned = prompt.strip() if keep_case else prompt.strip().upper()
    for position, char in enumerate(cleaned):
        if char not in alphabet:
            raise ValueError(
                f"prompt {index}: character {char!r} at position {position + 1} is not a valid base "
                f"(allowed: {alphabet})"
            )
    return cleaned


def prompt_token_ids(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each prompt as ``<bos>`` + its bases (no ``<eos>``: the model continues the sequence)."""
    prefix, _ = special_affixes(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    rows = [prefix + list(ids) for ids in encoded]
    if any(len(row) == 0 for row in rows):
        raise ValueError("an empty prompt needs a tokenizer with a <bos> token to start from")
    return rows


def encode_prompts(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, S]`` of :func:`prompt_token_ids` (the
    ``transformers`` engine)."""
    rows = prompt_token_ids(prompts, tokenizer)
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
    seed: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    engine: Engine = "auto",
    max_batch_size: int = 64,
    cuda_graphs: bool | None = None,
    compile_step: bool | None = None,
) -> GenerationResult:
    """Continue DNA prompts with a causal model.

    Args:
        model: a loaded causal model (bioscale ``Llama3ForCausalLM`` or stock ``LlamaForCausalLM``) or a checkpoint
            directory / Hub id (bioscale or plain ``transformers`` Llama). A loaded model is moved to ``device`` /
            ``dtype`` in place.
        prompts: one prompt or a list (different lengths are fine; an empty prompt starts from ``<bos>``).
        max_new_tokens: bases to generate per sample (fewer when ``<eos>`` is produced and ``stop_at_eos``).
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy decoding.
        num_samples: samples per prompt (greedy decoding gives identical samples).
        seed: the static engine keys sample ``k`` of prompt ``i`` by ``(seed, i, k)`` — or, given one seed per
            prompt, by ``(seed[i], k)``, independent of the prompt's position too — so a sample does not depend on
            what else is generated with it, nor on batch size or slots. ``None``: a key drawn from torch's global
            generator. The ``transformers`` engine seeds torch's generators with an int ``seed``.
        stop_at_eos: stop a sample at ``<eos>``; ``False`` forbids ``<eos>`` so every sample has exactly
            ``max_new_tokens`` bases.
        device, dtype: default CUDA + bf16 when available, else CPU + float32.
        engine: ``"static"`` (:mod:`bioscale.use.generation_engine`), ``"transformers"`` (the model's
            ``generate()``) or ``"auto"``: static where the model supports it.
        max_batch_size: static engine: most samples decoding at once (more wait and refill finished slots).
        cuda_graphs: static engine: capture the decode step as a CUDA graph (default: on CUDA).
        compile_step: static engine: ``torch.compile`` the decode step before capturing it: a one-off compile per
            batch shape (20-25 s), then about twice the tokens/s. Default: on CUDA for calls long enough to pay for
            it (``generation_engine.COMPILE_MIN_DECODE_STEPS`` decode steps); ``True`` / ``False`` always / never.

    Raises:
        ValueError: invalid prompt characters (naming prompt, character and position), a non-causal model,
            ``max_new_tokens < 1``, invalid sampling parameters, or ``engine="static"`` for a model without it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if engine not in ("auto", "static", "transformers"):
        raise ValueError(f"engine must be 'auto', 'static' or 'transformers', got {engine!r}")
    sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    sampling.validate()
    if seed is not None and not isinstance(seed, int) and len(seed) != len(prompts):
        raise ValueError(f"seed: one per prompt ({len(prompts)}), got {len(seed)}")
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
    static = decoder_parts(model) is not None
    if engine == "static" and not static:
        raise ValueError(f"engine='static' needs a model that supports it; {type(model).__name__} does not")
    use_static = static and engine != "transformers"
    tokenizer = tokenizer or default_tokenizer(spec.name, model.config)
    alphabet = residue_alphabet(tokenizer)
    keep_case = _case_sensitive(tokenizer)
    cleaned = [validate_prompt(p, alphabet, index=i, keep_case=keep_case) for i, p in enumerate(prompts)]
    eos_id = tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    allowed = sorted({vocab[c] for c in alphabet if c in vocab})

    _sync(device)
    start = time.perf_counter()
    if use_static:
        outputs = _generate_static(model, cleaned, tokenizer, sampling, num_samples=num_samples, seed=seed,
                                   max_new_tokens=max_new_tokens, eos_id=eos_id, stop_at_eos=stop_at_eos,
                                   allowed=allowed, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
                                   compile_step=compile_step)  # fmt: skip
    else:
        outputs = _generate_transformers(model, cleaned, tokenizer, sampling, num_samples=num_samples, seed=seed,
                                         max_new_tokens=max_new_tokens, eos_id=eos_id, stop_at_eos=stop_at_eos,
                                         allowed=allowed, device=device)  # fmt: skip
    _sync(device)
    elapsed = time.perf_counter() - start

    id_to_token = {i: t for t, i in vocab.items()}
    samples: list[GeneratedSequence] = []
    total = 0
    for row, out in enumerate(outputs):
        prompt_index, sample_index = divmod(row, num_samples)
        bases = out.token_ids[:-1] if out.stopped_at_eos else out.token_ids
        total += len(out.token_ids)
        samples.append(
            GeneratedSequence(
                prompt_index=prompt_index,
                sample_index=sample_index,
                prompt=cleaned[prompt_index],
                generated="".join(id_to_token[t] for t in bases),
                num_new_tokens=len(out.token_ids),
                stopped_at_eos=out.stopped_at_eos,
                token_log_probs=list(out.log_probs),
            )
        )
    return GenerationResult(samples=samples, elapsed_s=elapsed, num_new_tokens=total,
                            engine="static" if use_static else "transformers")  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_static(
    model: PreTrainedModel, prompts: list[str], tokenizer: PreTrainedTokenizerBase, sampling: SamplingParams, *,
    num_samples: int, seed: int | Sequence[int] | None, max_new_tokens: int, eos_id: int | None, stop_at_eos: bool,
    allowed: list[int], max_batch_size: int, cuda_graphs: bool | None, compile_step: bool | None,
) -> list[RequestOutput]:  # fmt: skip
    """Samples in prompt-major order through :class:`~bioscale.use.generation_engine.GenerationEngine`."""
    ids = prompt_token_ids(prompts, tokenizer)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    # Greedy samples of one prompt are identical: decode each prompt once and repeat it.
    repeats = num_samples if sampling.do_sample else 1
    keys = []
    for i in range(len(prompts)):
        for k in range(repeats):
            keys.append(sample_key(seed, i, k) if isinstance(seed, int) else sample_key(int(seed[i]), k))
    requests = [ids[i] for i in range(len(prompts)) for _ in range(repeats)]
    engine = engine_for(model, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs, compile_step=compile_step)
    outputs = engine.generate(requests, max_new_tokens=max_new_tokens, keys=keys, sampling=sampling,
                              eos_token_id=eos_id, stop_at_eos=stop_at_eos, allowed_token_ids=allowed)  # fmt: skip
    if repeats == num_samples:
        return outputs
    return [out for out in outputs for _ in range(num_samples)]


def _generate_transformers(
    model: PreTrainedModel, prompts: list[str], tokenizer: PreTrainedTokenizerBase, sampling: SamplingParams, *,
    num_samples: int, seed: int | Sequence[int] | None, max_new_tokens: int, eos_id: int | None, stop_at_eos: bool,
    allowed: list[int], device: torch.device,
) -> list[RequestOutput]:  # fmt: skip
    """Samples in prompt-major order through the model's own ``generate()`` (left padding, dynamic cache)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    input_ids, attention_mask = encode_prompts(prompts, tokenizer, pad_token_id=pad_id)
    allowed_set = set(allowed) | ({eos_id} if stop_at_eos and eos_id is not None else set())
    suppress = sorted(i for i in range(int(model.config.vocab_size)) if i not in allowed_set)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling.do_sample,
        num_return_sequences=num_samples,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id if stop_at_eos else None,
        suppress_tokens=suppress or None,
        return_dict_in_generate=True,
        output_logits=True,
        **({"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
           if sampling.do_sample else {"top_k": None}),
    )  # fmt: skip
    if isinstance(seed, int):
        torch.manual_seed(seed)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    new_tokens = output.sequences[:, input_ids.shape[1] :]
    # logits: one [rows, vocab] per step, unprocessed; the log-probability of the token that was chosen.
    steps = torch.stack([step.float() for step in output.logits], dim=1)  # [rows, new, vocab]
    chosen = torch.log_softmax(steps, dim=-1).gather(-1, new_tokens[:, : steps.shape[1], None])[..., 0]
    results = []
    for tokens, log_probs in zip(new_tokens.cpu().tolist(), chosen.cpu().tolist()):
        kept: list[int] = []
        stopped = False
        for token in tokens:
            kept.append(token)
            if stop_at_eos and token == eos_id:
                stopped = True
                break
        results.append(RequestOutput(token_ids=kept, log_probs=log_probs[: len(kept)], stopped_at_eos=stopped))
    return results
