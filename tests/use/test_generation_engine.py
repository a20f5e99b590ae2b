"""The static-cache generation engine: greedy output equals stock ``LlamaForCausalLM.generate`` token for token
(float32, CPU) for single prompts, mixed-length batches, early ``<eos>`` and more samples than slots (refill);
log-probabilities equal ``transformers``' raw logits; sampling is seeded per sample (same seed, same tokens; a sample
does not depend on what runs beside it, the slot count or the refill order); the sampling filters do what they say."""

from __future__ import annotations

import math

import pytest
import torch

from bioscale.data.tokenizers import nucleotide_tokenizer
from bioscale.models import build_config, build_model, to_hf
from bioscale.models import decoding
from bioscale.models.decoding import DECODE_KV_BLOCK, StaticKVCache, decoder_parts, kv_decode_attention
from bioscale.models.attention import AttentionInputs, sdpa_attention
from bioscale.use import generate_dna
from bioscale.use.generation_engine import (
    GenerationEngine,
    SamplingParams,
    decode_attention_mode,
    decode_linear_mode,
    gumbel_noise,
    sample_key,
    sample_tokens,
    should_compile_step,
)

# Different lengths (packed prefill, no padding), an empty prompt (<bos> only), ambiguity codes.
PROMPTS = ["ACGTTGCA", "GATTACAGATTACAGGC", "T", "", "ACGTACGTACGTNNNNAC"]


@pytest.fixture(scope="module")
def models():
    """A debug Llama 3 over the 20-token DNA vocabulary, with weights large enough that greedy continuations vary and
    some stop at <eos> early, and the same weights as stock ``LlamaForCausalLM``."""
    torch.manual_seed(3)
    tok = nucleotide_tokenizer()
    config = build_config("llama3", "debug", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)  # fmt: skip
    model = build_model(config, task="causal_lm", device="cpu").eval()
    return model, to_hf(model).eval(), tok


def _kwargs(tok, **extra):
    return {"max_new_tokens": 40, "tokenizer": tok, "device": "cpu", "dtype": torch.float32, **extra}


def test_engine_is_chosen_for_bioscale_models_and_transformers_for_stock_ones(models) -> None:
    model, hf, tok = models
    assert generate_dna(model, "ACGT", **_kwargs(tok, max_new_tokens=2)).engine == "static"
    assert generate_dna(hf, "ACGT", **_kwargs(tok, max_new_tokens=2)).engine == "transformers"
    with pytest.raises(ValueError, match="engine='static' needs a model that supports it"):
        generate_dna(hf, "ACGT", engine="static", **_kwargs(tok, max_new_tokens=2))


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "mixed-lengths"])
def test_greedy_equals_transformers_token_for_token(models, prompts) -> None:
    model, hf, tok = models
    ours = generate_dna(model, prompts, **_kwargs(tok))
    reference = generate_dna(hf, prompts, **_kwargs(tok))
    assert ours.engine == "static" and reference.engine == "transformers"
    assert [s.generated for s in ours.samples] == [s.generated for s in reference.samples]
    assert [s.stopped_at_eos for s in ours.samples] == [s.stopped_at_eos for s in reference.samples]
    if len(prompts) > 1:  # the fixture's weights make some samples stop early and others run to the limit
        assert {s.stopped_at_eos for s in ours.samples} == {True, False}
    # Log-probabilities: the model's own (raw logits), equal to transformers' output_logits.
    for a, b in zip(ours.samples, reference.samples):
        assert len(a.token_log_probs) == a.num_new_tokens
        assert max(abs(x - y) for x, y in zip(a.token_log_probs, b.token_log_probs)) < 1e-4
        assert all(lp <= 0 for lp in a.token_log_probs)


