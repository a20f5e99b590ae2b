"""Conversion is exact both ways; save/load and the Auto API round-trip; exports load with stock transformers only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from model_test_utils import LLAMA3_SCALING, esm_padded_batch, llama_padded_batch, tiny_esm_config, tiny_llama_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    EsmForMaskedLM,
    EsmForTokenClassification,
    EsmModel,
    LlamaForCausalLM,
    LlamaModel,
)

from bioscale.models import from_hf, to_hf
from bioscale.models.esm2 import Esm2Config, Esm2ForMaskedLM, Esm2ForSequenceClassification, Esm2Model
from bioscale.models.llama3 import Llama3Config, Llama3ForCausalLM


def _assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


HF_MODELS = {
    "esm_mlm": lambda: EsmForMaskedLM(tiny_esm_config()),
    "esm_mlm_emb_ln": lambda: EsmForMaskedLM(tiny_esm_config(emb_layer_norm_before=True)),
    "esm_token_cls": lambda: EsmForTokenClassification(tiny_esm_config(num_labels=5)),
    "esm_base": lambda: EsmModel(tiny_esm_config(), add_pooling_layer=False),
    "llama_lm": lambda: LlamaForCausalLM(tiny_llama_config()),
    "llama_lm_tied": lambda: LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)),
    "llama_lm_no_scaling": lambda: LlamaForCausalLM(tiny_llama_config(rope_scaling=None, rope_theta=10000.0)),
    "llama_base": lambda: LlamaModel(tiny_llama_config()),
}


@pytest.mark.parametrize("name", sorted(HF_MODELS))
@pytest.mark.parametrize("padded_vocab_size", [None, 64])
def test_hf_to_bioscale_to_hf_is_tensor_identical(name: str, padded_vocab_size: int | None) -> None:
    hf = HF_MODELS[name]()
    model = from_hf(hf, padded_vocab_size=padded_vocab_size)
    back = to_hf(model)
    assert type(back) is type(hf)
    _assert_same_tensors(hf.state_dict(), back.state_dict())
    # Tied weights stay tied (one tensor), as stock transformers builds them.
    if isinstance(back, EsmForMaskedLM):
        assert back.lm_head.decoder.weight is back.esm.embeddings.word_embeddings.weight
    if isinstance(back, LlamaForCausalLM) and back.config.tie_word_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_esm_model_pooler_is_dropped_with_a_warning() -> None:
    hf = EsmModel(tiny_esm_config())  # default add_pooling_layer=True
    with pytest.warns(UserWarning, match="pooler"):
        model = from_hf(hf)
    assert isinstance(model, Esm2Model)


def test_conversion_keeps_dtype() -> None:
    hf = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model = from_hf(hf)
    assert model.model.layers[0].attention.qkv_proj.weight.dtype == torch.bfloat16
    assert model.model.rotary.inv_freq.dtype == torch.float32  # RoPE table stays float32
    _assert_same_tensors(hf.state_dict(), to_hf(model).state_dict())


@pytest.mark.parametrize(
    ("auto_class", "model_factory"),
    [
        (AutoModelForMaskedLM, lambda: from_hf(EsmForMaskedLM(tiny_esm_config()), padded_vocab_size=40)),
        (AutoModelForTokenClassification, lambda: from_hf(EsmForTokenClassification(tiny_esm_config(num_labels=3)))),
        (AutoModel, lambda: from_hf(EsmModel(tiny_esm_config(), add_pooling_layer=False))),
        (AutoModelForCausalLM, lambda: from_hf(LlamaForCausalLM(tiny_llama_config()))),
        (AutoModelForCausalLM, lambda: from_hf(LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)))),
    ],
)
def test_save_pretrained_then_auto_from_pretrained_is_identical(auto_class, model_factory, tmp_path: Path) -> None:
    model = model_factory().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    _assert_same_tensors(model.state_dict(), loaded.state_dict())
    # Non-persistent RoPE tables are rebuilt on load, not left empty.
    for (name, buffer), (_, loaded_buffer) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(buffer, loaded_buffer), name
    if isinstance(model.config, Llama3Config):
        input_ids, attention_mask = llama_padded_batch([9, 5])
    else:
        input_ids, attention_mask = esm_padded_batch([9, 5])
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask)
        actual = loaded(input_ids=input_ids, attention_mask=attention_mask)
    key = "logits" if "logits" in expected else "last_hidden_state"
    assert torch.equal(actual[key], expected[key])


def test_fine_tuning_head_loads_pretrained_base_and_initialises_only_the_head(tmp_path: Path) -> None:
    pretrained = from_hf(EsmForMaskedLM(tiny_esm_config()))
    pretrained.save_pretrained(tmp_path)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=4)
    base = {k: v for k, v in pretrained.state_dict().items() if k.startswith("esm.")}
    loaded = {k: v for k, v in model.state_dict().items() if k.startswith("esm.")}
    _assert_same_tensors(base, loaded)
    assert model.classifier.weight.shape == (4, 64)
    assert torch.isfinite(model.classifier.weight).all() and model.classifier.weight.std() > 0
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_meta_build_then_init_weights_fills_everything() -> None:
    config = Llama3Config(
        vocab_size=10,
        padded_vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling=dict(LLAMA3_SCALING),
    )
    with torch.device("meta"):
        model = Llama3ForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = Llama3ForCausalLM(config)  # eager build initialises in __init__
    assert torch.equal(model.model.rotary.inv_freq, reference.model.rotary.inv_freq)
    assert torch.count_nonzero(model.lm_head.weight[10:]) == 0
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    model.init_weights()  # same seed, same weights
    _assert_same_tensors(first, model.state_dict())


EXPORT_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["bioscale"] = None  # any attempt to import bioscale now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    for export_dir in sys.argv[1:]:
        batch = torch.load(export_dir + "/batch.pt")
        auto = AutoModelForMaskedLM if batch["kind"] == "esm" else AutoModelForCausalLM
        model = auto.from_pretrained(export_dir).eval()
        assert type(model).__module__.startswith("transformers."), type(model)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        real = batch["attention_mask"].bool()
        error = (logits[real] - batch["logits"][real]).abs().max().item()
        assert error < 1e-5, (export_dir, error)
        print("OK", type(model).__name__)
    """
)


