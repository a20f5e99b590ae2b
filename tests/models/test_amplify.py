"""AMPLIFY equals chandar-lab's published model (``../shared/reference/amplify_reference``): padded logits per sequence,
packed == padded, no leakage, heads, vocabulary padding, exact conversion both ways (the written directory loads in the
published code), save / load, meta build and init, bad input, loading published checkpoint directories without their
code, the use tools, and the L0 recipe's loss."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from model_test_utils import pack
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification

from bioscale.data.tokenizers import amplify_tokenizer
from bioscale.models import build_config, build_model, from_hf, get_model_spec, to_hf
from bioscale.models.amplify import (
    AmplifyConfig,
    AmplifyForMaskedLM,
    AmplifyForSequenceClassification,
    AmplifyForTokenClassification,
    AmplifyModel,
    AmplifyReferenceCheckpoint,
    config_from_reference,
    from_reference_state_dict,
)
from bioscale.models.amplify import from_hf as amplify_from_hf
from bioscale.models.amplify import (
    save_reference_checkpoint,
    swiglu_hidden_size,
    to_reference_state_dict,
)

# ../shared/reference, or $BIOSCALE_REFERENCE_DIR where the folder travels elsewhere (a GPU machine's copy).
REFERENCE_ROOT = Path(
    os.environ.get("BIOSCALE_REFERENCE_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "reference")
)
PAD, UNK, MASK, BOS, EOS, SEP = 0, 1, 2, 3, 4, 5
LENGTHS = [13, 7, 10]
# Small random shapes: 64-wide with 4 heads (SwiGLU 192 -> 128), and 48-wide with 2 heads of 24 (100 -> 72, rounded up).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, max_length=64)
SHAPES = [TINY, dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=100, max_length=64)]
AUTO_MAP = {"AutoConfig": "amplify.AMPLIFYConfig", "AutoModel": "amplify.AMPLIFY"}


def import_reference() -> SimpleNamespace | None:
    """The published AMPLIFY (HF remote code) with the pure-PyTorch xformers shim, or ``None`` where it is absent."""
    if not (REFERENCE_ROOT / "amplify_reference" / "amplify_hf.py").is_file():
        return None
    paths = [str(REFERENCE_ROOT), str(REFERENCE_ROOT / "shims")]
    sys.path[:0] = paths
    try:
        from amplify_reference.amplify_hf import AMPLIFY, AMPLIFYConfig
        from amplify_reference.rotary import precompute_freqs_cis
    finally:
        for path in paths:
            sys.path.remove(path)
    return SimpleNamespace(AMPLIFY=AMPLIFY, AMPLIFYConfig=AMPLIFYConfig, precompute_freqs_cis=precompute_freqs_cis)


@pytest.fixture(scope="module")
def reference() -> SimpleNamespace:
    """:func:`import_reference`; the test is skipped where the reference is absent."""
    found = import_reference()
    if found is None:
        pytest.skip(f"AMPLIFY reference not found at {REFERENCE_ROOT}")
    return found


def random_reference(reference: SimpleNamespace, seed: int = 0, **shape: object):
    """A published AMPLIFY with weights far from its U(+-0.02) init (so every layer moves the logits)."""
    torch.manual_seed(seed)
    model = reference.AMPLIFY(reference.AMPLIFYConfig(**{**TINY, **shape})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.startswith("layer_norm"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<bos> residues <eos>`` rows (residues 6..26, some <mask>, <unk> and |), padding 0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(6, 27, (length,), generator=gen)
        special = torch.rand(length, generator=gen)
        tokens[special < 0.2] = MASK
        tokens[(special > 0.95)] = UNK
        tokens[length // 2] = SEP
        tokens[0], tokens[-1] = BOS, EOS
        input_ids[row, :length] = tokens
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def reference_rows(ref_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    # The published forward turns attention_mask into a bf16 additive mask (chandar-lab/AMPLIFY issue 16), so in
    # float32 each sequence is run alone, unpadded, with attention_mask=None.
    with torch.no_grad():
        return [ref_model(ids[mask.bool()][None]).logits[0] for ids, mask in zip(input_ids, attention_mask)]


def mlm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    labels = torch.randint(6, 26, input_ids.shape, generator=torch.Generator().manual_seed(1))
    labels[(input_ids != MASK) | (attention_mask == 0)] = -100
    return labels


# ---- the function: logits, packing, heads, vocabulary padding --------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=["64x4", "48x2"])
@pytest.mark.parametrize("padded_vocab_size", [None, 32])
def test_padded_logits_match_reference(reference, shape: dict, padded_vocab_size: int | None) -> None:
    ref_model = random_reference(reference, **shape)
    model = from_hf(ref_model, padded_vocab_size=padded_vocab_size).eval()
    assert type(model) is AmplifyForMaskedLM and model.config.embedding_rows == (padded_vocab_size or 27)
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.shape == (3, max(LENGTHS), 27)
    expected = reference_rows(ref_model, input_ids, attention_mask)
    assert max(e.abs().max() for e in expected) > 1.0  # the comparison is not between near-constant logits
    for row, want in enumerate(expected):
        torch.testing.assert_close(logits[row, : LENGTHS[row]], want, atol=1e-4, rtol=0)


def test_mlm_loss_matches_reference(reference) -> None:
    ref_model = random_reference(reference)
    model = from_hf(ref_model).eval()
    input_ids, attention_mask = padded_batch([12, 12])  # equal lengths: the reference runs unpadded
    labels = mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        expected = ref_model(input_ids, labels=labels).loss
        out = model(input_ids=input_ids, labels=labels)
        total = model(input_ids=input_ids, labels=labels, loss_reduction="sum")
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.num_label_tokens.item() == int((labels != -100).sum())
    torch.testing.assert_close(total.loss, out.loss * out.num_label_tokens, atol=1e-4, rtol=1e-5)


def test_base_model_is_the_normalised_last_hidden_state(reference) -> None:
    ref_model = random_reference(reference)
    model = from_hf(ref_model).eval()
    input_ids, _ = padded_batch([11])
    with torch.no_grad():
        out = ref_model(input_ids, output_hidden_states=True)
        expected = ref_model.layer_norm_2(out.hidden_states[-1])  # the published decoder's input
        actual = model.amplify(input_ids=input_ids).last_hidden_state
    assert model.layers is model.amplify.layers and len(model.layers) == 2
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_packed_equals_padded_per_sequence_and_restarts_positions(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    assert batch["position_ids"][0, LENGTHS[0]] == 0  # positions restart for every packed sequence
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        packed = model(**batch).logits
        del batch["position_ids"]  # derived from cu_seq_lens
        derived = model(**batch).logits
    assert packed.shape == (1, sum(LENGTHS), 27)
    torch.testing.assert_close(packed[0], padded[attention_mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(derived, packed, atol=0, rtol=0)


def test_no_cross_sequence_leakage_in_packed_batch(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]  # the second sequence
    changed["input_ids"][0, start + 1 : end - 1] = torch.randint(6, 27, (end - start - 2,))
    with torch.no_grad():
        before, after = model(**batch).logits[0], model(**changed).logits[0]
    others = torch.ones(sum(LENGTHS), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[~others] - before[~others]).abs().max() > 1e-3  # the edit itself did change something


def test_vocabulary_padding_changes_nothing_and_stays_zero(reference) -> None:
    ref_model = random_reference(reference)
    plain, padded = from_hf(ref_model), from_hf(ref_model, padded_vocab_size=32)
    assert padded.lm_head.weight.shape == (32, 64) and padded.amplify.embed_tokens.weight.shape == (32, 64)
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = mlm_labels(input_ids, attention_mask)
    a = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    b = padded(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert b.logits.shape[-1] == 27
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=0)
    assert torch.count_nonzero(padded.lm_head.weight.grad[27:]) == 0  # padding rows get no gradient
    torch.testing.assert_close(padded.lm_head.weight.grad[:27], plain.lm_head.weight.grad, atol=1e-6, rtol=0)
    fresh = build_model(build_config("amplify", "debug", padded_vocab_size=32), device="cpu")
    for weight in (fresh.amplify.embed_tokens.weight, fresh.lm_head.weight):
        assert torch.count_nonzero(weight[27:]) == 0
    assert torch.count_nonzero(fresh.lm_head.bias) == 0
    assert torch.count_nonzero(fresh.amplify.embed_tokens.weight[PAD]) == 0


def test_logits_on_labels_only_gives_same_loss(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        sparse = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, logits_on_labels_only=True)
    assert sparse.logits.shape == (int((labels != -100).sum()), 27)
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)


def test_heads_packed_equal_padded() -> None:
    torch.manual_seed(0)
    input_ids, attention_mask = padded_batch(LENGTHS)
    token = build_model(build_config("amplify", "debug", num_labels=3), task="token_classification", device="cpu")
    labels = torch.randint(0, 3, input_ids.shape)
    labels[attention_mask == 0] = -100
    sequence = build_model(build_config("amplify", "debug", num_labels=1), task="sequence_classification", device="cpu")
    targets = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        token.eval(), sequence.eval()
        t_padded = token(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        t_packed = token(**pack(input_ids, attention_mask, labels))
        s_padded = sequence(input_ids=input_ids, attention_mask=attention_mask, labels=targets)
        s_packed = sequence(**pack(input_ids, attention_mask), labels=targets)
    assert isinstance(token, AmplifyForTokenClassification) and isinstance(sequence, AmplifyForSequenceClassification)
    torch.testing.assert_close(t_packed.logits[0], t_padded.logits[attention_mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(t_packed.loss, t_padded.loss, atol=1e-5, rtol=1e-5)
    assert s_padded.logits.shape == s_packed.logits.shape == (3, 1)
    torch.testing.assert_close(s_packed.logits, s_padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_padded.loss, ((s_padded.logits.squeeze(-1) - targets) ** 2).mean(), atol=1e-6, rtol=0)


# ---- conversion, save / load, build and init ---------------------------------------------------------------------


def test_round_trip_reference_bioscale_reference_is_tensor_identical(reference) -> None:
    ref_model = random_reference(reference)
    expected = ref_model.state_dict()
    for padded_vocab_size in (None, 32):
        state = to_reference_state_dict(from_hf(ref_model, padded_vocab_size=padded_vocab_size))
        assert list(state) == list(expected)  # the released checkpoints' names, in the published module order
        for key, tensor in expected.items():
            assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    exported = to_hf(from_hf(ref_model))
    assert isinstance(exported, AmplifyReferenceCheckpoint) and exported.config["model_type"] == "AMPLIFY"


def test_written_directory_loads_in_the_published_code(reference, tmp_path: Path) -> None:
    ref_model = random_reference(reference, **SHAPES[1])
    model = from_hf(ref_model, padded_vocab_size=32)
    save_reference_checkpoint(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "AMPLIFY" and written["auto_map"] == AUTO_MAP
    assert written["architectures"] == ["AMPLIFY"]
    # Every field of the published AMPLIFYConfig, with the value the reference model was built with.
    published = ref_model.config.to_dict()
    fields = [name for name in reference.AMPLIFYConfig.__init__.__code__.co_varnames[1:] if name != "kwargs"]
    fields = fields[: reference.AMPLIFYConfig.__init__.__code__.co_argcount - 1]
    assert {name: written[name] for name in fields} == {name: published[name] for name in fields}
    loaded = reference.AMPLIFY.from_pretrained(tmp_path).eval()
    # transformers 5 builds remote-code models on meta; the published RoPE table is a plain attribute, not a buffer,
    # so it stays on meta: recompute it the published way.
    loaded.freqs_cis = reference.precompute_freqs_cis(loaded.config.hidden_size // loaded.config.num_attention_heads,
                                                      loaded.config.max_length)  # fmt: skip
    for key, tensor in ref_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    input_ids, _ = padded_batch([9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, ref_model(input_ids).logits, atol=0, rtol=0)


def test_save_and_load_are_identical_through_the_auto_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(build_config("amplify", "debug", padded_vocab_size=32), device="cpu").eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AmplifyConfig)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AmplifyForMaskedLM
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids=input_ids, attention_mask=attention_mask).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(tmp_path)) is AmplifyModel
    head = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(head) is AmplifyForTokenClassification
    assert torch.equal(head.amplify.layers[0].mlp.gate_up_proj.weight, model.amplify.layers[0].mlp.gate_up_proj.weight)


def test_meta_build_then_init_is_complete_and_idempotent() -> None:
    config = build_config("amplify", "debug", padded_vocab_size=32)
    model = build_model(config)
    assert all(p.is_meta for p in model.parameters())
    model.init_weights()  # a no-op on meta
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    model.init_weights()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    rotary = model.amplify.rotary
    assert rotary.interleaved and rotary.inv_freq.dtype == torch.float32 and torch.isfinite(rotary.inv_freq).all()
    bound = config.decoder_init_range
    weight = model.amplify.layers[0].attention.qkv_proj.weight
    assert weight.abs().max() <= bound and weight.std() > bound / 3  # the published U(-0.02, 0.02)
    # The transformers loading hook fills only what loading did not: it never clobbers a loaded tensor.
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            tensor._is_hf_initialized = True
        model._init_weights(module)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert model.amplify.rotary.inv_freq.device.type == "cpu"


@pytest.mark.parametrize(("size", "ffn"), [("120M", 1712), ("350M", 2560)])
def test_released_sizes_match_the_published_parameter_count(reference, size: str, ffn: int) -> None:
    config = build_config("amplify", size)
    assert config.ffn_hidden_size == swiglu_hidden_size(config.intermediate_size) == ffn
    assert config.head_dim == 64 and config.max_position_embeddings == 2048
    model = build_model(config, device="meta")
    with torch.device("meta"):
        published = reference.AMPLIFY(reference.AMPLIFYConfig(
            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size))  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in published.parameters())
    assert abs(count - float(size[:-1]) * 1e6) / (float(size[:-1]) * 1e6) < 0.05


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    config = build_config("amplify", "debug", padded_vocab_size=32)
    model = build_model(config)
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if name.endswith("weight") and "norm" not in name and "embed_tokens" not in name)  # fmt: skip
    assert get_model_spec("amplify").flops_per_token(config, 128) == 6 * matmul + 12 * 2 * 64 * 128


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_act", "gelu"), ("rms_norm", False), ("att_bias", True), ("ffn_bias", True),
     ("layer_norm_after_embedding", True), ("layer_norm_before_last_layer", False)],
)  # fmt: skip
def test_configs_bioscale_does_not_build_are_refused_by_name(reference, field: str, value: object) -> None:
    published = reference.AMPLIFYConfig(**TINY).to_dict()
    with pytest.raises(ValueError, match=field):
        config_from_reference({**published, field: value})


def test_checkpoint_with_w12_under_another_activation_is_refused(reference) -> None:
    ref_model = random_reference(reference)
    ref_model.config.hidden_act = "GELU"  # config says GELU, tensors are SwiGLU's ffn.w12 / ffn.w3
    with pytest.raises(ValueError, match="hidden_act='GELU'"):
        from_hf(ref_model)


def test_state_dicts_with_missing_extra_or_misshaped_tensors_are_refused_by_name(reference) -> None:
    ref_model = random_reference(reference)
    config = config_from_reference(ref_model.config)
    state = dict(ref_model.state_dict())
    with pytest.raises(ValueError, match=r"missing tensors \['transformer_encoder.1.ffn.w3.weight'\]"):
        missing = {k: v for k, v in state.items() if k != "transformer_encoder.1.ffn.w3.weight"}
        from_reference_state_dict(missing, config)
    with pytest.raises(ValueError, match=r"unexpected \['transformer_encoder.0.ffn.0.weight'\].*relu / gelu"):
        from_reference_state_dict({**state, "transformer_encoder.0.ffn.0.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"decoder.bias \(26,\) \(expected \(27,\)\)"):
        from_reference_state_dict({**state, "decoder.bias": torch.zeros(26)}, config)
    with pytest.raises(ValueError, match="is not chandar-lab's AMPLIFY"):
        amplify_from_hf(build_model(build_config("amplify", "debug"), device="cpu"))
    with pytest.raises(ValueError, match="has no published AMPLIFY counterpart"):
        to_hf(build_model(build_config("amplify", "debug"), task="base", device="cpu"))


def test_bad_forward_inputs_raise() -> None:
    model = build_model(build_config("amplify", "debug", padded_vocab_size=32), device="cpu")
    with pytest.raises(ValueError, match=r"token ids >= vocab_size \(27\)"):
        model(input_ids=torch.tensor([[3, 27, 4]]))  # a padding row is not a token
    with pytest.raises(ValueError, match="unexpected keyword argument 'cu_seq_len_q'"):
        model(input_ids=torch.tensor([[3, 6, 4]]), cu_seq_len_q=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="hidden_act"):
        AmplifyConfig(hidden_act="relu")


# ---- published checkpoint directories, the use tools --------------------------------------------------------------


def write_published_directory(reference, path: Path, seed: int = 0, tokenizer: bool = True) -> object:
    """A directory as on the Hub (config.json with model_type AMPLIFY and auto_map, model.safetensors), written from
    the reference model directly, plus a trap: an amplify.py that must never be imported."""
    ref_model = random_reference(reference, seed)
    path.mkdir(parents=True, exist_ok=True)
    config = {**ref_model.config.to_dict(), "architectures": ["AMPLIFY"], "auto_map": AUTO_MAP}
    (path / "config.json").write_text(json.dumps(config))
    save_file(ref_model.state_dict(), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "amplify.py").write_text("raise RuntimeError('the checkpoint code ran')\n")
    if tokenizer:
        amplify_tokenizer().save_pretrained(path)
    return ref_model


def test_load_model_reads_a_published_directory_without_its_code(reference, tmp_path: Path) -> None:
    from bioscale.use import load_model
    from bioscale.use.loading import load_config

    ref_model = write_published_directory(reference, tmp_path / "hub")
    assert isinstance(load_config(tmp_path / "hub"), AmplifyConfig)
    loaded = load_model(tmp_path / "hub", task="masked_lm")
    assert loaded.family == "amplify" and type(loaded.model) is AmplifyForMaskedLM
    assert loaded.tokenizer.get_vocab() == amplify_tokenizer().get_vocab()
    input_ids, _ = padded_batch([10])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=input_ids).logits, ref_model(input_ids).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert type(load_model(tmp_path / "hub").model) is AmplifyModel  # task="base": the encoder of the masked LM
    head = load_model(tmp_path / "hub", task="token_classification", config_overrides={"num_labels": 3}).model
    assert type(head) is AmplifyForTokenClassification and head.classifier.out_features == 3
    # No tokenizer saved: the bioscale AMPLIFY tokenizer (the same ids).
    write_published_directory(reference, tmp_path / "bare", tokenizer=False)
    assert load_model(tmp_path / "bare").tokenizer.get_vocab() == amplify_tokenizer().get_vocab()


def test_published_directories_that_do_not_fit_are_refused(reference, tmp_path: Path) -> None:
    from bioscale.use import load_model

    write_published_directory(reference, tmp_path / "gelu", tokenizer=False)
    config = json.loads((tmp_path / "gelu" / "config.json").read_text())
    (tmp_path / "gelu" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load_model(tmp_path / "gelu")
    write_published_directory(reference, tmp_path / "pickle", tokenizer=False)
    (tmp_path / "pickle" / "model.safetensors").rename(tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights can run code and are not read"):
        load_model(tmp_path / "pickle")


def test_published_directory_goes_through_embed(reference, tmp_path: Path) -> None:
    import numpy as np

    from bioscale.use import embed

    write_published_directory(reference, tmp_path / "hub")
    sequences = ["MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF", "MVHLTPEEKSAVTALWGKVNVDEVGG", "MKVB|XZ"]
    with pytest.warns(UserWarning, match="1 of 3 sequences contain characters outside"):  # X, Z: <unk>
        packed = embed(tmp_path / "hub", sequences, batching="packed", device="cpu", progress=False)
    with pytest.warns(UserWarning, match="outside the model's vocabulary"):
        padded = embed(tmp_path / "hub", sequences, batching="padded", device="cpu", progress=False)
    assert packed.pooled.shape == (3, 64)
    np.testing.assert_allclose(packed.pooled, padded.pooled, atol=2e-5)


@pytest.fixture
def amplify_dir(tmp_path: Path) -> Path:
    """A bioscale ``AmplifyForMaskedLM`` (debug size, random weights) saved with its tokenizer."""
    torch.manual_seed(0)
    model = build_model(build_config("amplify", "debug"), task="masked_lm", device="cpu")
    model.save_pretrained(tmp_path / "amplify")
    amplify_tokenizer().save_pretrained(tmp_path / "amplify")
    return tmp_path / "amplify"


def test_finetune_a_lora_token_head_on_porter6(amplify_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("peft")
    from bioscale.use import finetune, load_finetune_config

    config = load_finetune_config(
        "token_classification",
        [f"model={amplify_dir}", f"data={shared_data / 'porter6_secondary_structure_sample.parquet'}",
         f"output_dir={tmp_path / 'out'}", "lora.enabled=true", "max_steps=4", "max_train_sequences=8",
         "max_val_sequences=4", "max_length=64", "max_tokens_per_batch=640", "eval_every=1000", "device=cpu",
         "warmup_steps=1"],
    )  # fmt: skip
    result = finetune(config, progress=False)
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    # The default LoRA targets (qkv_proj, out_proj, down_proj) exist in AMPLIFY's blocks under the same names.
    assert any("qkv_proj.lora_A" in n for n in trainable) and any("out_proj.lora_A" in n for n in trainable)
    assert math.isfinite(float(result.metrics["loss"])) and {"q3", "q8"} <= set(result.metrics)


def test_eval_scores_an_amplify_checkpoint(amplify_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    from bioscale.pipeline.stages import evaluate

    artifact = evaluate(amplify_dir, out=tmp_path / "eval", data=shared_data / "uniref90_sample.parquet",
                        max_sequences=8, secondary_structure=False, random_baseline=False, device="cpu")  # fmt: skip
    scores = artifact.metadata.metrics["language_model"]["trained"]
    # A random-init model is near uniform over the 27 tokens (perplexity ~27).
    assert scores["num_sequences"] == 8 and 15 < scores["perplexity"] < 40


# ---- the L0 recipe -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # the whole recipe, 400 steps: ~10-20 s on 2 CPU cores
def test_l0_sanity_amplify_loss_falls_and_exports_the_published_format(tmp_path: Path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    cfg = load_config("L0_sanity_amplify", [
        "device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_n_steps=1",
        "checkpoint.save_every_n_steps=0", "checkpoint.save_final_model=true", f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    summary = train(cfg)
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 400 and summary["model"] == "amplify/debug"
    # An untrained model predicts uniformly over the 27 tokens: ln(27) = 3.30 (measured 3.29 at step 1).
    assert losses[0] == pytest.approx(math.log(27), abs=0.1)
    # Measured on this recipe (fp32, CPU): the mean of the last 20 steps is 2.65 (step 400: 2.65, minimum 2.51), below
    # the 2.84 nats of the demo proteome's residue composition, i.e. the model uses context. 2.8 leaves room for
    # other CPUs' rounding and fails a model that learnt only the composition (2.84) or nothing (3.30).
    assert sum(losses[-20:]) / 20 < 2.8
    # The demo proteome has X runs, which AMPLIFY has no token for: mapped to <unk> and counted in the summary.
    assert summary["data_policy"]["records_mapped"] > 0 and summary["data_policy"]["residues_mapped"] > 0
    # final_model_hf is the published format: chandar-lab's code loads it (checked where the reference is present).
    trained = AutoModelForMaskedLM.from_pretrained(summary["final_model"])
    written = json.loads((Path(summary["final_model_hf"]) / "config.json").read_text())
    assert written["model_type"] == "AMPLIFY" and written["auto_map"] == AUTO_MAP
    reference = import_reference()
    if reference is not None:
        published = reference.AMPLIFY.from_pretrained(summary["final_model_hf"])
        for key, tensor in to_reference_state_dict(trained).items():
            assert torch.equal(published.state_dict()[key], tensor), key
