"""ESM-2 equals transformers' ESM: padded logits, packed == padded, no leakage, losses, heads, vocabulary padding."""

from __future__ import annotations

import pytest
import torch
from model_test_utils import ESM_MASK, ESM_PAD, esm_padded_batch, esm_reference_lengths, pack, tiny_esm_config
from transformers import EsmForMaskedLM, EsmForTokenClassification

from bioscale.models import from_hf
from bioscale.models.esm2 import Esm2Config, Esm2ForSequenceClassification, mean_pool
from bioscale.models.esm2.modeling import Esm2Model

LENGTHS = [13, 7, 10]


@pytest.fixture
def hf_mlm() -> EsmForMaskedLM:
    return EsmForMaskedLM(tiny_esm_config()).eval()


def _mlm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(4, 30, input_ids.shape, generator=gen)
    labels[(input_ids != ESM_MASK) | (attention_mask == 0)] = -100
    return labels


@pytest.mark.parametrize("overrides", [{}, {"emb_layer_norm_before": True}, {"token_dropout": False}])
def test_padded_logits_match_transformers(overrides: dict) -> None:
    hf = EsmForMaskedLM(tiny_esm_config(**overrides)).eval()
    model = from_hf(hf).eval()
    input_ids, attention_mask = esm_padded_batch(esm_reference_lengths(LENGTHS))
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


def test_mlm_loss_matches_transformers_and_sum_reduction(hf_mlm: EsmForMaskedLM) -> None:
    model = from_hf(hf_mlm).eval()
    input_ids, attention_mask = esm_padded_batch(esm_reference_lengths(LENGTHS), mask_fraction=0.4)
    labels = _mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        expected = hf_mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        mean = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        total = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum")
    torch.testing.assert_close(mean.loss, expected, atol=1e-5, rtol=1e-5)
    assert mean.num_label_tokens.item() == int((labels != -100).sum())
    torch.testing.assert_close(total.loss, mean.loss * mean.num_label_tokens, atol=1e-4, rtol=1e-5)


def test_packed_equals_padded_per_sequence(hf_mlm: EsmForMaskedLM) -> None:
    # Masks sit in different sequences at different ratios, so per-sequence token-dropout scaling is exercised.
    model = from_hf(hf_mlm).eval()
    input_ids, attention_mask = esm_padded_batch(LENGTHS, mask_fraction=0.3)
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        packed = model(**pack(input_ids, attention_mask)).logits
    assert packed.shape == (1, sum(LENGTHS), 33)
    torch.testing.assert_close(packed[0], padded[attention_mask.bool()], atol=1e-5, rtol=0)


def test_packed_unbatched_input_and_derived_position_ids(hf_mlm: EsmForMaskedLM) -> None:
    model = from_hf(hf_mlm).eval()
    input_ids, attention_mask = esm_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    with torch.no_grad():
        reference = model(**batch).logits[0]
        batch["input_ids"] = batch["input_ids"][0]  # [T]
        del batch["position_ids"]  # derived from cu_seq_lens
        actual = model(**batch).logits
    assert actual.shape == reference.shape
    torch.testing.assert_close(actual, reference, atol=0, rtol=0)


def test_no_cross_sequence_leakage_in_packed_batch(hf_mlm: EsmForMaskedLM) -> None:
    model = from_hf(hf_mlm).eval()
    input_ids, attention_mask = esm_padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    changed = dict(batch)
    changed_ids = batch["input_ids"].clone()
    start, end = 13, 13 + 7  # the second sequence
    changed_ids[0, start + 1 : end - 1] = torch.randint(4, 30, (end - start - 2,))
    changed["input_ids"] = changed_ids
    with torch.no_grad():
        before = model(**batch).logits[0]
        after = model(**changed).logits[0]
    others = torch.ones(sum(LENGTHS), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[~others] - before[~others]).abs().max() > 1e-3  # the edit itself did change something