def test_exported_directories_load_with_stock_transformers_only(tmp_path: Path) -> None:
    exports = {
        "esm": (from_hf(EsmForMaskedLM(tiny_esm_config()), padded_vocab_size=64), esm_padded_batch([9, 5])),
        "llama": (from_hf(LlamaForCausalLM(tiny_llama_config())), llama_padded_batch([9, 5])),
    }
    for kind, (model, (input_ids, attention_mask)) in exports.items():
        export_dir = tmp_path / kind
        to_hf(model).save_pretrained(export_dir)
        assert "bioscale" not in (export_dir / "config.json").read_text()
        with torch.no_grad():
            logits = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
        batch = {"kind": kind, "input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}
        torch.save(batch, export_dir / "batch.pt")
    # A fresh interpreter without bioscale: no PYTHONPATH, and the import itself is blocked in the script.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models; see conftest.py
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, *(str(tmp_path / kind) for kind in exports)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("OK") == 2, result.stdout


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: EsmForMaskedLM(tiny_esm_config(position_embedding_type="absolute")),
            "position_embedding_type='absolute'",
        ),
        (lambda: EsmForMaskedLM(tiny_esm_config(is_decoder=True)), "is_decoder"),
        (lambda: LlamaForCausalLM(tiny_llama_config(attention_bias=True)), "attention_bias"),
        (lambda: LlamaForCausalLM(tiny_llama_config(mlp_bias=True)), "mlp_bias"),
        (lambda: LlamaForCausalLM(tiny_llama_config(hidden_act="gelu")), "hidden_act"),
        (
            lambda: LlamaForCausalLM(tiny_llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0})),
            "rope_scaling type 'linear'",
        ),
    ],
)
def test_unsupported_transformers_configs_are_rejected(build, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_hf(build())


def test_unsupported_models_are_rejected() -> None:
    config = Esm2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2)
    with pytest.raises(ValueError, match="no exact transformers counterpart"):
        to_hf(Esm2ForSequenceClassification(config))
    with pytest.raises(ValueError, match="is not a transformers PreTrainedModel"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not a bioscale model"):
        to_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not a bioscale config"):
        to_hf(EsmForMaskedLM(tiny_esm_config()))
    assert isinstance(from_hf(EsmForMaskedLM(tiny_esm_config())), Esm2ForMaskedLM)


@pytest.mark.parametrize("scaled", [True, False])
def test_llama_export_reads_as_the_same_model_in_transformers_4_and_5(tmp_path, scaled: bool) -> None:
    """transformers 5 writes only ``rope_parameters``; 4.x ignores that key and would fall back to ``rope_theta``
    10000 with no scaling. The export must carry the 4.x keys with the same values, and read back the same here."""
    import json

    from transformers import LlamaConfig

    from bioscale.models.llama3.convert import _hf_rope

    overrides = {} if scaled else {"rope_scaling": None}
    bioscale_model = from_hf(LlamaForCausalLM(tiny_llama_config(**overrides)))
    to_hf(bioscale_model).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    expected_scaling = bioscale_model.config.rope_scaling
    assert (expected_scaling is not None) == scaled
    # What transformers 4.x reads (its LlamaConfig takes these two keys and nothing else about RoPE):
    assert raw["rope_theta"] == bioscale_model.config.rope_theta == 500000.0
    assert raw.get("rope_scaling") == expected_scaling
    # What transformers 5.x reads first, when it wrote it:
    if "rope_parameters" in raw:
        assert raw["rope_parameters"]["rope_theta"] == 500000.0
    # And the installed release reads the same model back.
    assert _hf_rope(LlamaConfig.from_pretrained(tmp_path)) == (500000.0, expected_scaling)