def test_exact_length_without_eos_equals_transformers(models) -> None:
    model, hf, tok = models
    kwargs = _kwargs(tok, max_new_tokens=33, stop_at_eos=False)
    ours = generate_dna(model, PROMPTS, **kwargs)
    assert [s.generated for s in ours.samples] == [s.generated for s in generate_dna(hf, PROMPTS, **kwargs).samples]
    assert all(len(s.generated) == 33 and not s.stopped_at_eos for s in ours.samples)


def test_many_samples_refill_finished_slots(models) -> None:
    """20 requests through 4 slots: finished slots are refilled while the others decode; outputs do not change."""
    model, hf, tok = models
    prompts = PROMPTS * 4
    reference = generate_dna(hf, PROMPTS, **_kwargs(tok))
    refilled = generate_dna(model, prompts, **_kwargs(tok, max_batch_size=4))
    assert [s.generated for s in refilled.samples] == [s.generated for s in reference.samples] * 4
    assert [s.prompt_index for s in refilled.samples] == list(range(20))


def test_engine_reuses_its_session_and_polls_rarely(models) -> None:
    model, _, tok = models
    engine = GenerationEngine(model, max_batch_size=8, poll_every=5)
    ids = [[0, 5, 6, 7], [0, 8]]
    keys = [sample_key(0, i) for i in range(2)]
    first = engine.generate(ids, max_new_tokens=12, keys=keys, eos_token_id=None)
    second = engine.generate(ids, max_new_tokens=12, keys=keys, eos_token_id=None)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    assert all(len(o.token_ids) == 12 and not o.stopped_at_eos for o in first)
    assert len(engine._sessions) == 1  # same slot count and cache length: one KV cache, one (CUDA) graph
    assert engine.slots_for(2) == 2 and engine.slots_for(3) == 4 and engine.slots_for(100) == 8


def test_stops_each_sample_at_its_own_eos(models) -> None:
    """The <eos> id chosen as a token the first prompt's greedy continuation emits: that sample stops there, the
    others go on, exactly like transformers with the same eos."""
    model, hf, tok = models
    reference = generate_dna(hf, PROMPTS, **_kwargs(tok, stop_at_eos=False))
    base = reference.samples[2].generated  # "TTTTGGG...": G is the eos of this test
    eos = tok.convert_tokens_to_ids(base[5])
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    engine = GenerationEngine(model, max_batch_size=2)
    outputs = engine.generate(ids, max_new_tokens=40, keys=[(0, 0)] * len(ids), eos_token_id=eos)
    with torch.no_grad():
        for prompt_ids, out in zip(ids, outputs):
            expected = hf.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False,
                                   eos_token_id=eos, pad_token_id=1)[0, len(prompt_ids):].tolist()  # fmt: skip
            if eos in expected:
                expected = expected[: expected.index(eos) + 1]
            assert out.token_ids == expected
            assert out.stopped_at_eos == (expected[-1] == eos)
    assert outputs[2].stopped_at_eos and len(outputs[2].token_ids) == base.index(base[5]) + 1 < 40
    assert len({len(out.token_ids) for out in outputs}) > 1  # each sample stopped at its own step


SAMPLING = {"do_sample": True, "temperature": 1.3, "top_k": 6, "top_p": 0.95, "stop_at_eos": False}


def test_sampling_is_seeded_per_sample(models) -> None:
    model, _, tok = models
    kwargs = _kwargs(tok, max_new_tokens=24, num_samples=3, **SAMPLING)
    first = generate_dna(model, ["ACGT", "GG"], seed=7, **kwargs)
    again = generate_dna(model, ["ACGT", "GG"], seed=7, **kwargs)
    assert [s.generated for s in first.samples] == [s.generated for s in again.samples]
    assert len({s.generated for s in first.samples}) == 6  # six different samples
    other_seed = generate_dna(model, ["ACGT", "GG"], seed=8, **kwargs)
    assert [s.generated for s in other_seed.samples] != [s.generated for s in first.samples]
    # Batch composition does not matter: fewer slots (refill), or the prompt alone.
    narrow = generate_dna(model, ["ACGT", "GG"], seed=7, max_batch_size=2, **kwargs)
    assert [s.generated for s in narrow.samples] == [s.generated for s in first.samples]
    alone = generate_dna(model, ["ACGT"], seed=7, **kwargs)
    assert [s.generated for s in alone.samples] == [s.generated for s in first.samples[:3]]
    # One seed per prompt: independent of the prompt's position as well.
    swapped = generate_dna(model, ["GG", "ACGT"], seed=[5, 9], **kwargs)
    in_order = generate_dna(model, ["ACGT", "GG"], seed=[9, 5], **kwargs)
    assert [s.generated for s in swapped.samples[3:]] == [s.generated for s in in_order.samples[:3]]


