"""CodonFM EnCodon equals the released architecture (``../shared/reference/codonfm_reference``): padded float32 logits,
packed == padded, no leakage, heads, vocabulary padding, exact conversion both ways with the released tensor names
(RoPE buffers included), save / load, meta build and MAGNETO init, bad input, loading released-format checkpoint
directories without any CodonFM code, FP8 conversion, and the L0 recipe's loss."""

from __future__ import annotations

import inspect
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
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from bioscale.data.tokenizers import codon_tokenizer
from bioscale.models import build_config, build_model, get_model_spec, to_hf
from bioscale.models.codonfm import (
    REFERENCE_ROTARY_THETA,
    EnCodonConfig,
    EnCodonForMaskedLM,
    EnCodonForSequenceClassification,
    EnCodonModel,
    EnCodonReferenceCheckpoint,
    config_from_reference,
    from_reference_state_dict,
    reference_config_dict,
    save_reference_checkpoint,
    to_reference_state_dict,
)
# The reference config's model_type is 'custom' (its default), so bioscale.models.from_hf, which routes by model_type,
# does not take it: the family's own from_hf recognises the EnCodon fields.
from bioscale.models.codonfm import from_hf

# ../shared/reference, or $BIOSCALE_REFERENCE_DIR where the folder travels elsewhere (a GPU machine's copy).
REFERENCE_ROOT = Path(
    os.environ.get("BIOSCALE_REFERENCE_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "reference")
)
CLS, SEP, UNK, PAD, MASK = 0, 1, 2, 3, 4
LENGTHS = [13, 7, 16]  # padded to 16: the reference asserts a padded length that is a multiple of 8
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SHAPES = [TINY, dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96)]


def import_reference() -> SimpleNamespace | None:
    """CodonFM's EnCodon and CodonTokenizer from ``../shared/reference``, or ``None`` where absent (or without einops,
    which its attention imports)."""
    if not (REFERENCE_ROOT / "codonfm_reference" / "encodon.py").is_file():
        return None
    try:
        import einops  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(REFERENCE_ROOT))
    try:
        from codonfm_reference.encodon import EnCodon
        from codonfm_reference.encodon_config import EnCodonConfig as ReferenceConfig
        from codonfm_reference.tokenizer import CodonTokenizer
    finally:
        sys.path.remove(str(REFERENCE_ROOT))
    return SimpleNamespace(EnCodon=EnCodon, EnCodonConfig=ReferenceConfig, CodonTokenizer=CodonTokenizer)


@pytest.fixture(scope="module")
def reference() -> SimpleNamespace:
    found = import_reference()
    if found is None:
        pytest.skip(f"CodonFM reference (and einops) not found at {REFERENCE_ROOT}")
    return found


def random_reference(reference: SimpleNamespace, seed: int = 0, **shape: object):
    """A reference EnCodon with weights far from its MAGNETO init (so every layer, norm and bias moves the logits)."""
    torch.manual_seed(seed)
    model = reference.EnCodon(reference.EnCodonConfig(**{**TINY, **shape})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "layer_norm" in name or "post_ln" in name or name.startswith("cls.2")
            if is_norm and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif is_norm:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.15)
    return model


