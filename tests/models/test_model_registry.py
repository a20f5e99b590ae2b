"""The registry: names, sizes with the published shapes, config overrides, meta builds and FLOP counts."""

from __future__ import annotations

import pytest
import torch
from transformers import EsmForMaskedLM, LlamaForCausalLM

from bioscale.models import build_config, build_model, get_model_spec, list_models
from bioscale.models.esm2 import config_to_hf as esm_config_to_hf
from bioscale.models.llama3 import config_to_hf as llama_config_to_hf


def test_registered_models_and_tasks() -> None:
    assert {"esm2", "llama3"} <= set(list_models())  # plus any a test registered (tests/third_family)
    assert set(get_model_spec("esm2").model_classes) == {
        "base",
        "masked_lm",
        "token_classification",
        "sequence_classification",
    }
    assert set(get_model_spec("llama3").model_classes) == {"base", "causal_lm"}
    for name in list_models():
        assert "debug" in get_model_spec(name).sizes


def test_unknown_names_sizes_keys_and_tasks_raise_with_choices() -> None:
    with pytest.raises(ValueError, match=r"registered models: \[.*'esm2', .*'llama3'"):
        get_model_spec("esm3")
    with pytest.raises(ValueError, match="has no size 'esm2_t6_9M'; choose one of"):
        build_config("esm2", "esm2_t6_9M")
    with pytest.raises(ValueError, match="unknown config keys \\['hidden_sise'\\]"):
        build_config("esm2", "debug", hidden_sise=8)
    with pytest.raises(ValueError, match="has no task 'causal_lm'"):
        build_model(build_config("esm2"), task="causal_lm")


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The reference is transformers' EsmForMaskedLM of the same shape (tied decoder counted once, contact head included;
# ours carries the contact head as buffers, so it is added back); the size name itself is a rounded count.
@pytest.mark.parametrize("size", ["esm2_t6_8M", "esm2_t33_650M", "esm2_t48_15B"])
def test_esm2_sizes_have_the_published_parameter_count(size: str) -> None:
    config = build_config("esm2", size)
    model = build_model(config, device="meta")
    with torch.device("meta"):
        reference = EsmForMaskedLM(esm_config_to_hf(config))
    contact_head = config.num_hidden_layers * config.num_attention_heads + 1
    assert _num_params(model) + contact_head == _num_params(reference)
    named = size.rsplit("_", 1)[1]
    named_count = float(named[:-1]) * (1e9 if named.endswith("B") else 1e6)
    assert abs(_num_params(model) - named_count) / named_count < 0.07


@pytest.mark.parametrize("size", ["1B", "8B"])
def test_llama3_sizes_match_transformers_parameter_count(size: str) -> None:
    config = build_config("llama3", size, vocab_size=32)
    model = build_model(config)
    with torch.device("meta"):
        reference = LlamaForCausalLM(llama_config_to_hf(config))
    assert _num_params(model) == _num_params(reference)
    assert config.num_key_value_heads == 8 and (size != "8B" or config.rope_scaling["rope_type"] == "llama3")


def test_build_model_on_meta_allocates_nothing_and_materialises() -> None:
    config = build_config("llama3", "debug", vocab_size=12, padded_vocab_size=16)
    model = build_model(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(input_ids=torch.randint(0, 12, (2, 5)))
    assert out.logits.shape == (2, 5, 12) and torch.isfinite(out.logits).all()
    eager = build_model(build_config("esm2", "debug", attn_backend="varlen"), task="base", device="cpu")
    assert eager.config.attn_backend == "varlen" and not any(p.is_meta for p in eager.parameters())


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    config = build_config("llama3", "debug", vocab_size=16)
    spec = get_model_spec("llama3")
    model = build_model(config)
    # Every weight except the embedding lookup and the norms is a matmul weight here (untied head).
    matmul = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name and "embed_tokens" not in name)
    seq_len = 128
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    assert spec.flops_per_token(config, seq_len) == 6 * matmul + attention
    esm = build_config("esm2", "debug")
    esm_model = build_model(esm)
    esm_matmul = (
        sum(
            p.numel()
            for name, p in esm_model.named_parameters()
            if name.endswith("weight") and "norm" not in name and "embeddings" not in name
        )
        + esm.vocab_size * esm.hidden_size
    )  # the tied decoder reuses the embedding matrix
    assert get_model_spec("esm2").flops_per_token(esm, seq_len) == 6 * esm_matmul + 12 * 2 * 64 * seq_len