def test_logits_on_labels_only_gives_same_loss_and_gradients(hf_mlm: EsmForMaskedLM) -> None:
    input_ids, attention_mask = esm_padded_batch(LENGTHS, mask_fraction=0.3)
    labels = _mlm_labels(input_ids, attention_mask)
    full_model, sparse_model = from_hf(hf_mlm), from_hf(hf_mlm)
    full = full_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    sparse = sparse_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, logits_on_labels_only=True)
    full.loss.backward()
    sparse.loss.backward()
    num_labels = int((labels != -100).sum())
    assert sparse.logits.shape == (num_labels, 33)
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100], atol=1e-6, rtol=0)
    for (name, p_full), p_sparse in zip(full_model.named_parameters(), sparse_model.parameters(), strict=True):
        assert p_full.grad is not None, name
        torch.testing.assert_close(p_sparse.grad, p_full.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_vocabulary_padding_changes_nothing(hf_mlm: EsmForMaskedLM) -> None:
    plain, padded = from_hf(hf_mlm).eval(), from_hf(hf_mlm, padded_vocab_size=64).eval()
    assert padded.esm.embeddings.word_embeddings.weight.shape == (64, 64)
    assert padded.lm_head.bias.shape == (64,)
    input_ids, attention_mask = esm_padded_batch(LENGTHS, mask_fraction=0.3)
    labels = _mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        a = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        b = padded(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert b.logits.shape[-1] == 33
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)


def test_token_classification_matches_transformers() -> None:
    hf = EsmForTokenClassification(tiny_esm_config(num_labels=3)).eval()
    model = from_hf(hf).eval()
    input_ids, attention_mask = esm_padded_batch(esm_reference_lengths(LENGTHS))
    labels = torch.randint(0, 3, input_ids.shape)
    labels[attention_mask == 0] = -100
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        actual = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        packed = model(**pack(input_ids, attention_mask, labels))
    real = attention_mask.bool()
    torch.testing.assert_close(actual.logits[real], expected.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.loss, actual.loss, atol=1e-5, rtol=1e-5)


def test_sequence_classification_pools_per_sequence_when_packed() -> None:
    config = Esm2Config(
        vocab_size=33, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    model = Esm2ForSequenceClassification(config).eval()
    input_ids, attention_mask = esm_padded_batch(LENGTHS)
    targets = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask, labels=targets)
        packed_batch = pack(input_ids, attention_mask)
        packed = model(**packed_batch, labels=targets)
        hidden = model.esm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert padded.logits.shape == packed.logits.shape == (3, 1)
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.loss, ((padded.logits.squeeze(-1) - targets) ** 2).mean(), atol=1e-6, rtol=0)
    # Reference pooling: a plain mean over each sequence's real tokens.
    for row, length in enumerate(LENGTHS):
        batch = model.esm.prepare_batch(input_ids, attention_mask)
        torch.testing.assert_close(mean_pool(hidden, batch)[row], hidden[row, :length].mean(0), atol=1e-6, rtol=0)


def test_base_model_returns_final_hidden_states(hf_mlm: EsmForMaskedLM) -> None:
    model = from_hf(hf_mlm).eval()
    input_ids, attention_mask = esm_padded_batch(esm_reference_lengths(LENGTHS))
    with torch.no_grad():
        expected = hf_mlm.esm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = model.esm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert isinstance(model.esm, Esm2Model) and model.layers is model.esm.layers
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


def test_block_carries_the_residual_stream_as_two_tensors(hf_mlm: EsmForMaskedLM) -> None:
    """A block given ``(hidden, residual)`` runs on their sum and returns ``(mlp_out, h)`` whose sum is the one-tensor
    pre-LN block ``h = x + attn(LN(x)); h + mlp(LN(h))`` -- bit for bit, so deferring the add changes nothing."""
    model = from_hf(hf_mlm).eval()
    block = model.layers[0]
    input_ids, attention_mask = esm_padded_batch(esm_reference_lengths(LENGTHS))
    batch = model.esm.prepare_batch(input_ids, attention_mask)
    from bioscale.models.common import attention_inputs_for_batch

    gen = torch.Generator().manual_seed(0)
    hidden, residual = (torch.randn(*input_ids.shape, model.config.hidden_size, generator=gen) for _ in range(2))
    rotary = model.esm.rotary(batch.position_ids, hidden.dtype)
    attn_inputs = attention_inputs_for_batch(batch, hidden, backend="sdpa", causal=False, dropout_p=0.0)
    with torch.no_grad():
        out, carried = block(hidden, rotary, attn_inputs, residual)
        x = hidden + residual
        h = x + block.attention(block.attention_norm(x), rotary, attn_inputs)
        expected = h + block.mlp(block.mlp_norm(h))
        first_out, first_carried = block(x, rotary, attn_inputs)
    assert torch.equal(carried, h) and torch.equal(out + carried, expected)
    assert torch.equal(first_out + first_carried, expected)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager FlexAttention is a CPU debug path
def test_flex_backend_matches_sdpa_on_cpu(hf_mlm: EsmForMaskedLM) -> None:
    sdpa, flex = from_hf(hf_mlm).eval(), from_hf(hf_mlm, attn_backend="flex").eval()
    input_ids, attention_mask = esm_padded_batch(LENGTHS)
    with torch.no_grad():
        expected = sdpa(**pack(input_ids, attention_mask)).logits
        actual = flex(**pack(input_ids, attention_mask)).logits
        padded_expected = sdpa(input_ids=input_ids, attention_mask=attention_mask).logits
        padded_actual = flex(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    real = attention_mask.bool()
    torch.testing.assert_close(padded_actual[real], padded_expected[real], atol=1e-5, rtol=0)


def test_attention_dropout_on_packed_batch_is_rejected_in_training() -> None:
    model = from_hf(EsmForMaskedLM(tiny_esm_config(attention_probs_dropout_prob=0.1))).train()
    input_ids, attention_mask = esm_padded_batch(LENGTHS)
    with pytest.raises(ValueError, match="attention dropout"):
        model(**pack(input_ids, attention_mask))
    model(input_ids=input_ids, attention_mask=attention_mask)  # padded sdpa batches support it


def test_padding_token_embedding_row_is_zero_after_init() -> None:
    config = Esm2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, padded_vocab_size=40
    )
    weight = Esm2Model(config).embeddings.word_embeddings.weight
    assert torch.count_nonzero(weight[ESM_PAD]) == 0
    assert torch.count_nonzero(weight[33:]) == 0  # vocabulary-padding rows
    assert torch.count_nonzero(weight[:33]) > 0
