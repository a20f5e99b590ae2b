"""Bad inputs fail with a ValueError that says what is wrong; value checks can be switched off."""

from __future__ import annotations

import pytest
import torch
from model_test_utils import esm_padded_batch, llama_padded_batch, pack

from bioscale.models import input_validation
from bioscale.models.esm2 import Esm2Config, Esm2ForMaskedLM
from bioscale.models.llama3 import Llama3Config, Llama3ForCausalLM


@pytest.fixture(scope="module")
def esm() -> Esm2ForMaskedLM:
    config = Esm2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return Esm2ForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> Llama3ForCausalLM:
    config = Llama3Config(
        vocab_size=21,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return Llama3ForCausalLM(config).eval()


def _packed() -> dict:
    return pack(*esm_padded_batch([6, 4, 5]))


def _with(batch: dict, **changes: object) -> dict:
    return {**batch, **changes}


BAD_PACKED = [
    (
        "cu_seq_lens int64",
        lambda b: _with(b, cu_seq_lens_q=b["cu_seq_lens_q"].long(), cu_seq_lens_k=None),
        "must be int32",
    ),
    (
        "cu_seq_lens short",
        lambda b: _with(b, cu_seq_lens_q=torch.tensor([0, 6, 10, 14], dtype=torch.int32), cu_seq_lens_k=None),
        "does not end at the number of tokens \\(15\\)",
    ),
    (
        "cu_seq_lens not from 0",
        lambda b: _with(b, cu_seq_lens_q=torch.tensor([1, 6, 10, 15], dtype=torch.int32), cu_seq_lens_k=None),
        "does not start at 0",
    ),
    (
        "cu_seq_lens decreasing",
        lambda b: _with(b, cu_seq_lens_q=torch.tensor([0, 10, 6, 15], dtype=torch.int32), cu_seq_lens_k=None),
        "not non-decreasing",
    ),
    ("cu_seq_lens 2-D", lambda b: _with(b, cu_seq_lens_q=b["cu_seq_lens_q"][None], cu_seq_lens_k=None), "1-D tensor"),
    (
        "q/k differ",
        lambda b: _with(b, cu_seq_lens_k=torch.tensor([0, 5, 10, 15], dtype=torch.int32)),
        "cu_seq_lens_k differs",
    ),
    ("max_length too small", lambda b: _with(b, max_length_q=3, max_length_k=3), "longer than max_length_q \\(3\\)"),
    ("positions disagree", lambda b: _with(b, position_ids=torch.arange(15)[None]), "position_ids do not restart"),
    (
        "batch of 2",
        lambda b: _with(b, input_ids=b["input_ids"].expand(2, -1), position_ids=None),
        "must be \\[1, T\\] or \\[T\\]",
    ),
    (
        "padding mask",
        lambda b: _with(b, attention_mask=torch.ones_like(b["input_ids"])),
        "attention_mask must be None for packed",
    ),
    ("max_length alone", lambda b: {"input_ids": b["input_ids"], "max_length_q": 6}, "without cu_seq_lens"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), BAD_PACKED, ids=[c[0] for c in BAD_PACKED])
def test_bad_packed_metadata_raises(esm: Esm2ForMaskedLM, case: str, mutate, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        esm(**mutate(_packed()))


def test_packed_positions_without_cu_seq_lens_derive_the_boundaries(esm: Esm2ForMaskedLM) -> None:
    # DataCollatorWithFlattening's default output (issue 22): restarting positions in a [1, T] row are a packed batch.
    batch = _packed()
    derived = esm(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(derived, esm(**batch).logits, rtol=0, atol=0)
    # Several rows whose positions restart inside a row cannot be told apart from a mistake: still refused.
    with pytest.raises(ValueError, match="cu_seq_lens_q/k were not given"):
        esm(input_ids=batch["input_ids"].expand(2, -1), position_ids=batch["position_ids"].expand(2, -1))


@pytest.mark.parametrize("bad_id", [-1, 33])
def test_token_ids_outside_vocabulary_raise(esm: Esm2ForMaskedLM, bad_id: int) -> None:
    input_ids, attention_mask = esm_padded_batch([6, 4])
    input_ids[0, 2] = bad_id
    with pytest.raises(ValueError, match="token ids"):
        esm(input_ids=input_ids, attention_mask=attention_mask)
    batch = pack(input_ids, attention_mask)
    with pytest.raises(ValueError, match="token ids"):
        esm(**batch)


def test_wrong_shapes_and_dtypes_raise(esm: Esm2ForMaskedLM, llama: Llama3ForCausalLM) -> None:
    input_ids, attention_mask = esm_padded_batch([6, 4])
    with pytest.raises(ValueError, match="int64 or int32"):
        esm(input_ids=input_ids.float())
    with pytest.raises(ValueError, match="shape"):
        esm(input_ids=input_ids[None])
    with pytest.raises(ValueError, match="attention_mask must be \\[B, S\\]"):
        esm(input_ids=input_ids, attention_mask=attention_mask[:1])
    with pytest.raises(ValueError, match="position_ids shape"):
        esm(input_ids=input_ids, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match="labels shape"):
        esm(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids[:, :3])
    with pytest.raises(ValueError, match="loss_reduction"):
        esm(input_ids=input_ids, labels=input_ids, loss_reduction="avg")
    ids, mask = llama_padded_batch([5, 3])
    with pytest.raises(ValueError, match="logits_to_keep cannot be combined"):
        llama(input_ids=ids, attention_mask=mask, labels=ids, logits_to_keep=1)


def test_float_attention_mask_is_read_as_zero_one(esm: Esm2ForMaskedLM, llama: Llama3ForCausalLM) -> None:
    # transformers accepts a 0/1 float mask (torch.ones(B, S) is float); an additive 0/-inf mask must not pass.
    for model, (input_ids, attention_mask) in ((esm, esm_padded_batch([6, 4])), (llama, llama_padded_batch([5, 3]))):
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
            got = model(input_ids=input_ids, attention_mask=attention_mask.float()).logits
        assert torch.equal(got, expected)
        additive = torch.zeros_like(attention_mask, dtype=torch.float32).masked_fill(attention_mask == 0, -torch.inf)
        with pytest.raises(ValueError, match="float attention_mask must hold only 0 and 1"):
            model(input_ids=input_ids, attention_mask=additive)


def test_unknown_keyword_arguments_raise(esm: Esm2ForMaskedLM) -> None:
    batch = _packed()
    batch["cu_seq_len_q"] = batch.pop("cu_seq_lens_q")  # a typo must not silently unpack the batch
    with pytest.raises(ValueError, match="unexpected keyword argument 'cu_seq_len_q'"):
        esm(**batch)
    with pytest.raises(ValueError, match="inputs_embeds"):
        esm(inputs_embeds=torch.zeros(1, 3, 32))


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("inputs_embeds", torch.zeros(2, 6, 32), "inputs_embeds"),
        ("output_attentions", True, "attention weights"),
        ("output_hidden_states", True, "hidden states"),
        ("head_mask", torch.ones(2), "head_mask"),
        ("token_type_ids", torch.ones(2, 6, dtype=torch.long), "token_type_ids must be all zeros"),
        ("segment_ids", torch.zeros(2, 6, dtype=torch.long), "unexpected keyword argument 'segment_ids'"),
    ],
)
def test_arguments_that_would_change_the_result_are_refused(
    esm: Esm2ForMaskedLM, llama: Llama3ForCausalLM, name: str, value: object, match: str
) -> None:
    for model, (input_ids, attention_mask) in ((esm, esm_padded_batch([6, 4])), (llama, llama_padded_batch([6, 4]))):
        with pytest.raises(ValueError, match=match):
            model(input_ids=input_ids, attention_mask=attention_mask, **{name: value})


def test_what_transformers_passes_is_accepted_and_ignored(esm: Esm2ForMaskedLM, llama: Llama3ForCausalLM) -> None:
    # What generate() / Trainer pass, under the names of several releases: none of it may change the result.
    passed = dict(
        return_dict=True,
        cache_position=torch.arange(6),
        num_items_in_batch=torch.tensor(7),
        output_attentions=False,
        output_hidden_states=None,
        inputs_embeds=None,
        some_future_option=None,  # an option that is off cannot change the result, whatever its name
    )
    for model, (input_ids, attention_mask) in ((esm, esm_padded_batch([6, 4])), (llama, llama_padded_batch([6, 4]))):
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
            got = model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids), **passed
            ).logits
        assert torch.equal(got, expected)


