"""Fast autoregressive generation for causal bioscale models: a static KV cache, a decode step replayed as a CUDA graph,
packed prefill, per-sample seeded sampling, per-sample stopping and continuous refill of finished slots.

Why. ``transformers``' ``generate()`` runs a Python loop that launches every kernel of every layer for every token,
with a dynamic cache that grows each step and host-side bookkeeping in between: on an H200 a 1B Llama decodes 16
tokens/s at batch 1 — the GPU idles between kernel launches. Here a decode step is a fixed sequence of kernels over
fixed buffers (:mod:`bioscale.models.decoding`), so it is captured once per slot count as a CUDA graph and replayed:
one launch per token for the whole model. Everything a step needs lives in device tensors (last token, position,
count, done flag, seeds, output buffers); the host only looks at them every ``poll_every`` steps.

How a call runs (:meth:`GenerationEngine.generate`):

1. Requests (prompt ids with ``<bos>``, one per sample) fill ``num_slots`` slots (a power of two >= the number of
   requests, at most ``max_batch_size``). Their prompts run *packed*, back to back in one row with ``cu_seqlens``
   (varlen attention on GPU): prompts of different lengths need no left padding and cost no padded compute. The
   prefill writes each prompt's keys and values into its slot and samples its first new token.
2. Decode steps (the CUDA graph, or the same function eagerly on CPU / with ``cuda_graphs=False``) append one token
   to every active slot; a slot finishes at ``<eos>`` (when ``stop_at_eos``) or after ``max_new_tokens``, and then
   stops changing.
3. Every ``poll_every`` steps (or exactly when the next slot reaches ``max_new_tokens``) the host copies the done
   flags, harvests finished slots, and refills them with waiting requests (another packed prefill into just those
   slots) while the other slots carry on. So 1,000 samples run through 64 slots without waiting for the slowest of
   each group.

Sampling (:func:`sample_tokens`): greedy is ``argmax`` (the first maximum, as ``transformers``); sampling applies
temperature, then top-k, then top-p (the ``transformers`` order) and draws with the Gumbel-max trick from noise that is
a hash of (the sample's 64-bit key, its token index, the vocabulary id). No global RNG is read: a sample's tokens
depend only on its key and its own logits — not on batch size, slot, refill order or what runs beside it — and the
draw needs no host round trip, so it is part of the graph. Tokens outside ``allowed_token_ids`` get ``-inf`` (DNA
generation allows only bases and ``<eos>``). Each token's log-probability is returned too: ``log_softmax`` of the
model's unmodified logits (before temperature, filtering and suppression), i.e. the model's own score of the
sequence.

Exactness. Greedy output equals ``model.generate()`` and stock ``LlamaForCausalLM.generate`` on the converted weights
token for token in float32 (tested: single prompts, mixed lengths, more samples than slots); in bf16 on GPU the packed
prefill and the grouped decode attention round differently from ``transformers``' padded path, so near-ties may
break the other way (the GPU test allows that). The graph replays the eager step's kernels, so both give the same
tokens (GPU test).
"""

from __future__ import annotations