def padded_batch(lengths: list[int], seed: int = 0, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<CLS> codons <SEP>`` rows (codons 5..68, some <MASK> and <UNK>), padding <PAD>=3, padded to
    ``width`` (default: the longest, rounded up to a multiple of 8)."""
    gen = torch.Generator().manual_seed(seed)
    width = width or -(-max(lengths) // 8) * 8
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(5, 69, (length,), generator=gen)
        special = torch.rand(length, generator=gen)
        tokens[special < 0.2] = MASK
        tokens[special > 0.95] = UNK
        tokens[0], tokens[-1] = CLS, SEP
        input_ids[row, :length] = tokens
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def mlm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    labels = torch.randint(5, 69, input_ids.shape, generator=torch.Generator().manual_seed(1))
    labels[(input_ids != MASK) | (attention_mask == 0)] = -100
    return labels


# ---- the function: logits, packing, heads, vocabulary padding --------------------------------------------------------


def test_the_default_rope_theta_is_the_references(reference) -> None:
    # The reference EnCodonConfig defaults to 1e5 and its layers pass it to the attention (whose own default, 1e4, is
    # never used); bioscale's default is the same value.
    assert reference.EnCodonConfig().rotary_theta == REFERENCE_ROTARY_THETA == EnCodonConfig().rotary_theta == 1e5
    layer_signature = inspect.getsource(reference.EnCodon.__init__)
    assert "EncoderLayer(config)" in layer_signature


@pytest.mark.parametrize("shape", SHAPES, ids=["64x4", "48x2"])
@pytest.mark.parametrize(("padded_vocab_size", "theta"), [(None, 1e5), (72, 1e4)])
def test_padded_logits_match_reference(reference, shape: dict, padded_vocab_size: int | None, theta: float) -> None:
    ref_model = random_reference(reference, rotary_theta=theta, **shape)
    model = from_hf(ref_model, padded_vocab_size=padded_vocab_size).eval()
    assert type(model) is EnCodonForMaskedLM and model.config.rotary_theta == theta
    assert model.config.embedding_rows == (padded_vocab_size or 69)
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = ref_model(input_ids, attention_mask).logits
    assert logits.shape == expected.shape == (3, 16, 69)
    real = attention_mask.bool()
    assert expected[real].abs().max() > 1.0  # the comparison is not between near-constant logits
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)


def test_mlm_loss_and_hidden_states_match_reference(reference) -> None:
    ref_model = random_reference(reference)
    model = from_hf(ref_model).eval()
    input_ids, attention_mask = padded_batch(LENGTHS, seed=2)
    labels = mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        ref_out = ref_model(input_ids, attention_mask)
        expected = torch.nn.functional.cross_entropy(ref_out.logits.reshape(-1, 69), labels.reshape(-1))
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        total = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum")
        hidden = model.encodon(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.num_label_tokens.item() == int((labels != -100).sum()) > 0
    torch.testing.assert_close(total.loss, out.loss * out.num_label_tokens, atol=1e-4, rtol=1e-5)
    real = attention_mask.bool()  # no final LayerNorm: the last layer's output is the reference's last_hidden_state
    torch.testing.assert_close(hidden[real], ref_out.last_hidden_state[real], atol=1e-4, rtol=0)
    assert model.layers is model.encodon.layers and len(model.layers) == 2


def test_packed_equals_padded_and_restarts_positions(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    assert batch["position_ids"][0, LENGTHS[0]] == 0
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        packed = model(**batch).logits
        del batch["position_ids"]  # derived from cu_seq_lens
        derived = model(**batch).logits
    assert packed.shape == (1, sum(LENGTHS), 69)
    torch.testing.assert_close(packed[0], padded[attention_mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(derived, packed, atol=0, rtol=0)


def test_no_cross_sequence_leakage_in_packed_batch(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]  # the second sequence
    changed["input_ids"][0, start + 1 : end - 1] = torch.randint(5, 69, (end - start - 2,))
    with torch.no_grad():
        before, after = model(**batch).logits[0], model(**changed).logits[0]
    others = torch.ones(sum(LENGTHS), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[~others] - before[~others]).abs().max() > 1e-3  # the edit itself did change something


def test_vocabulary_padding_changes_nothing_and_stays_zero(reference) -> None:
    ref_model = random_reference(reference)
    plain, padded = from_hf(ref_model), from_hf(ref_model, padded_vocab_size=72)
    assert padded.lm_head.decoder.weight.shape == (72, 64) and padded.encodon.embed_tokens.weight.shape == (72, 64)
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = mlm_labels(input_ids, attention_mask)
    plain.eval(), padded.eval()  # dropout off: the two forwards must be the same function
    a = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    b = padded(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    assert torch.count_nonzero(padded.lm_head.decoder.weight.grad[69:]) == 0  # padding rows get no gradient
    torch.testing.assert_close(padded.lm_head.decoder.weight.grad[:69], plain.lm_head.decoder.weight.grad,
                               atol=1e-6, rtol=0)  # fmt: skip
    fresh = build_model(build_config("codonfm", "debug", padded_vocab_size=72), device="cpu")
    for weight in (fresh.encodon.embed_tokens.weight, fresh.lm_head.decoder.weight):
        assert torch.count_nonzero(weight[69:]) == 0
    assert torch.count_nonzero(fresh.encodon.embed_tokens.weight[PAD]) == 0


def test_logits_on_labels_only_gives_same_loss(reference) -> None:
    model = from_hf(random_reference(reference)).eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    labels = mlm_labels(input_ids, attention_mask)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        sparse = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, logits_on_labels_only=True)
    assert sparse.logits.shape == (int((labels != -100).sum()), 69)
    torch.testing.assert_close(sparse.loss, full.loss, atol=1e-6, rtol=1e-6)


def test_sequence_regression_and_classification_packed_equal_padded() -> None:
    input_ids, attention_mask = padded_batch(LENGTHS)
    regression = build_model(build_config("codonfm", "debug", num_labels=1), task="sequence_classification",
                             device="cpu").eval()  # fmt: skip
    classes = build_model(build_config("codonfm", "debug", num_labels=3), task="sequence_classification",
                          device="cpu").eval()  # fmt: skip
    targets = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        padded = regression(input_ids=input_ids, attention_mask=attention_mask, labels=targets)
        packed = regression(**pack(input_ids, attention_mask), labels=targets)
        c_padded = classes(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 2, 1]))
        c_packed = classes(**pack(input_ids, attention_mask), labels=torch.tensor([0, 2, 1]))
    assert isinstance(regression, EnCodonForSequenceClassification) and padded.logits.shape == (3, 1)
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.loss, ((padded.logits.squeeze(-1) - targets) ** 2).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(c_packed.loss, c_padded.loss, atol=1e-5, rtol=1e-5)


def test_blocks_compile_fullgraph_and_match_eager() -> None:
    model = build_model(build_config("codonfm", "debug"), device="cpu").eval()
    input_ids, attention_mask = padded_batch(LENGTHS)
    batch = pack(input_ids, attention_mask)
    with torch.no_grad():
        eager = model(**batch).logits
        for block in model.layers:
            block.compile(backend="aot_eager", fullgraph=True)  # no graph break, no host sync inside a block
        compiled = model(**batch).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


# ---- conversion, save / load, build and init ---------------------------------------------------------------------


def test_round_trip_reference_bioscale_reference_is_tensor_identical(reference) -> None:
    for theta in (1e5, 1e4):
        ref_model = random_reference(reference, rotary_theta=theta)
        expected = ref_model.state_dict()
        for padded_vocab_size in (None, 72):
            state = to_reference_state_dict(from_hf(ref_model, padded_vocab_size=padded_vocab_size))
            assert list(state) == list(expected)  # the released names, in the reference module's order
            for key, tensor in expected.items():  # inv_freq included: the reference's formula, bit for bit
                assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    # The Lightning layout of the released checkpoints ("model." prefix) converts the same way.
    lightning = {f"model.{k}": v for k, v in ref_model.state_dict().items()}
    config = config_from_reference(ref_model.config.to_dict())
    again = to_reference_state_dict(from_reference_state_dict(lightning, config))
    assert all(torch.equal(again[k], v) for k, v in expected.items())


def test_written_directory_loads_in_the_reference(reference, tmp_path: Path) -> None:
    ref_model = random_reference(reference, rotary_theta=1e4, **SHAPES[1])
    model = from_hf(ref_model, padded_vocab_size=72)
    exported = to_hf(model)
    assert isinstance(exported, EnCodonReferenceCheckpoint)
    save_reference_checkpoint(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "model_type" not in written and written["rotary_theta"] == 1e4 and written["vocab_size"] == 69
    # The reference EnCodonConfig builds from the written fields it has, with the values of the original model.
    fields = inspect.signature(reference.EnCodonConfig.__init__).parameters
    rebuilt = reference.EnCodonConfig(**{k: v for k, v in written.items() if k in fields})
    published = ref_model.config.to_dict()
    shared = [k for k in written if k in fields]
    assert {k: rebuilt.to_dict()[k] for k in shared} == {k: published[k] for k in shared}
    loaded = reference.EnCodon(rebuilt).eval()
    from safetensors.torch import load_file

    loaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    input_ids, attention_mask = padded_batch([9, 16])
    with torch.no_grad():
        expected = ref_model(input_ids, attention_mask).logits
        torch.testing.assert_close(loaded(input_ids, attention_mask).logits, expected, atol=0, rtol=0)


def test_save_and_load_are_identical_through_the_auto_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(build_config("codonfm", "debug", padded_vocab_size=72), device="cpu").eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EnCodonConfig)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is EnCodonForMaskedLM
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    input_ids, attention_mask = padded_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids=input_ids, attention_mask=attention_mask).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(tmp_path)) is EnCodonModel
    head = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert type(head) is EnCodonForSequenceClassification
    assert torch.equal(head.encodon.layers[0].mlp.up_proj.weight, model.encodon.layers[0].mlp.up_proj.weight)


def test_meta_build_then_init_is_complete_idempotent_and_magneto(reference) -> None:
    config = build_config("codonfm", "debug", num_hidden_layers=4, padded_vocab_size=72)
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
    assert model.encodon.rotary.inv_freq.dtype == torch.float32 and model.encodon.rotary.base == 1e5
    # Per-tensor scale against the reference's own init of the same shape (MAGNETO: query/key gain 1, the rest
    # 0.02 * sqrt(ln 2N); xavier fans per [h, h] projection): every std within 10 % of the reference's.
    torch.manual_seed(0)
    ref_model = reference.EnCodon(reference.EnCodonConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                          intermediate_size=512))  # fmt: skip
    ours = to_reference_state_dict(model)
    for key, tensor in ref_model.state_dict().items():
        if tensor.dim() == 2:
            assert ours[key].std().item() == pytest.approx(tensor.std().item(), rel=0.1), key
        elif not key.endswith("inv_freq"):  # LayerNorms one / zero, biases zero: exactly the reference's
            assert torch.equal(ours[key], tensor), key
    h = config.hidden_size
    qkv = model.encodon.layers[0].attention.qkv_proj.weight
    assert qkv[:h].std().item() == pytest.approx(1 / math.sqrt(h), rel=0.1)  # query: gain 1
    assert qkv[2 * h :].std().item() == pytest.approx(0.02 * math.sqrt(math.log(8)) / math.sqrt(h), rel=0.1)  # value
    # The transformers loading hook fills only what loading did not: with every tensor marked loaded (transformers
    # marks them all before it initialises anything), visiting the modules in either order changes nothing.
    for tensor in (*model.parameters(), *model.buffers()):
        tensor._is_hf_initialized = True
    for module in [*model.modules(), *reversed(list(model.modules()))]:
        model._init_weights(module)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("size", "nominal"), [("80M", 80e6), ("600M", 600e6), ("1B", 1e9)])
def test_released_sizes_match_the_reference_parameter_count(reference, size: str, nominal: float) -> None:
    config = build_config("codonfm", size)
    assert config.head_dim == 128 and config.max_position_embeddings == 2048 and config.vocab_size == 69
    model = build_model(config, device="meta")
    with torch.device("meta"):
        published = reference.EnCodon(reference.EnCodonConfig(
            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size))  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in published.parameters())
    assert abs(count - nominal) / nominal < 0.1


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    config = build_config("codonfm", "debug", padded_vocab_size=72)
    model = build_model(config)
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if name.endswith("weight") and p.dim() == 2 and "embed_tokens" not in name)  # fmt: skip
    assert get_model_spec("codonfm").flops_per_token(config, 256) == 6 * matmul + 12 * 2 * 128 * 256


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("vocab_size", 70), ("hidden_act", "relu"), ("pad_token_id", 0), ("position_embedding_type", "absolute"),
     ("use_downstream_head", True), ("lora", True), ("model_type", "bert")],
)  # fmt: skip
def test_configs_bioscale_does_not_build_are_refused_by_name(field: str, value: object) -> None:
    released = reference_config_dict(build_config("codonfm", "debug"))
    with pytest.raises(ValueError, match=field):
        config_from_reference({**released, field: value})


def test_config_formats_and_theta_defaults() -> None:
    released = reference_config_dict(build_config("codonfm", "debug", rotary_theta=1e4))
    assert config_from_reference({"hparams": released}).rotary_theta == 1e4  # Lightning's nesting
    without = {k: v for k, v in released.items() if k != "rotary_theta"}
    assert config_from_reference(without).rotary_theta == 1e4  # EncodonPL's format: its default
    plain = {k: released[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    assert config_from_reference(plain).rotary_theta == 1e5  # EnCodonConfig's format: its default


def test_state_dicts_that_do_not_fit_are_refused_by_name(reference) -> None:
    ref_model = random_reference(reference)
    config = config_from_reference(ref_model.config.to_dict())
    state = dict(ref_model.state_dict())
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.output_dense.bias'\]"):
        from_reference_state_dict({k: v for k, v in state.items() if k != "layers.1.output_dense.bias"}, config)
    with pytest.raises(ValueError, match=r"unexpected \['cross_attention_head.w'\].*downstream head"):
        from_reference_state_dict({**state, "cross_attention_head.w": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"cls.3.bias \(68,\) \(expected \(69,\)\)"):
        from_reference_state_dict({**state, "cls.3.bias": torch.zeros(68)}, config)
    with pytest.raises(ValueError, match=r"RoPE theta ~100000.*rotary_theta=10000"):
        from_reference_state_dict(state, config_from_reference({**ref_model.config.to_dict(), "rotary_theta": 1e4}))
    no_buffers = {k: v for k, v in state.items() if not k.endswith("inv_freq")}
    assert isinstance(from_reference_state_dict(no_buffers, config), EnCodonForMaskedLM)  # buffers are optional
    no_head = {k: v for k, v in no_buffers.items() if not k.startswith("cls.")}
    assert type(from_reference_state_dict(no_head, config, task="base")) is EnCodonModel
    with pytest.raises(ValueError, match=r"missing tensors \['cls.0.bias'"):
        from_reference_state_dict(no_head, config, task="masked_lm")
    with pytest.raises(ValueError, match="is not CodonFM's EnCodon"):
        from_hf(build_model(build_config("amplify", "debug"), device="cpu"))
    with pytest.raises(ValueError, match="has no released EnCodon counterpart"):
        to_hf(build_model(build_config("codonfm", "debug"), task="base", device="cpu"))


def test_bad_forward_inputs_and_configs_raise() -> None:
    model = build_model(build_config("codonfm", "debug", padded_vocab_size=72, attention_probs_dropout_prob=0.1),
                        device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match=r"token ids >= vocab_size \(69\)"):
        model(input_ids=torch.tensor([[0, 69, 1]]))  # a padding row is not a token
    with pytest.raises(ValueError, match="unexpected keyword argument 'cu_seq_len_q'"):
        model(input_ids=torch.tensor([[0, 6, 1]]), cu_seq_len_q=torch.tensor([0, 3], dtype=torch.int32))
    model.train()  # attention-probability dropout 0.1: the packed path has none, so it is refused in training
    with pytest.raises(ValueError, match="attention dropout"):
        model(**pack(*padded_batch([8, 8])))
    with pytest.raises(ValueError, match="hidden_act"):
        EnCodonConfig(hidden_act="relu")


# ---- released checkpoint directories -------------------------------------------------------------------------------


def write_released_directory(reference, path: Path, *, name: str = "NV-CodonFM-Encodon-test-v1", seed: int = 0,
                             tokenizer_config: bool = True):  # fmt: skip
    """A directory laid out as CodonFM's loader reads one: ``config.json`` of the training wrapper's arguments (no
    model_type), the Lightning state dict under ``model.`` in ``<name>.safetensors``, the reference tokenizer's own
    ``tokenizer_config.json`` (not a transformers tokenizer), and a ``.py`` trap that must never be imported."""
    ref_model = random_reference(reference, seed, rotary_theta=1e4)
    path.mkdir(parents=True, exist_ok=True)
    config = reference_config_dict(config_from_reference(ref_model.config.to_dict()))
    (path / "config.json").write_text(json.dumps(config))
    state = {f"model.{k}": v.contiguous() for k, v in ref_model.state_dict().items()}
    save_file(state, str(path / f"{name}.safetensors"), metadata={"format": "pt"})
    (path / "encodon.py").write_text("raise RuntimeError('the checkpoint code ran')\n")
    if tokenizer_config:
        reference.CodonTokenizer().save_pretrained(str(path))
    return ref_model


def test_load_model_reads_a_released_directory_without_its_code(reference, tmp_path: Path) -> None:
    from bioscale.use import load_model
    from bioscale.use.loading import load_config

    ref_model = write_released_directory(reference, tmp_path / "hub")
    assert isinstance(load_config(tmp_path / "hub"), EnCodonConfig)
    loaded = load_model(tmp_path / "hub", task="masked_lm")
    assert loaded.family == "codonfm" and type(loaded.model) is EnCodonForMaskedLM
    assert loaded.model.config.rotary_theta == 1e4
    # The reference's tokenizer_config.json is not a transformers tokenizer: the bioscale codon tokenizer (same ids).
    assert loaded.tokenizer.get_vocab() == codon_tokenizer().get_vocab()
    input_ids, attention_mask = padded_batch([16, 11])
    with torch.no_grad():
        logits = loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = ref_model(input_ids, attention_mask).logits
    torch.testing.assert_close(logits[attention_mask.bool()], expected[attention_mask.bool()], atol=1e-5, rtol=0)
    assert type(load_model(tmp_path / "hub").model) is EnCodonModel  # task="base": the encoder of the masked LM
    head = load_model(tmp_path / "hub", task="sequence_classification", config_overrides={"num_labels": 1}).model
    assert type(head) is EnCodonForSequenceClassification and head.classifier.out_proj.out_features == 1


def test_released_directories_that_do_not_fit_are_refused(reference, tmp_path: Path) -> None:
    from bioscale.use import load_model

    write_released_directory(reference, tmp_path / "vocab", tokenizer_config=False)
    config = json.loads((tmp_path / "vocab" / "config.json").read_text())
    (tmp_path / "vocab" / "config.json").write_text(json.dumps({**config, "vocab_size": 70}))
    with pytest.raises(ValueError, match="vocab_size=70"):
        load_model(tmp_path / "vocab")
    write_released_directory(reference, tmp_path / "ckpt", tokenizer_config=False)
    (tmp_path / "ckpt" / "NV-CodonFM-Encodon-test-v1.safetensors").rename(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ValueError, match=r"last.ckpt: pickled weights can run code and are not read"):
        load_model(tmp_path / "ckpt")
    write_released_directory(reference, tmp_path / "two", tokenizer_config=False)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "two" / "other.safetensors"))
    with pytest.raises(ValueError, match="several weight files"):
        load_model(tmp_path / "two")


# ---- FP8 (emulated on CPU; tests/models/test_codonfm_gpu.py runs the real kernels) -----------------------------------


def test_fp8_converts_the_block_linears_and_keeps_the_head_in_high_precision() -> None:
    pytest.importorskip("torchao.float8")
    from bioscale.precision import apply_fp8, fp8_layer_names

    model = build_model(build_config("codonfm", "debug", attention_probs_dropout_prob=0.0, padded_vocab_size=128))
    apply_fp8(model, recipe="tensorwise", emulate=True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    names = fp8_layer_names(model)
    assert len(names) == 4 * 2, names  # qkv, out, up, down per block
    assert not any("lm_head" in name or "embed" in name for name in names)
    assert type(model.lm_head.decoder) is torch.nn.Linear and type(model.lm_head.dense) is torch.nn.Linear
    input_ids, attention_mask = padded_batch([16, 16])
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=mlm_labels(input_ids, attention_mask))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.layers[0].attention.qkv_proj.weight.grad is not None


# ---- the L0 recipe -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # 300 of the recipe's 500 steps: ~30 s on 2 CPU cores
def test_l0_sanity_codonfm_loss_falls_clearly_below_ln69(tmp_path: Path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    cfg = load_config("L0_sanity_codonfm", [
        "device=cpu", "num_train_steps=200", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.log_every_n_steps=1", "checkpoint.save_every_n_steps=0", "checkpoint.save_final_model=true",
        f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    summary = train(cfg)
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 200 and summary["model"] == "codonfm/debug"
    # An untrained model predicts uniformly over the 69 tokens: ln(69) = 4.23 (measured 4.24 at step 1).
    assert losses[0] == pytest.approx(math.log(69), abs=0.1)
    # Measured (fp32, 2 CPU cores): the mean of the last 20 of 200 steps is 3.73 (300: 3.72, 500: 3.70). 3.85 is clearly
    # below ln(69) and below the corpus's codon composition (3.99 nats), and fails a model that learnt nothing (4.23).
    assert sum(losses[-20:]) / 20 < 3.85
    policy = summary["data_policy"]
    assert policy["records_used"] > 2000 and policy["cropped"] > 0 and policy["cds_internal_stop"] == 0
    # final_model_hf is the released format: the reference loads its tensors strictly (where the reference is present).
    trained = AutoModelForMaskedLM.from_pretrained(summary["final_model"])
    written = json.loads((Path(summary["final_model_hf"]) / "config.json").read_text())
    assert "model_type" not in written and written["vocab_size"] == 69
    found = import_reference()
    if found is not None:
        from safetensors.torch import load_file

        fields = inspect.signature(found.EnCodonConfig.__init__).parameters
        published = found.EnCodon(found.EnCodonConfig(**{k: v for k, v in written.items() if k in fields}))
        published.load_state_dict(load_file(str(Path(summary["final_model_hf"]) / "model.safetensors")), strict=True)
        for key, tensor in to_reference_state_dict(trained).items():
            assert torch.equal(published.state_dict()[key], tensor), key
