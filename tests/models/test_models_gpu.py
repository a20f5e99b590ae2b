"""GPU numerics: bf16 close to the float32 transformers reference, the varlen kernel equal to sdpa, compiled blocks
equal to eager, FlexAttention equal to varlen, greedy generation equal to transformers on CUDA.

Run on a CUDA machine: ``python -m pytest -q tests/models/test_models_gpu.py`` (skipped without a GPU). Errors are
relative L2 norms, ``||actual - expected|| / ||expected||``: bf16 keeps ~3 significant digits, so a few layers give
errors around 1e-3 to 1e-2, while a real bug (a wrong mask, a missed boundary) gives errors near 1.
"""

from __future__ import annotations

import pytest
import torch
from model_test_utils import esm_padded_batch, llama_padded_batch, pack, tiny_esm_config, tiny_llama_config
from transformers import EsmForMaskedLM, LlamaForCausalLM

from bioscale.models import from_hf
from bioscale.models.attention import packed_attention_inputs, varlen_available
from bioscale.models.batch import sequence_ids_from_cu_seqlens

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LENGTHS = [300, 77, 513, 128]
BF16_VS_FP32 = 2e-2  # bf16 model against the float32 reference
BF16_VS_BF16 = 1e-2  # two bf16 computations of the same function (different kernels or fusion)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def _hf_reference(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "esm":
        config = tiny_esm_config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        return EsmForMaskedLM(config).to(CUDA).eval()
    config = tiny_llama_config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768
    )
    return LlamaForCausalLM(config).to(CUDA).eval()


def _batch(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = (esm_padded_batch if family == "esm" else llama_padded_batch)(LENGTHS)
    return input_ids.to(CUDA), attention_mask.to(CUDA)


@pytest.mark.parametrize("family", ["esm", "llama"])
def test_bf16_logits_close_to_float32_reference(family: str) -> None:
    hf = _hf_reference(family)
    model = from_hf(hf).to(dtype=torch.bfloat16).eval()
    input_ids, attention_mask = _batch(family)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits[real]
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits[real]
        packed = model(**pack(input_ids, attention_mask)).logits[0]
    assert padded.dtype == torch.bfloat16
    assert _relative_error(padded, expected) < BF16_VS_FP32
    assert _relative_error(packed, expected) < BF16_VS_FP32


@pytest.mark.parametrize("family", ["esm", "llama"])
def test_varlen_backend_equals_sdpa_backend(family: str) -> None:
    assert varlen_available(CUDA, torch.bfloat16), "torch.nn.attention.varlen.varlen_attn is needed (torch>=2.10)"
    hf = _hf_reference(family)
    model = from_hf(hf, attn_backend="varlen").to(dtype=torch.bfloat16)
    input_ids, attention_mask = _batch(family)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    packed_batch = pack(input_ids, attention_mask, labels)
    cu = packed_batch["cu_seq_lens_q"]
    routed = packed_attention_inputs(
        backend="varlen",
        causal=True,
        cu_seqlens=cu,
        max_seqlen=max(LENGTHS),
        sequence_ids=sequence_ids_from_cu_seqlens(cu, int(cu[-1])),
        dtype=torch.bfloat16,
    )
    assert routed.backend == "varlen"  # this batch really goes through the flash varlen kernel

    padded = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum")
    padded.loss.backward()
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = model(**packed_batch, loss_reduction="sum")
    packed.loss.backward()

    assert _relative_error(packed.logits[0], padded.logits[attention_mask.bool()]) < BF16_VS_BF16
    assert abs(packed.loss.item() - padded.loss.item()) / abs(padded.loss.item()) < BF16_VS_BF16
    for name, grad in padded_grads.items():
        assert _relative_error(dict(model.named_parameters())[name].grad, grad) < 5 * BF16_VS_BF16, name


@pytest.mark.parametrize("family", ["esm", "llama"])
def test_compiled_blocks_equal_eager_on_packed_batches(family: str) -> None:
    hf = _hf_reference(family)
    eager_model = from_hf(hf).to(dtype=torch.bfloat16)
    compiled_model = from_hf(hf).to(dtype=torch.bfloat16)
    for block in compiled_model.layers:
        block.compile(fullgraph=True)  # per-block compile, as the trainer applies it; no graph breaks allowed
    input_ids, attention_mask = _batch(family)
    batch = pack(input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100))
    eager, compiled = eager_model(**batch), compiled_model(**batch)
    eager.loss.backward()
    compiled.loss.backward()
    assert _relative_error(compiled.logits, eager.logits) < BF16_VS_BF16
    weight = "attention.qkv_proj.weight"
    eager_grad = eager_model.layers[0].get_parameter(weight).grad
    assert _relative_error(compiled_model.layers[0].get_parameter(weight).grad, eager_grad) < 5 * BF16_VS_BF16
    # A batch with other sequence lengths runs through the same compiled blocks.
    shorter = pack(input_ids[:2, :200], attention_mask[:2, :200])
    with torch.no_grad():
        assert _relative_error(compiled_model(**shorter).logits, eager_model(**shorter).logits) < BF16_VS_BF16


@pytest.mark.parametrize("family", ["esm", "llama"])
def test_flex_backend_equals_varlen_backend(family: str) -> None:
    hf = _hf_reference(family)
    varlen = from_hf(hf, attn_backend="varlen").to(dtype=torch.bfloat16).eval()
    flex = from_hf(hf, attn_backend="flex").to(dtype=torch.bfloat16).eval()
    input_ids, attention_mask = _batch(family)
    batch = pack(input_ids, attention_mask)
    with torch.no_grad():
        assert _relative_error(flex(**batch).logits, varlen(**batch).logits) < BF16_VS_BF16


def test_greedy_generation_matches_transformers_on_cuda() -> None:
    hf = _hf_reference("llama")
    model = from_hf(hf).eval()
    gen = torch.Generator().manual_seed(3)
    lengths = [6, 11, 3]
    input_ids = torch.zeros(3, 11, dtype=torch.long)
    attention_mask = torch.zeros(3, 11, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 11 - length :] = torch.randint(3, 21, (length,), generator=gen)
        attention_mask[row, 11 - length :] = 1
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(input_ids=input_ids.to(CUDA), attention_mask=attention_mask.to(CUDA), **kwargs)
        actual = model.generate(input_ids=input_ids.to(CUDA), attention_mask=attention_mask.to(CUDA), **kwargs)
    assert torch.equal(actual, expected)