def test_a_cache_under_any_name_is_the_kv_cache(esm: Esm2ForMaskedLM, llama: Llama3ForCausalLM) -> None:
    from transformers import DynamicCache

    input_ids, attention_mask = llama_padded_batch([6, 6])
    with torch.no_grad():
        full = llama(input_ids=input_ids).logits
        for name in ("past_key_values", "cache"):
            cache = DynamicCache()
            llama(input_ids=input_ids[:, :5], **{name: cache})
            assert cache.get_seq_length() == 5
            step = llama(input_ids=input_ids[:, 5:], position_ids=torch.full((2, 1), 5), **{name: cache}).logits
            torch.testing.assert_close(step[:, 0], full[:, 5], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="two different KV caches"):
        llama(input_ids=input_ids, past_key_values=DynamicCache(), cache=DynamicCache())
    with pytest.raises(ValueError, match="keeps no KV cache"):
        esm(input_ids=esm_padded_batch([6])[0], cache=DynamicCache())


def test_documented_ignored_arguments_equal_the_code() -> None:
    import re
    from pathlib import Path

    from bioscale.models.common import IGNORED_FORWARD_KWARGS, REFUSED_FORWARD_KWARGS

    docs = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    section = docs.split("<!-- forward-kwargs:ignored -->")[1].split("<!-- /forward-kwargs:ignored -->")[0]
    assert set(re.findall(r"^\s*\| `(\w+)` \|", section, flags=re.M)) == set(IGNORED_FORWARD_KWARGS)
    section = docs.split("<!-- forward-kwargs:refused -->")[1].split("<!-- /forward-kwargs:refused -->")[0]
    assert set(re.findall(r"^\s*\| `(\w+)` \|", section, flags=re.M)) == set(REFUSED_FORWARD_KWARGS)


def test_value_checks_can_be_switched_off(esm: Esm2ForMaskedLM) -> None:
    batch = _with(_packed(), position_ids=torch.arange(15)[None])  # only a value check catches this
    with input_validation(False):
        esm(**batch)  # no error: the caller vouches for its data
    with pytest.raises(ValueError, match="position_ids do not restart"):
        esm(**batch)


def test_kv_cache_with_packed_inputs_raises(llama: Llama3ForCausalLM) -> None:
    batch = pack(*llama_padded_batch([5, 3]))
    with pytest.raises(ValueError, match="not supported with packed inputs"):
        llama(**batch, use_cache=True)
