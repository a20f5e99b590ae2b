"""Llama 3 equals transformers' Llama: padded logits (GQA + llama3 RoPE), packed == padded, causal loss with
per-sequence shifting, greedy generation, vocabulary padding."""

from __future__ import annotations

import pytest
import torch
from model_test_utils import llama_padded_batch, pack, tiny_llama_config
from transformers import LlamaForCausalLM

from bioscale.models import from_hf
from bioscale.models.llama3 import Llama3Config, Llama3ForCausalLM, shift_labels

LENGTHS = [40, 23, 9]


@pytest.fixture
def hf_lm() -> LlamaForCausalLM:
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(attention_mask == 0, -100)


@pytest.mark.parametrize("tied", [False, True])
def test_padded_logits_match_transformers(tied: bool) -> None:
    # Sequences longer than the 16-position "original" context exercise every llama3 frequency band.
    hf = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    model = from_hf(hf).eval()
    assert (model.lm_head is None) == tied
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


def test_loss_matches_transformers(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    labels = _labels(input_ids, attention_mask)
    with torch.no_grad():
        expected = hf_lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        actual = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(actual.loss, expected, atol=1e-5, rtol=1e-5)
    assert actual.num_label_tokens.item() == sum(n - 1 for n in LENGTHS)


def test_packed_equals_padded_and_loss_never_crosses_sequences(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    labels = _labels(input_ids, attention_mask)
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum")
        packed = model(**pack(input_ids, attention_mask, labels), loss_reduction="sum")
    torch.testing.assert_close(packed.logits[0], padded.logits[attention_mask.bool()], atol=1e-5, rtol=0)
    # Same targets: each sequence contributes length - 1 predictions in both layouts, none across a boundary.
    assert packed.num_label_tokens.item() == padded.num_label_tokens.item() == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-4, rtol=1e-6)


def test_packed_unbatched_input_with_only_cu_seq_lens(hf_lm: LlamaForCausalLM) -> None:
    # input_ids [T] with cu_seq_lens_q/k alone: position_ids and max_length are derived from cu_seq_lens.
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    labels = _labels(input_ids, attention_mask)
    batch = pack(input_ids, attention_mask, labels)
    with torch.no_grad():
        reference = model(**batch)
        minimal = {key: batch[key][0] for key in ("input_ids", "labels")}
        minimal |= {key: batch[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k")}
        actual = model(**minimal)
    assert actual.logits.shape == reference.logits.shape[1:]
    torch.testing.assert_close(actual.logits, reference.logits[0], atol=0, rtol=0)
    torch.testing.assert_close(actual.loss, reference.loss, atol=0, rtol=0)


def test_no_leakage_across_sequences_and_causality(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    changed_ids = batch["input_ids"].clone()
    changed_ids[0, 0:5] = (changed_ids[0, 0:5] + 1) % 21  # first sequence, first 5 tokens
    changed_ids[0, 40 + 10] = (changed_ids[0, 40 + 10] + 1) % 21  # second sequence, position 10
    with torch.no_grad():
        before = model(**batch).logits[0]
        after = model(**{**batch, "input_ids": changed_ids}).logits[0]
    unchanged = torch.zeros(sum(LENGTHS), dtype=torch.bool)
    unchanged[40 : 40 + 10] = True  # second sequence before the edit (causal)
    unchanged[63:] = True  # third sequence entirely
    torch.testing.assert_close(after[unchanged], before[unchanged], atol=1e-6, rtol=0)
    assert (after[:5] - before[:5]).abs().max() > 1e-3


def test_shift_labels_masks_every_sequence_end() -> None:
    labels = torch.arange(10)[None]
    cu = torch.tensor([0, 0, 4, 4, 7, 10], dtype=torch.int32)  # empty sequences included
    shifted = shift_labels(labels, cu)
    assert shifted.tolist() == [[1, 2, 3, -100, 5, 6, -100, 8, 9, -100]]
    assert shift_labels(labels[0], cu).tolist() == shifted[0].tolist()
    assert shift_labels(torch.tensor([[5, 6, -100]])).tolist() == [[6, -100, -100]]


def test_pre_shifted_labels_give_the_same_loss(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask, _labels(input_ids, attention_mask))
    labels = batch.pop("labels")
    targets = shift_labels(labels, batch["cu_seq_lens_q"])
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        actual = model(**batch, shift_labels=targets).loss
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        model(**batch, labels=labels, shift_labels=targets)


def test_logits_on_labels_only_gives_same_loss_and_gradients(hf_lm: LlamaForCausalLM) -> None:
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask, _labels(input_ids, attention_mask))
    full_model, sparse_model = from_hf(hf_lm), from_hf(hf_lm)
    full = full_model(**batch)
    sparse = sparse_model(**batch, logits_on_labels_only=True)
    full.loss.backward()
    sparse.loss.backward()
    assert sparse.logits.shape == (sum(n - 1 for n in LENGTHS), 21)
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)
    for (name, p_full), p_sparse in zip(full_model.named_parameters(), sparse_model.parameters(), strict=True):
        torch.testing.assert_close(p_sparse.grad, p_full.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_vocabulary_padding_changes_nothing(hf_lm: LlamaForCausalLM) -> None:
    plain, padded = from_hf(hf_lm).eval(), from_hf(hf_lm, padded_vocab_size=64).eval()
    assert padded.lm_head.weight.shape == (64, 64)
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    labels = _labels(input_ids, attention_mask)
    with torch.no_grad():
        a = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        b = padded(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert b.logits.shape[-1] == 21
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)


def _left_padded_prompts(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, 21, (length,), generator=gen)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_matches_transformers(tied: bool) -> None:
    hf = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()
    model = from_hf(hf).eval()
    input_ids, attention_mask = _left_padded_prompts([6, 11, 3])
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        actual = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert actual.shape == (3, 11 + 24)
    assert torch.equal(actual, expected)


def test_sampling_generation_is_seeded_and_in_vocabulary(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = _left_padded_prompts([4, 7])
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=5, temperature=0.8, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(7)
    first = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    torch.manual_seed(7)
    second = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    torch.manual_seed(7)
    reference = hf_lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first, reference)  # same logits, same RNG draws
    assert int(first.max()) < 21


def test_plain_forward_builds_no_cache(hf_lm: LlamaForCausalLM) -> None:
    model = from_hf(hf_lm).eval()
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    with torch.no_grad():
        assert model(input_ids=input_ids, attention_mask=attention_mask).past_key_values is None
        assert model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values is not None


def test_gqa_config_validation() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Llama3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type 'linear'"):
        Llama3Config(rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_layers_property_exposes_blocks() -> None:
    config = Llama3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1
    )
    model = Llama3ForCausalLM(config)
    assert model.layers is model.model.layers and len(model.layers) == 3


def test_blocks_compile_without_graph_breaks_and_match_eager(hf_lm: LlamaForCausalLM) -> None:
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward without slow codegen on CPU.
    eager_model, compiled_model = from_hf(hf_lm), from_hf(hf_lm)
    for block in compiled_model.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    input_ids, attention_mask = llama_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask, _labels(input_ids, attention_mask))
    eager, compiled = eager_model(**batch), compiled_model(**batch)
    eager.loss.backward()
    compiled.loss.backward()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=0)
    grad = compiled_model.layers[0].attention.qkv_proj.weight.grad
    torch.testing.assert_close(grad, eager_model.layers[0].attention.qkv_proj.weight.grad, atol=1e-6, rtol=1e-5)