import collections
import logging
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bioscale.models.attention import varlen_available
from bioscale.models.decoding import (
    DECODE_ATTENTION_MODES,
    DECODE_LINEAR_MODES,
    DecoderParts,
    StaticKVCache,
    decode_forward,
    decoder_parts,
    prefill_forward,
)

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
# Where the varlen kernel cannot run (CPU, float32) a packed prefill attends through a dense [T, T] block-diagonal
# mask, so its prompts are grouped by this smaller budget (a longer prompt still runs, alone).
_DENSE_PREFILL_TOKENS = 2048
# Compiling the decode step took 20-25 s on an H200 (Llama 3 1B, a cold Inductor cache) and then saved 1.1-1.5 ms per
# step (batch 1: 2.26 -> 1.13 ms, batch 32: 3.07 -> 1.62 ms;
# benchmarks/results/2026-12-03-h200-use-compiled-trainer.md): it pays from ~20,000 decode steps on.
# compile_step=None compiles a call expected to take at least that many.
COMPILE_MIN_DECODE_STEPS = 20_000
# With one slot every GEMM of the step is a matrix-vector product, where max-autotune's Triton templates beat
# cuBLAS: on an H200 (Llama 3 1B, 2026-12-03, benchmarks/bench_use.py --decode-variants) batch 1 went from 896 to
# 1,032 tokens/s, for a compile of 57 s instead of 25 s. With more slots they lost: 8 slots 6,776 -> 5,100, 32 slots
# 19,986 -> 17,348, so larger sessions keep Inductor's defaults. The longer compile pays from ~45,000 decode steps
# (compile_step=None).
AUTOTUNE_MAX_SLOTS = 1
AUTOTUNE_COMPILE_OPTIONS = {"mode": "max-autotune-no-cudagraphs"}
AUTOTUNE_MIN_DECODE_STEPS = 45_000
# Compiled steps of at most this many slots spell their linears as reductions (decode_linear_mode). 0: none. On an
# H100 (2026-12-05, Llama 3 1B, 1 slot) reductions gave 825 tokens/s (816 with coordinate descent, 807 with
# max-autotune) against 852 for the autotuned GEMMs; the mode stays for GPUs and shapes where it may pay.
REDUCTION_LINEAR_MAX_SLOTS = 0


@dataclass(frozen=True)
class SamplingParams:
    """``do_sample=False``: greedy. Otherwise ``temperature`` > 0, optional ``top_k`` >= 1 and ``top_p`` in (0, 1]."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RequestOutput:
    """One sample: the new token ids (``<eos>`` included when it stopped there) and their log-probabilities."""

    token_ids: list[int]
    log_probs: list[float]
    stopped_at_eos: bool


# ---- seeded noise ------------------------------------------------------------------------------------------------
# 32-bit integer hashing in int64 tensors (every intermediate stays below 2**63, so no overflow on any device).


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for ``x`` in ``[0, 2**32)``, split in 16-bit halves so nothing overflows int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (C. Wellons' ``lowbias32``) on int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, vocab_size]`` float32, a pure function of ``keys`` ``[B, 2]`` (two 32-bit words per
    sample), ``steps`` ``[B]`` (the token index within the sample) and the vocabulary id."""
    state = _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ 0x5BD1E995))
    state = _mix32(state ^ _mix32((steps & _MASK32) ^ 0x68E31DA4))  # [B]
    vocab = _mix32(torch.arange(vocab_size, device=keys.device, dtype=torch.int64) ^ 0x1B873593)  # [V]
    bits = _mix32(state[:, None] ^ vocab[None, :])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def sample_key(seed: int, *path: int) -> tuple[int, int]:
    """A sample's 64-bit noise key (two 32-bit words) from a base ``seed`` and its coordinates (prompt, sample):
    splitmix64 over the sequence, so different coordinates give unrelated streams."""
    state = seed & 0xFFFFFFFFFFFFFFFF
    for value in path:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state >> 32, state & _MASK32


def sample_tokens(
    logits: torch.Tensor,
    bias: torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
    sampling: SamplingParams,
    *,
    temperature: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[B]`` and their log-probabilities ``[B]`` from float32 ``logits`` ``[B, V]``.

    ``bias`` ``[V]`` is 0 for allowed tokens and ``-inf`` for suppressed ones; ``keys`` / ``steps`` seed the noise
    (:func:`gumbel_noise`). ``temperature`` / ``top_p`` may be given as 0-dim tensors (so a CUDA graph reads them
    from device memory); by default they come from ``sampling``. The log-probability is that of the unmodified
    logits (module docstring).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    scores = logits + bias
    if sampling.do_sample:
        scores = scores / (temperature if temperature is not None else sampling.temperature)
        if sampling.top_k is not None:
            kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if sampling.top_p is not None:
            # Keep the most likely tokens until their mass reaches top_p (the first one always).
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop_sorted = mass_before >= (top_p if top_p is not None else sampling.top_p)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, -math.inf)
        tokens = torch.argmax(scores + gumbel_noise(keys, steps, scores.shape[-1]), dim=-1)
    else:
        tokens = torch.argmax(scores, dim=-1)
    return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]