def test_sampling_filters(models) -> None:
    model, _, tok = models
    greedy = generate_dna(model, PROMPTS, **_kwargs(tok, stop_at_eos=False))
    top1 = generate_dna(model, PROMPTS, seed=1, **_kwargs(tok, do_sample=True, top_k=1, stop_at_eos=False))
    nucleus = generate_dna(model, PROMPTS, seed=1, **_kwargs(tok, do_sample=True, top_p=1e-6, stop_at_eos=False))
    assert [s.generated for s in top1.samples] == [s.generated for s in greedy.samples]
    assert [s.generated for s in nucleus.samples] == [s.generated for s in greedy.samples]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate_dna(model, "ACGT", **_kwargs(tok, do_sample=True, temperature=0.0))


def test_sampled_frequencies_follow_the_distribution() -> None:
    """Gumbel-max with hashed noise draws from softmax(logits / T) (8,000 draws, 4 tokens, 4-sigma bounds)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(8000, 1)
    keys = torch.tensor([sample_key(11, i) for i in range(8000)])
    steps = torch.arange(8000) % 7
    tokens, log_probs = sample_tokens(logits, torch.zeros(4), keys, steps, SamplingParams(do_sample=True,
                                                                                          temperature=2.0))
    expected = torch.softmax(logits[0] / 2.0, -1)
    observed = torch.bincount(tokens, minlength=4).float() / 8000
    assert torch.all((observed - expected).abs() < 4 * torch.sqrt(expected * (1 - expected) / 8000))
    torch.testing.assert_close(log_probs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])
    noise = gumbel_noise(keys[:2], torch.zeros(2, dtype=torch.long), 4)
    assert torch.isfinite(noise).all() and not torch.equal(noise[0], noise[1])
    assert abs(float(gumbel_noise(keys, steps, 4).mean()) - 0.5772) < 0.03  # the Euler-Mascheroni constant


def _decode_attention_case(*, seed: int, length: int):
    """One decode query per row (3 rows at positions 0, 4, 9; 8 query heads over 2 KV heads) against a float64 cache
    of ``length`` positions, and the mask of each row's valid positions."""
    torch.manual_seed(seed)
    batch, heads, kv_heads, dim = 3, 8, 2, 16
    q = torch.randn(batch, 1, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(batch, length, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    positions = torch.tensor([0, 4, 9])
    mask = (torch.arange(length)[None] <= positions[:, None])[:, None, None, :]
    return q, k, v, mask


def test_kv_decode_attention_equals_repeated_kv_sdpa() -> None:
    """Folding the query-head groups into the query length is the same attention as repeat_kv + sdpa."""
    q, k, v, mask = _decode_attention_case(seed=0, length=10)
    ours = kv_decode_attention(q, k, v, AttentionInputs(backend="kv_decode", causal=True, attention_mask=mask), 0.25)
    reference = sdpa_attention(q, k, v, AttentionInputs(backend="sdpa", causal=True, attention_mask=mask), 0.25)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager_sdpa", "compiled_math"])
def test_kv_decode_attention_ignores_stale_cache_positions(monkeypatch, compiling) -> None:
    """Both formulations (SDPA eagerly; the spelled-out one torch.compile traces, since the compiled masked SDPA
    leaked stale cache rows on an H200) read only positions <= each row's own: huge values beyond change nothing."""
    q, k, v, mask = _decode_attention_case(seed=1, length=12)
    inputs = AttentionInputs(backend="kv_decode", causal=True, attention_mask=mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    clean = kv_decode_attention(q, k, v, inputs, None)
    stale = ~mask[:, 0, 0, :, None, None].expand_as(k)
    ours = kv_decode_attention(q, k.masked_fill(stale, 1e4), v.masked_fill(stale, -1e4), inputs, None)
    torch.testing.assert_close(ours, clean, rtol=0, atol=0)
    reference = sdpa_attention(q, k, v, AttentionInputs(backend="sdpa", causal=True, attention_mask=mask), None)
    torch.testing.assert_close(clean, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_reference", "compiled_block_sparse"])
def test_flex_decode_attention_reads_each_slot_up_to_its_own_position(compiled) -> None:
    """The "flex" decode attention (FlexAttention over the cache's blocks) equals SDPA with the dense mask, for slots in
    the first block, on a block boundary and in the last block, with huge stale values beyond each position. Compiled,
    FlexAttention visits only the counted blocks (eagerly it applies the mask densely), so a wrong block count fails
    the compiled case."""
    torch.manual_seed(2)
    batch, heads, kv_heads, dim, length = 4, 8, 2, 16, 3 * DECODE_KV_BLOCK
    cache = StaticKVCache(num_layers=1, num_slots=batch, max_length=length, num_kv_heads=kv_heads, head_dim=dim,
                          dtype=torch.float32, device=torch.device("cpu"), flex_decode=True)  # fmt: skip
    positions = torch.tensor([3, DECODE_KV_BLOCK - 1, DECODE_KV_BLOCK, length - 1])
    q = torch.randn(batch, 1, heads, dim)
    k, v = (torch.randn(batch, length, kv_heads, dim) for _ in range(2))
    valid = torch.arange(length)[None] <= positions[:, None]
    stale = ~valid[:, :, None, None].expand_as(k)
    k_stale, v_stale = k.masked_fill(stale, 1e4), v.masked_fill(stale, -1e4)

    def attend(q, k, v, positions):
        inputs = AttentionInputs(backend="kv_decode", causal=True, block_mask=cache.decode_block_mask(positions))
        return kv_decode_attention(q, k, v, inputs, 0.25)

    ours = (torch.compile(attend, dynamic=False) if compiled else attend)(q, k_stale, v_stale, positions)
    reference = sdpa_attention(q, k, v, AttentionInputs(backend="sdpa", causal=True,
                                                        attention_mask=valid[:, None, None, :]), 0.25)  # fmt: skip
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def _reference_flash_varlen(q, k, v, inputs, scale):
    """What FlashAttention-2's varlen forward computes, written out: sequence ``i`` is rows ``cu_q[i]:cu_q[i+1]`` of
    ``q`` against rows ``cu_k[i] : cu_k[i] + seqused_k[i]`` of ``k``/``v`` (bidirectional; query head ``h`` reads KV
    head ``h // G``)."""
    out = torch.zeros_like(q)
    cu_q, cu_k, used = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist(), inputs.seqused_k.tolist()
    groups = q.shape[1] // k.shape[1]
    assert inputs.max_seqlen_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert inputs.max_seqlen_k == max(b - a for a, b in zip(cu_k, cu_k[1:])) and max(used) <= inputs.max_seqlen_k
    for i in range(len(cu_q) - 1):
        for h in range(q.shape[1]):
            keys = k[cu_k[i] : cu_k[i] + used[i], h // groups]
            values = v[cu_k[i] : cu_k[i] + used[i], h // groups]
            weights = (q[cu_q[i] : cu_q[i + 1], h] @ keys.T * scale).softmax(-1)
            out[cu_q[i] : cu_q[i + 1], h] = weights @ values
    return out


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """The ``"varlen"`` decode attention with the kernel replaced by :func:`_reference_flash_varlen`, so the CPU
    tests check what bioscale arranges around the kernel (the GPU tests run the kernel itself)."""
    import bioscale.use.generation_engine as engine_module

    monkeypatch.setattr(decoding, "_flash_varlen_forward", _reference_flash_varlen)
    monkeypatch.setattr(decoding, "varlen_available", lambda device, dtype: True)
    monkeypatch.setattr(engine_module, "varlen_available", lambda device, dtype: True)


def test_varlen_decode_attention_reads_each_slot_and_kv_head_up_to_its_position(varlen_on_cpu) -> None:
    """Every (slot, KV head) is one varlen sequence over that head's cache row, as the cache lays it out
    ``[B, H_kv, S, D]``: equal to SDPA with the dense mask, with huge stale values beyond each position."""
    q, k, v, mask = _decode_attention_case(seed=4, length=12)
    positions = torch.tensor([0, 4, 9])
    stale = ~mask[:, 0, 0, :, None, None].expand_as(k)
    # The cache's own layout, seen [B, S, H_kv, D] as the blocks hand it over.
    k_cache = k.masked_fill(stale, 1e4).transpose(1, 2).contiguous().transpose(1, 2)
    v_cache = v.masked_fill(stale, -1e4).transpose(1, 2).contiguous().transpose(1, 2)
    inputs = decoding.varlen_decode_inputs(positions, num_kv_heads=2, groups=4, max_length=12)
    ours = kv_decode_attention(q, k_cache, v_cache, inputs, 0.25)
    reference = sdpa_attention(q, k, v, AttentionInputs(backend="sdpa", causal=True, attention_mask=mask), 0.25)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_varlen_decode_step_equals_the_dense_step(models, varlen_on_cpu) -> None:
    """The whole engine with the ``"varlen"`` decode attention (refill included: 5 prompts, 2 slots) gives the dense
    step's tokens and log-probabilities."""
    model, _hf, tok = models
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    kwargs = dict(max_new_tokens=16, keys=[(0, 0)] * len(ids), eos_token_id=None)
    dense = GenerationEngine(model, max_batch_size=2, compile_step=False).generate(ids, **kwargs)
    varlen = GenerationEngine(model, max_batch_size=2, compile_step=False, decode_attention="varlen").generate(
        ids, **kwargs)  # fmt: skip
    assert [o.token_ids for o in varlen] == [o.token_ids for o in dense]
    for a, b in zip(varlen, dense):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), rtol=0, atol=1e-5)


def test_varlen_decode_attention_needs_cuda_and_half_precision(models) -> None:
    with pytest.raises(ValueError, match="needs a CUDA model in fp16 / bf16"):
        decode_attention_mode("varlen", device=torch.device("cpu"), dtype=torch.float32)
    ids = [[models[2].bos_token_id, 5]]
    with pytest.raises(ValueError, match="needs a CUDA model in fp16 / bf16"):
        GenerationEngine(models[0], decode_attention="varlen").generate(ids, max_new_tokens=2, keys=[(0, 0)])


def test_flex_decode_needs_a_whole_number_of_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        StaticKVCache(num_layers=1, num_slots=1, max_length=DECODE_KV_BLOCK + 1, num_kv_heads=1, head_dim=16,
                      dtype=torch.float32, device=torch.device("cpu"), flex_decode=True)  # fmt: skip


def test_decode_attention_default_is_varlen_only_with_a_slot_and_kv_head_per_multiprocessor(monkeypatch) -> None:
    """The choice as a pure function of the machine and the session: FlashAttention-2 varlen where it can run and
    (slots x KV heads) fill the GPU's multiprocessors, the dense step otherwise (and on CPU / in float32)."""
    import types

    import bioscale.use.generation_engine as engine_module

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(engine_module, "varlen_available",
                        lambda device, dtype: device.type == "cuda" and dtype == torch.bfloat16)
    assert decode_attention_mode(None, device=cuda, dtype=torch.bfloat16, num_slots=32, num_kv_heads=8) == "varlen"
    assert decode_attention_mode(None, device=cuda, dtype=torch.bfloat16, num_slots=1, num_kv_heads=8) == "dense"
    assert decode_attention_mode(None, device=cuda, dtype=torch.bfloat16, num_slots=16, num_kv_heads=8) == "dense"
    assert decode_attention_mode(None, device=cuda, dtype=torch.float32, num_slots=32, num_kv_heads=8) == "dense"
    cpu = torch.device("cpu")
    assert decode_attention_mode(None, device=cpu, dtype=torch.bfloat16, num_slots=64, num_kv_heads=8) == "dense"
    assert decode_attention_mode("dense", device=cuda, dtype=torch.bfloat16, num_slots=32, num_kv_heads=8) == "dense"


def test_decode_attention_is_dense_unless_given(models) -> None:
    assert decode_attention_mode(None) == "dense"
    assert decode_attention_mode("flex") == "flex"
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        GenerationEngine(models[0], decode_attention="paged")


def test_compiled_flex_step_equals_the_dense_step(models) -> None:
    """The compiled step (FlexAttention, block-sparse) gives the uncompiled dense step's tokens and log-probabilities
    in float32, with one prompt long enough that its positions cross a block boundary while it decodes."""
    model, _hf, tok = models
    long_prompt = "ACGTTGCAGT" * 12  # 121 tokens with <bos>: positions 121 .. 136 cross the first block's end
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in [long_prompt, *PROMPTS[:2]]]
    kwargs = dict(max_new_tokens=16, keys=[(0, 0)] * len(ids), eos_token_id=None)
    dense = GenerationEngine(model, compile_step=False).generate(ids, **kwargs)
    flex = GenerationEngine(model, compile_step=True, decode_attention="flex").generate(ids, **kwargs)
    assert [o.token_ids for o in flex] == [o.token_ids for o in dense]
    for f, d in zip(flex, dense):
        torch.testing.assert_close(torch.tensor(f.log_probs), torch.tensor(d.log_probs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_linears_as_reductions_equal_f_linear(bias) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(3, 1, 24)
    with decoding.LinearsAsReductions():
        ours = layer(x)
        untouched = torch.matmul(x, layer.weight.T)  # only F.linear is rewritten
    torch.testing.assert_close(ours, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    assert ours.shape == (3, 1, 40) and untouched.shape == (3, 1, 40)
    # Half precision in, half precision out (the sum runs in float32).
    with decoding.LinearsAsReductions():
        half = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    exact = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    torch.testing.assert_close(half.double(), exact, rtol=0, atol=0.03)


def _matmuls_in_one_step(engine: GenerationEngine, ids: list[list[int]] | None = None) -> int:
    """aten linear / mm / addmm calls of one decode step of the engine's (only) session."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func in (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    if ids is not None:
        engine.generate(ids, max_new_tokens=2, keys=[(0, 0)] * len(ids), eos_token_id=None)
    (session,) = engine._sessions.values()
    with torch.inference_mode(), Count():  # as the engine runs its steps
        session.step()
    return Count.calls


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reduction_linear_step_equals_the_gemm_step(models, compiled) -> None:
    """The whole engine with every linear of the decode step spelled as a reduction (refill included: 5 prompts, 2
    slots; compiled by Inductor, where it fuses with the norms and residuals) gives the GEMM step's tokens and
    log-probabilities in float32."""
    model, _hf, tok = models
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    kwargs = dict(max_new_tokens=12, keys=[(0, 0)] * len(ids), eos_token_id=None)
    gemm = GenerationEngine(model, max_batch_size=2, compile_step=False).generate(ids, **kwargs)
    engine = GenerationEngine(model, max_batch_size=2, compile_step=compiled, decode_linear="reduction")
    reduction = engine.generate(ids, **kwargs)
    assert [key[-1] for key in engine._sessions] == ["reduction"]
    if not compiled:  # the decode step itself runs no matrix multiply: every linear became a reduction
        assert _matmuls_in_one_step(engine) == 0
        assert _matmuls_in_one_step(GenerationEngine(model, max_batch_size=2, compile_step=False), ids) > 0
    assert [o.token_ids for o in reduction] == [o.token_ids for o in gemm]
    for a, b in zip(reduction, gemm):
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), rtol=0, atol=1e-4)


def test_decode_linear_default_is_reduction_only_for_compiled_small_steps(models, monkeypatch) -> None:
    import bioscale.use.generation_engine as engine_module

    monkeypatch.setattr(engine_module, "REDUCTION_LINEAR_MAX_SLOTS", 2)
    assert decode_linear_mode(None, compiled=True, num_slots=1) == "reduction"
    assert decode_linear_mode(None, compiled=True, num_slots=2) == "reduction"
    assert decode_linear_mode(None, compiled=True, num_slots=4) == "gemm"
    assert decode_linear_mode(None, compiled=False, num_slots=1) == "gemm"  # eager: it would materialise products
    assert decode_linear_mode("reduction", compiled=False) == "reduction"
    with pytest.raises(ValueError, match="decode_linear must be one of"):
        GenerationEngine(models[0], decode_linear="int8")
    with pytest.raises(ValueError, match="decode linear must be one of"):
        decoding.decode_forward(decoder_parts(models[0]), None, torch.zeros(1, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long), linear="int8")  # fmt: skip


def test_the_decode_step_is_compiled_only_where_it_pays() -> None:
    from bioscale.use.generation_engine import AUTOTUNE_MAX_SLOTS, AUTOTUNE_MIN_DECODE_STEPS
    from bioscale.use.generation_engine import COMPILE_MIN_DECODE_STEPS as steps

    large = AUTOTUNE_MAX_SLOTS + 1
    assert not should_compile_step(None, device_type="cuda", decode_steps=256, num_slots=large)
    assert should_compile_step(None, device_type="cuda", decode_steps=steps, num_slots=large)
    assert not should_compile_step(None, device_type="cpu", decode_steps=10 * steps, num_slots=large)
    assert should_compile_step(True, device_type="cpu", decode_steps=1)
    assert not should_compile_step(False, device_type="cuda", decode_steps=10 * steps)
    # Few slots: the autotuned compile is longer, so it needs a longer call to pay.
    assert not should_compile_step(None, device_type="cuda", decode_steps=steps, num_slots=1)
    assert should_compile_step(None, device_type="cuda", decode_steps=AUTOTUNE_MIN_DECODE_STEPS, num_slots=1)


def test_decode_compile_options_autotune_only_single_slot_steps_on_cuda() -> None:
    from bioscale.use.generation_engine import AUTOTUNE_MAX_SLOTS, decode_compile_options

    assert decode_compile_options(1, "cuda") == {"mode": "max-autotune-no-cudagraphs"}
    assert decode_compile_options(AUTOTUNE_MAX_SLOTS, "cuda") == {"mode": "max-autotune-no-cudagraphs"}
    assert decode_compile_options(AUTOTUNE_MAX_SLOTS + 1, "cuda") == {}
    assert decode_compile_options(1, "cpu") == {}


def test_compile_options_reach_the_decode_step_compile(models) -> None:
    """``compile_options`` are torch.compile's own arguments: the eager backend gives the uncompiled tokens, and a mode
    torch does not know fails at the compile, so they are not dropped on the way."""
    model, _hf, tok = models
    ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    kwargs = dict(max_new_tokens=6, keys=[(0, 0)] * len(ids), eos_token_id=None)
    plain = GenerationEngine(model, compile_step=False).generate(ids, **kwargs)
    eager = GenerationEngine(model, compile_step=True, compile_options={"backend": "eager"}).generate(ids, **kwargs)
    assert [o.token_ids for o in eager] == [o.token_ids for o in plain]
    with pytest.raises(RuntimeError, match="not-a-mode"):
        GenerationEngine(model, compile_step=True, compile_options={"mode": "not-a-mode"}).generate(ids, **kwargs)


def test_static_cache_writes_prefill_and_decode_positions(models) -> None:
    model, _, _ = models
    parts = decoder_parts(model)
    assert parts is not None
    cache = StaticKVCache(num_layers=1, num_slots=3, max_length=6, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                          device=torch.device("cpu"))  # fmt: skip
    k = torch.arange(5 * 2 * 4, dtype=torch.float32).reshape(1, 2, 5, 4)  # [1, H_kv, T, D], packed tokens
    cache.prefilling(torch.tensor([2, 2, 2, 0, 0]), torch.tensor([0, 1, 2, 0, 1]))
    assert cache.update(k, -k, 0)[0] is k  # prefill: attention reads the packed K/V
    torch.testing.assert_close(cache.k[0][2, :, :3], k[0, :, :3])
    torch.testing.assert_close(cache.v[0][0, :, :2], -k[0, :, 3:])
    step = torch.ones(3, 2, 1, 4)
    cache.decoding(torch.tensor([2, 5, 3]))
    full_k, _ = cache.update(step, step, 0)
    assert full_k is cache.k[0] and full_k[0, :, 2].eq(1).all() and full_k[1, :, 5].eq(1).all()
    assert full_k[2, :, 3].eq(1).all() and full_k[2, :, 2].equal(k[0, :, 2])  # the prompt's keys stay
    assert math.isclose(float(cache.k[0][1, :, :5].abs().sum()), 0.0)


def test_cached_engine_dies_with_its_model() -> None:
    """generate_dna keeps one engine per model (KV cache, graphs) without keeping the model alive."""
    import gc
    import weakref

    from bioscale.use.generation_engine import _ENGINES

    tok = nucleotide_tokenizer()
    config = build_config("llama3", "debug", vocab_size=len(tok), bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = build_model(config, task="causal_lm", device="cpu").eval()
    generate_dna(model, "ACGT", max_new_tokens=2, tokenizer=tok, device="cpu")
    assert model in _ENGINES
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_no_op_cast_keeps_every_tensor_the_captured_graph_reads(models) -> None:
    """generate_dna calls ``model.to(device, dtype)`` every time; when that changes nothing, no parameter or buffer may
    move (a captured CUDA graph reads them by address: RotaryEmbedding used to rebuild its float32 ``inv_freq`` on
    every cast, so a second call on the GPU read freed memory and sampled other tokens)."""
    model = build_model(models[0].config, task="causal_lm", device="cpu").to(torch.bfloat16)
    before = {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    model.to(device="cpu", dtype=torch.bfloat16)
    after = {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after == before
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("inv_freq"))


def test_engine_discards_its_sessions_when_any_buffer_moves(models) -> None:
    model, _hf, tok = models
    engine = GenerationEngine(model, max_batch_size=2)
    ids = [[tok.bos_token_id] + tok("ACGT", add_special_tokens=False)["input_ids"]]
    kwargs = dict(max_new_tokens=3, keys=[(0, 0)], eos_token_id=None)
    engine.generate(ids, **kwargs)
    session = next(iter(engine._sessions.values()))
    engine.generate(ids, **kwargs)
    assert next(iter(engine._sessions.values())) is session  # nothing moved: the session is reused
    rotary = decoder_parts(model).rotary
    rotary.inv_freq = rotary.inv_freq.clone()  # a buffer at a new address (the parameters stay where they were)
    engine.generate(ids, **kwargs)
    assert next(iter(engine._sessions.values())) is not session
