"""The ``PreTrainedModel`` contract of every family on it (``bioscale.models.hf_contract``), without a trainer: labels,
every ``DataCollatorWithFlattening`` output form, activation checkpointing, embeddings and resizing, the adapter
layout's exactness. Parametrized over the registry, so a family that adopts the mixin is checked automatically.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from transformers import DataCollatorWithFlattening
from transformers.utils.generic import find_labels

from bioscale.models import build_config, build_model, get_model_spec, to_hf
from bioscale.models.common import is_activation_checkpointed

from .helpers import contract_families, pad_collator, token_examples


def _model(name: str, task: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = build_config(name, "debug", num_labels=3)
    return build_model(config, task=task, device="cpu").eval()


def _examples(name: str, model: nn.Module, num: int = 4):
    return token_examples(model.config, causal=get_model_spec(name).causal, num=num)


@pytest.mark.parametrize("name", contract_families())
def test_trainer_finds_only_labels_on_every_task(name: str) -> None:
    for task, cls in get_model_spec(name).model_classes.items():
        expected = [] if task == "base" else ["labels"]
        assert find_labels(cls) == expected, cls.__name__
        params = inspect.signature(cls.forward).parameters
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # Trainer: loss kwargs


@pytest.mark.parametrize("name", contract_families())
def test_every_flattening_collator_form_gives_the_padded_result(name: str) -> None:
    model = _model(name)
    examples = _examples(name, model)
    padded = model(**pad_collator(model.config.pad_token_id)(examples))
    forms = {
        "position_ids only (the default)": {},
        "seq_idx": {"return_seq_idx": True},
        "seq_idx without position_ids": {"return_seq_idx": True, "return_position_ids": False},
        "flash kwargs": {"return_flash_attn_kwargs": True},
        "flash kwargs and seq_idx": {"return_flash_attn_kwargs": True, "return_seq_idx": True},
    }
    for form, kwargs in forms.items():
        batch = DataCollatorWithFlattening(**kwargs)(examples)
        out = model(**batch)
        torch.testing.assert_close(out.loss, padded.loss, rtol=1e-5, atol=1e-6, msg=form)
        assert out.num_label_tokens == padded.num_label_tokens, form


@pytest.mark.parametrize("name", contract_families())
def test_gradient_checkpointing_enable_and_disable(name: str) -> None:
    model = _model(name).train()
    batch = pad_collator(model.config.pad_token_id)(_examples(name, model))
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()  # the transformers 4 name; activation_checkpointing_enable is the same
    assert model.is_gradient_checkpointing and model.is_activation_checkpointing
    model(**batch).loss.backward()
    # The module tree is untouched (PEFT finds adapters by module name), and the gradients are the same.
    checkpointed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert checkpointed.keys() == plain.keys()
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=0, atol=0, msg=key)
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable(every_n_layers=2)
    assert [is_activation_checkpointed(b) for b in model.layers] == [i % 2 == 0 for i in range(len(model.layers))]
    copied = copy.deepcopy(model)  # a copy's checkpointed blocks run the copy's weights
    with torch.no_grad():  # one feature's scale: a uniform one is invisible to post-LN Geneformer at init
        copied.layers[0].attention_norm.weight[0].add_(1.0)
    assert not torch.equal(copied(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("name", contract_families())
def test_output_embeddings_are_the_untied_head(name: str) -> None:
    model = _model(name)
    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings or head is None:
        # A head that reads the embedding matrix has no module of its own (ESM-2; tied Llama).
        assert head is None or not model.config.tie_word_embeddings
        return
    assert isinstance(head, nn.Linear) and head.weight.shape[0] == model.config.embedding_rows
    assert head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", contract_families())
def test_resize_token_embeddings_keeps_the_model_working(name: str) -> None:
    model = _model(name)
    examples = _examples(name, model)
    batch = pad_collator(model.config.pad_token_id)(examples)
    before = model(**batch)
    vocab = model.config.vocab_size
    embedding = model.resize_token_embeddings(vocab + 5, pad_to_multiple_of=8)
    assert embedding is model.get_input_embeddings() and embedding.weight.shape[0] % 8 == 0
    assert model.config.vocab_size == vocab + 5
    after = model(**batch)
    assert after.logits.shape[-1] == vocab + 5
    torch.testing.assert_close(after.logits[..., :vocab], before.logits, rtol=0, atol=0)
    new_token = batch["input_ids"].clone()
    new_token[0, 1] = vocab + 4  # the new tokens are valid inputs now
    assert torch.isfinite(model(input_ids=new_token, attention_mask=batch["attention_mask"]).logits).all()
    # Exports follow the new vocabulary (the stock class for the families that have one, else the published format).
    exported = to_hf(model)
    rows = exported.get_input_embeddings().weight.shape[0] if isinstance(exported, nn.Module) else None
    assert rows in (None, vocab + 5)
    # And back down (a special token must stay inside the vocabulary).
    model.resize_token_embeddings(vocab)
    torch.testing.assert_close(model(**batch).logits, before.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot resize"):
        model.resize_token_embeddings(0 if model.config.pad_token_id is None else model.config.pad_token_id)


@pytest.mark.parametrize("name", contract_families())
def test_unfused_layout_is_exact_and_copies_stay_independent(name: str) -> None:
    model = _model(name)
    batch = pad_collator(model.config.pad_token_id)(_examples(name, model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(**batch).logits
    unfused = copy.deepcopy(model).unfuse_projections()
    torch.testing.assert_close(unfused(**batch).logits, expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(state[k], v) for k, v in unfused.state_dict().items())  # canonical names and values
    unfused.load_state_dict(state)  # a fused checkpoint loads into the unfused layout
    twin = copy.deepcopy(unfused)
    twin.fuse_projections()
    assert twin.projections_fused and not unfused.projections_fused  # the copy's hooks are its own
    assert all(torch.equal(state[k], v) for k, v in unfused.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in twin.state_dict().items())
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