def should_compile_step(setting: bool | None, *, device_type: str, decode_steps: int, num_slots: int = 1) -> bool:
    """``compile_step``'s decision: ``True`` / ``False`` as given; ``None`` compiles on CUDA for a call expected to
    run long enough for the compile to pay for itself: :data:`COMPILE_MIN_DECODE_STEPS` decode steps, or
    :data:`AUTOTUNE_MIN_DECODE_STEPS` for sessions of at most :data:`AUTOTUNE_MAX_SLOTS` slots (their longer
    autotuned compile, :func:`decode_compile_options`)."""
    if setting is not None:
        return bool(setting)
    min_steps = AUTOTUNE_MIN_DECODE_STEPS if num_slots <= AUTOTUNE_MAX_SLOTS else COMPILE_MIN_DECODE_STEPS
    return device_type == "cuda" and decode_steps >= min_steps


def decode_attention_mode(setting: str | None, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                          num_slots: int = 1, num_kv_heads: int = 1) -> str:  # fmt: skip
    """``decode_attention``'s decision (:data:`bioscale.models.decoding.DECODE_ATTENTION_MODES`): as given, or for
    ``None``: ``"varlen"`` where it runs (CUDA, fp16 / bf16) and the session has at least one (slot, KV head) pair
    per multiprocessor, else ``"dense"``.

    Why (Llama 3 1B, 256 new tokens, prompts of 256-512 bases, compiled graphed step;
    benchmarks/results/2026-12-05-h100-decode-varlen.md). FlashAttention-2 runs one thread block per (slot, KV head)
    here: at 32 slots x 8 KV heads (256 blocks on an H100's 132 multiprocessors) it beat the dense step, 17,837
    against 17,176 tokens/s; at one slot (8 blocks) each block walks its whole row alone, 16 us per layer, and the
    step lost (673 against 859). The block-sparse FlexAttention step lost at 32 slots on an H200 (18,932 against the
    dense 19,928; benchmarks/results/2026-12-04-h200-attention-cudnn.md); it stays for long caches of unequal lengths
    (uncompiled it is FlexAttention's dense reference: correct, not fast). An explicit ``"varlen"`` needs a CUDA
    model in fp16 / bf16 (checked when ``device`` is given)."""
    if setting is None:
        if device is None or device.type != "cuda" or not varlen_available(device, dtype or torch.float32):
            return "dense"
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return "varlen" if num_slots * num_kv_heads >= sms else "dense"
    if setting not in DECODE_ATTENTION_MODES:
        raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION_MODES} or None, got {setting!r}")
    if setting == "varlen" and device is not None and not varlen_available(device, dtype or torch.float32):
        raise ValueError(f"decode_attention='varlen' (FlashAttention-2 varlen) needs a CUDA model in fp16 / bf16, "
                         f"this one is {dtype} on {device}; use 'dense'")  # fmt: skip
    return setting


def decode_linear_mode(setting: str | None, *, compiled: bool = False, num_slots: int = 1) -> str:
    """``decode_linear``'s decision (:data:`bioscale.models.decoding.DECODE_LINEAR_MODES`): as given, or for
    ``None``: ``"reduction"`` for compiled steps of at most :data:`REDUCTION_LINEAR_MAX_SLOTS` slots, else ``"gemm"``.
    ``"reduction"`` needs a compiled step: uncompiled it would materialise every ``[slots, out, in]`` product."""
    if setting is None:
        return "reduction" if compiled and num_slots <= REDUCTION_LINEAR_MAX_SLOTS else "gemm"
    if setting not in DECODE_LINEAR_MODES:
        raise ValueError(f"decode_linear must be one of {DECODE_LINEAR_MODES} or None, got {setting!r}")
    return setting


def decode_compile_options(num_slots: int, device_type: str) -> dict[str, Any]:
    """The ``torch.compile`` arguments of a compiled decode step of ``num_slots`` slots when the caller gives none:
    max-autotune for single-slot (matrix-vector) steps on CUDA (:data:`AUTOTUNE_MAX_SLOTS`), Inductor's defaults
    otherwise."""
    if device_type == "cuda" and num_slots <= AUTOTUNE_MAX_SLOTS:
        return dict(AUTOTUNE_COMPILE_OPTIONS)
    return {}


# ---- engine --------------------------------------------------------------------------------------------------------


class _Session:
    """The device state of ``num_slots`` slots with a KV cache of ``cache_length`` positions, for one sampling mode,
    and (on CUDA, if asked) the captured decode step. Reused across calls with the same shape."""

    def __init__(
        self,
        parts: DecoderParts,
        *,
        num_layers: int,
        num_slots: int,
        cache_length: int,
        sampling: SamplingParams,
        dtype: torch.dtype,
        device: torch.device,
        cuda_graph: bool,
        graph_pool: object | None,
        compile_step: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        decode_attention: str = "dense",
        decode_linear: str = "gemm",
    ) -> None:
        self.parts = parts
        self.decode_attention = decode_attention
        self.decode_linear = decode_linear
        self.num_slots = num_slots
        self.cache_length = cache_length
        self.sampling = sampling
        self.device = device
        self.cache = StaticKVCache(
            num_layers=num_layers, num_slots=num_slots, max_length=cache_length, num_kv_heads=parts.num_kv_heads,
            head_dim=parts.head_dim, dtype=dtype, device=device, flex_decode=decode_attention == "flex",
        )  # fmt: skip
        long = {"dtype": torch.long, "device": device}
        self.slots = torch.arange(num_slots, device=device)
        self.tokens = torch.zeros(num_slots, **long)  # the token each slot feeds next
        self.positions = torch.zeros(num_slots, **long)  # ... and its position
        self.counts = torch.zeros(num_slots, **long)  # new tokens of the slot's sample so far
        self.done = torch.ones(num_slots, dtype=torch.bool, device=device)  # empty slots count as done
        self.keys = torch.zeros(num_slots, 2, **long)
        self.out_tokens = torch.zeros(num_slots, cache_length, **long)
        self.out_log_probs = torch.zeros(num_slots, cache_length, dtype=torch.float32, device=device)
        # Per-call settings, read by the graph from device memory.
        self.bias = torch.zeros(parts.vocab_size, dtype=torch.float32, device=device)
        self.limit = torch.zeros((), **long)
        self.eos = torch.full((), -1, **long)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        # Compiled, the step's elementwise work (RMSNorm, RoPE, SwiGLU, residuals, the cache writes, the mask and the
        # sampling) is fused into a few kernels per layer; the graph then replays those instead of ~35 eager kernels
        # per layer, each of which costs a few microseconds even inside a CUDA graph (compile happens in the warm-up
        # runs of the capture, once per session shape; Inductor's cache makes later processes fast).
        compile_kwargs = {"dynamic": False, **(compile_options or {})}
        self._run_step = torch.compile(self.step, **compile_kwargs) if compile_step else self.step
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            self.graph = self._capture(graph_pool)

    def configure(self, *, max_new_tokens: int, eos_token_id: int | None, bias: torch.Tensor,
                  sampling: SamplingParams) -> None:  # fmt: skip
        self.limit.fill_(max_new_tokens)
        self.eos.fill_(-1 if eos_token_id is None else eos_token_id)
        self.bias.copy_(bias)
        self.temperature.fill_(sampling.temperature)
        self.top_p.fill_(sampling.top_p if sampling.top_p is not None else 1.0)
        self.done.fill_(True)

    def step(self) -> None:
        """One decode step for every slot (the graph's body): inactive slots change nothing that is read."""
        logits = decode_forward(self.parts, self.cache, self.tokens, self.positions, attention=self.decode_attention,
                                linear=self.decode_linear)  # fmt: skip
        tokens, log_probs = sample_tokens(logits, self.bias, self.keys, self.counts, self.sampling,
                                          temperature=self.temperature, top_p=self.top_p)  # fmt: skip
        active = ~self.done
        column = self.counts.clamp(max=self.cache_length - 1)
        self.out_tokens[self.slots, column] = torch.where(active, tokens, self.out_tokens[self.slots, column])
        self.out_log_probs[self.slots, column] = torch.where(active, log_probs, self.out_log_probs[self.slots, column])
        finished = active & ((tokens == self.eos) | (self.counts + 1 >= self.limit))
        self.tokens.copy_(torch.where(active, tokens, self.tokens))
        self.positions.copy_(torch.where(active & ~finished, self.positions + 1, self.positions))
        self.counts.add_(active.long())
        self.done.logical_or_(finished)

    def run_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._run_step()

    def _capture(self, pool: object | None) -> torch.cuda.CUDAGraph:
        # Every slot is done, so the warm-up and capture runs change no state that is read later (they write the
        # KV cache at position 0, which every prefill overwrites).
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile, kernel selection, allocator warm-up (as make_graphed_callables does)
                self._run_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._run_step()
        return graph

    def prefill(self, prompts: list[list[int]], keys: list[tuple[int, int]], slots: list[int]) -> None:
        """Start ``prompts`` in ``slots``: fill their KV rows and sample each one's first new token."""
        logits = prefill_forward(self.parts, self.cache, prompts, slots, device=self.device)
        index = torch.tensor(slots, device=self.device)
        self.keys[index] = torch.tensor(keys, dtype=torch.long).to(self.device)
        tokens, log_probs = sample_tokens(logits, self.bias, self.keys[index], torch.zeros_like(index),
                                          self.sampling, temperature=self.temperature, top_p=self.top_p)  # fmt: skip
        self.out_tokens[index, 0] = tokens
        self.out_log_probs[index, 0] = log_probs
        self.tokens[index] = tokens
        self.positions[index] = torch.tensor([len(p) for p in prompts], device=self.device)
        self.counts[index] = 1
        self.done[index] = (tokens == self.eos) | (self.limit <= 1)


class GenerationEngine:
    """Generates continuations of token-id prompts with a causal bioscale model (see the module docstring).

    Args:
        model: a model whose class declares ``_supports_static_kv_decode`` (``Llama3ForCausalLM``); see
            :func:`bioscale.models.decoding.decoder_parts`. Used as it is (device, dtype, eval mode).
        max_batch_size: most slots decoding at once; more requests wait and refill finished slots.
        cuda_graphs: capture the decode step as a CUDA graph (default: on CUDA).
        compile_step: ``torch.compile`` the decode step (before it is captured): fused elementwise kernels, about
            twice the tokens/s of the uncompiled graphed step on an H200 (benchmarks/results). It costs a compile per
            new ``(slots, cache length, sampling mode)`` shape, 20-25 s with a cold Inductor cache (57 s autotuned, at
            most :data:`AUTOTUNE_MAX_SLOTS` slots). ``None`` (default): compile on CUDA when a call needs enough
            decode steps for the compile to pay for itself (:func:`should_compile_step`); ``True`` / ``False``
            always / never.
        decode_attention: ``"dense"`` (every cache position, masked), ``"flex"`` (FlexAttention over each slot's
            blocks up to its position) or ``"varlen"`` (FlashAttention-2 over each slot's keys up to its position;
            CUDA, fp16 / bf16); :mod:`bioscale.models.decoding`. ``None`` (default): :func:`decode_attention_mode`
            (``"varlen"`` for sessions with a (slot, KV head) pair per multiprocessor, else ``"dense"``).
        decode_linear: ``"gemm"`` (each projection as the model runs it) or ``"reduction"`` (a float32 multiply-and-sum
            that Inductor fuses with the elementwise work around it; compiled steps only);
            :mod:`bioscale.models.decoding`. ``None`` (default): :func:`decode_linear_mode`.
        compile_options: the keyword arguments of that ``torch.compile`` call (``mode`` or ``options``, as
            ``benchmarks/bench_use.py --decode-variants`` compares them). ``None`` (default):
            :func:`decode_compile_options` (max-autotune for sessions of at most :data:`AUTOTUNE_MAX_SLOTS` slots on
            CUDA, where it is faster); ``{}``: Inductor's defaults at every size.
        prefill_tokens: token budget of one packed prefill forward (prompts beyond it run in further forwards).
        poll_every: decode steps between host checks for finished slots (a sync each; at most this many steps a
            finished slot idles before refill).
        hold_model: keep a strong reference to ``model`` (``False``: the engine lives only as long as the model
            does elsewhere, as in :func:`engine_for`'s cache).

    Raises:
        ValueError: a model without the static-decode contract, or bad sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 64,
        cuda_graphs: bool | None = None,
        compile_step: bool | None = None,
        compile_options: Mapping[str, Any] | None = None,
        decode_attention: str | None = None,
        decode_linear: str | None = None,
        prefill_tokens: int = 32768,
        poll_every: int = 16,
        hold_model: bool = True,
    ) -> None:
        parts = decoder_parts(model)
        if parts is None:
            raise ValueError(
                f"{type(model).__name__} does not declare _supports_static_kv_decode; generate with its own generate()"
            )
        if max_batch_size < 1 or prefill_tokens < 1 or poll_every < 1:
            raise ValueError("max_batch_size, prefill_tokens and poll_every must be >= 1")
        self._model = weakref.ref(model)
        self._held = model if hold_model else None
        self.parts = parts
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.poll_every = poll_every
        self._cuda_graphs = cuda_graphs
        self._compile_step = compile_step
        self._compile_options = None if compile_options is None else dict(compile_options)
        decode_attention_mode(decode_attention)  # a bad name fails here, not at the first call
        self._decode_attention = decode_attention
        decode_linear_mode(decode_linear)
        self._decode_linear = decode_linear
        self._sessions: collections.OrderedDict[tuple, _Session] = collections.OrderedDict()
        self._graph_pool: object | None = None
        self._fingerprint: tuple | None = None

    @property
    def model(self) -> nn.Module:
        model = self._model()
        assert model is not None, "the engine's model has been garbage-collected"
        return model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _weights_fingerprint(self) -> tuple:
        """Where every parameter and buffer lives: a captured graph reads them by address, so any move (a cast, a
        device change, a module replacing a buffer) must discard it."""
        model = self.model
        tensors = [*model.parameters(), *model.buffers()]
        return (tensors[0].device, tensors[0].dtype, tuple(t.data_ptr() for t in tensors))

    def _session(self, num_slots: int, cache_length: int, sampling: SamplingParams, *, decode_steps: int) -> _Session:
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:  # moved or cast since the graphs were captured: they would read old memory
            self._sessions.clear()
            self._graph_pool = None
            self._fingerprint = fingerprint
        device = self.device
        use_graph = device.type == "cuda" if self._cuda_graphs is None else bool(self._cuda_graphs)
        if use_graph and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA model, this one is on {device}")
        # Temperature and top-p are read from tensors; only what changes the kernels is part of the key.
        compile_step = should_compile_step(self._compile_step, device_type=device.type, decode_steps=decode_steps,
                                           num_slots=num_slots)  # fmt: skip
        mode = (sampling.do_sample, sampling.top_k, sampling.top_p is not None)
        dtype = next(self.model.parameters()).dtype
        attention = decode_attention_mode(self._decode_attention, device=device, dtype=dtype, num_slots=num_slots,
                                          num_kv_heads=self.parts.num_kv_heads)  # fmt: skip
        linear = decode_linear_mode(self._decode_linear, compiled=compile_step, num_slots=num_slots)
        key = (num_slots, cache_length, mode, use_graph, compile_step, attention, linear)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        while len(self._sessions) >= 2:  # bound the memory held by caches of earlier shapes
            self._sessions.popitem(last=False)
        if use_graph and self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        session = _Session(
            self.parts, num_layers=len(self.parts.layers), num_slots=num_slots, cache_length=cache_length,
            sampling=sampling, dtype=dtype, device=device, cuda_graph=use_graph, graph_pool=self._graph_pool,
            compile_step=compile_step, decode_attention=attention, decode_linear=linear,
            compile_options=self._compile_options if self._compile_options is not None
            else decode_compile_options(num_slots, device.type),
        )  # fmt: skip
        self._sessions[key] = session
        return session

    def slots_for(self, num_requests: int) -> int:
        """Slots a call with ``num_requests`` samples uses: the next power of two, at most ``max_batch_size``."""
        return min(self.max_batch_size, 1 << max(0, math.ceil(math.log2(max(num_requests, 1)))))

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        keys: Sequence[tuple[int, int]],
        sampling: SamplingParams = SamplingParams(),
        eos_token_id: int | None = None,
        stop_at_eos: bool = True,
        allowed_token_ids: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Continue every prompt (token ids, ``<bos>`` included) once; ``keys[i]`` is request ``i``'s noise key
        (:func:`sample_key`). Returns one :class:`RequestOutput` per request, in order.

        ``stop_at_eos=False`` suppresses ``<eos>`` (every sample gets exactly ``max_new_tokens``);
        ``allowed_token_ids`` restricts what can be generated (``None``: every token).
        """
        sampling.validate()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
        if not prompts:
            return []
        prompts = [list(map(int, p)) for p in prompts]
        if min(map(len, prompts)) < 1:
            raise ValueError("every prompt needs at least one token (<bos>)")
        vocab_size = self.parts.vocab_size
        bias = torch.zeros(vocab_size, dtype=torch.float32)
        if allowed_token_ids is not None:
            bias.fill_(-math.inf)
            bias[torch.tensor(sorted(set(allowed_token_ids)), dtype=torch.long)] = 0.0
        if eos_token_id is not None:
            bias[eos_token_id] = 0.0 if stop_at_eos else -math.inf
        if torch.isinf(bias).all():
            raise ValueError("no token can be generated: allowed_token_ids leaves nothing")
        num_slots = self.slots_for(len(prompts))
        # The last new token is never fed back: positions 0 .. len + max_new - 2. Rounded up so nearby shapes share
        # a captured graph.
        cache_length = _round_up(max(map(len, prompts)) + max_new_tokens - 1, 128)
        decode_steps = math.ceil(len(prompts) / num_slots) * max_new_tokens  # about: refills overlap
        session = self._session(num_slots, cache_length, sampling, decode_steps=decode_steps)
        session.configure(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          bias=bias.to(session.device), sampling=sampling)  # fmt: skip
        return self._run(session, prompts, list(keys), max_new_tokens)

    def _run(self, session: _Session, prompts: list[list[int]], keys: list[tuple[int, int]],
             max_new_tokens: int) -> list[RequestOutput]:  # fmt: skip
        """The host loop: fill, decode, poll, harvest, refill (module docstring)."""
        num_slots = session.num_slots
        pending = collections.deque(range(len(prompts)))
        occupant: list[int | None] = [None] * num_slots
        produced = [0] * num_slots  # host's upper bound of each occupied slot's count
        results: list[RequestOutput | None] = [None] * len(prompts)
        finished: list[int] = list(range(num_slots))  # slots to (re)fill
        while True:
            self._fill(session, finished, pending, occupant, produced, prompts, keys)
            busy = [b for b in range(num_slots) if occupant[b] is not None]
            if not busy:
                break
            # Poll when the first slot must be done by its limit, at the latest every poll_every steps.
            steps = max(1, min([self.poll_every] + [max_new_tokens - produced[b] for b in busy]))
            session.run_steps(steps)
            for b in busy:
                produced[b] = min(max_new_tokens, produced[b] + steps)
            finished = self._harvest(session, occupant, results, busy)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _fill(self, session: _Session, free: list[int], pending: collections.deque, occupant: list[int | None],
              produced: list[int], prompts: list[list[int]], keys: list[tuple[int, int]]) -> None:  # fmt: skip
        """Start waiting requests in the ``free`` slots, in packed prefill forwards of at most ``prefill_tokens``."""
        budget = self.prefill_tokens
        if not varlen_available(session.device, session.cache.k[0].dtype):
            budget = min(budget, _DENSE_PREFILL_TOKENS)
        group: list[tuple[int, int]] = []  # (slot, request)
        tokens = 0
        for slot in free:
            if not pending:
                break
            request = pending[0]
            if group and tokens + len(prompts[request]) > budget:
                self._prefill(session, group, prompts, keys)
                group, tokens = [], 0
            pending.popleft()
            group.append((slot, request))
            tokens += len(prompts[request])
            occupant[slot], produced[slot] = request, 1
        if group:
            self._prefill(session, group, prompts, keys)

    @staticmethod
    def _prefill(session: _Session, group: list[tuple[int, int]], prompts: list[list[int]],
                 keys: list[tuple[int, int]]) -> None:  # fmt: skip
        session.prefill([prompts[r] for _, r in group], [keys[r] for _, r in group], [s for s, _ in group])

    @staticmethod
    def _harvest(session: _Session, occupant: list[int | None], results: list[RequestOutput | None],
                 busy: list[int]) -> list[int]:  # fmt: skip
        """Collect the finished slots' samples (one host copy of the done flags; one more when some finished)."""
        done = session.done.cpu()
        slots = [b for b in busy if bool(done[b])]
        if not slots:
            return []
        index = torch.tensor(slots, device=session.device)
        counts = session.counts[index].cpu().tolist()
        width = max(counts)
        tokens = session.out_tokens[index, :width].cpu().tolist()
        log_probs = session.out_log_probs[index, :width].cpu().tolist()
        eos = int(session.eos)
        for row, slot in enumerate(slots):
            n = counts[row]
            ids = tokens[row][:n]
            request = occupant[slot]
            assert request is not None
            results[request] = RequestOutput(token_ids=ids, log_probs=log_probs[row][:n],
                                             stopped_at_eos=bool(ids) and ids[-1] == eos)  # fmt: skip
            occupant[slot] = None
        return slots


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# One engine per live model (weak keys; the engines hold their model weakly, so an entry dies with its model).
_ENGINES: weakref.WeakKeyDictionary[nn.Module, GenerationEngine] = weakref.WeakKeyDictionary()


def engine_for(
    model: nn.Module, *, max_batch_size: int = 64, cuda_graphs: bool | None = None, compile_step: bool | None = None
) -> GenerationEngine:
    """The :class:`GenerationEngine` of ``model`` with these settings, kept while the model lives, so repeated calls
    reuse its KV cache and captured graphs (:func:`release_engines` frees them earlier)."""
    engine = _ENGINES.get(model)
    settings = (max_batch_size, cuda_graphs, compile_step)
    if engine is None or (engine.max_batch_size, engine._cuda_graphs, engine._compile_step) != settings:
        engine = GenerationEngine(model, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
                                  compile_step=compile_step, hold_model=False)  # fmt: skip
        _ENGINES[model] = engine
    return engine


def release_engines() -> None:
    """Drop the cached engines (their KV caches and CUDA graphs) of every model."""
    _ENGINES.clear()
