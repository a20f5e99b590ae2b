"""FP8 converter on CPU: which layers become ``Float8Linear``, the errors, and the numerics of emulated FP8 training.

torchao's ``Float8Linear`` module swap and its FP8 casts run on CPU; ``emulate=True`` keeps the GEMMs in high
precision, so these tests check selection and quantisation effects. Real FP8 GEMMs are covered by test_fp8_gpu.py.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8")

from bioscale.models import build_config, build_model  # noqa: E402
from bioscale.precision import apply_fp8, fp8_block_indices, fp8_layer_names, precompute_fp8_scales  # noqa: E402

BLOCK_LINEARS = ("attention.qkv_proj", "attention.out_proj", "mlp.up_proj", "mlp.down_proj")


def esm_model(num_layers: int = 4, device: str = "cpu") -> nn.Module:
    config = build_config("esm2", "debug", num_hidden_layers=num_layers)
    return build_model(config, device=device)


def masked_batch(seed: int = 0, batch: int = 4, length: int = 32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 29, (batch, length), generator=gen)
    labels = torch.full_like(input_ids, -100)
    masked = torch.rand(batch, length, generator=gen) < 0.25
    labels[masked] = input_ids[masked]
    input_ids[masked] = 32  # <mask>
    return {"input_ids": input_ids, "labels": labels}


def test_converts_exactly_the_named_blocks() -> None:
    model = esm_model(num_layers=4)
    apply_fp8(model, recipe="tensorwise", layers=[3, 1], emulate=True)
    assert fp8_layer_names(model) == [f"esm.layers.{i}.{name}" for i in (0, 2) for name in BLOCK_LINEARS]
    assert fp8_block_indices(model) == [1, 3]
    # The LM head (its dense layer included) and the other blocks stay plain nn.Linear.
    assert type(model.lm_head.dense) is nn.Linear
    assert all(type(m) is nn.Linear for i in (1, 3) for m in model.layers[i].modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (["mlp"], ("mlp.up_proj", "mlp.down_proj")),
        (["attention.qkv_proj", "mlp.down_proj"], ("attention.qkv_proj", "mlp.down_proj")),
        (None, BLOCK_LINEARS),
    ],
)
def test_modules_pick_the_linears_of_each_block_by_name_or_prefix(modules, expected) -> None:
    model = esm_model(num_layers=3)
    apply_fp8(model, layers=[2, 3], modules=modules, emulate=True)
    names = [f"esm.layers.{i}.{name}" for i in (1, 2) for name in BLOCK_LINEARS if name in expected]
    assert fp8_layer_names(model) == names


def test_modules_work_with_llama_names_and_reject_unknown_ones() -> None:
    llama = build_model(build_config("llama3", "debug"), device="cpu")
    apply_fp8(llama, modules=["mlp"], emulate=True)
    names = [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_up_proj", "down_proj")]
    assert fp8_layer_names(llama) == names
    # "mlp.up" is not a dotted prefix of "mlp.up_proj"; the error lists the block's linears.
    with pytest.raises(ValueError, match=r"\['mlp.up'\] name no linear layer of a Esm2Block.*'mlp.up_proj'"):
        apply_fp8(esm_model(), modules=["mlp.up"], emulate=True)
    with pytest.raises(ValueError, match="non-empty list"):
        apply_fp8(esm_model(), modules="mlp", emulate=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_all_blocks_when_layers_is_none(recipe: str) -> None:
    model = esm_model(num_layers=3)
    apply_fp8(model, recipe=recipe, layers=None, emulate=True)
    assert fp8_block_indices(model) == [1, 2, 3]
    assert len(fp8_layer_names(model)) == 3 * len(BLOCK_LINEARS)
    granularity = model.layers[0].mlp.up_proj.config.cast_config_input.scaling_granularity.value
    assert granularity == {"tensorwise": "tensorwise", "rowwise": "axiswise"}[recipe]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([0], r"out of range.*1\.\.4"),
        ([5], r"\[5\] out of range.*4 transformer blocks"),
        ([], "empty"),
        ([1, 1], "more than once"),
        ([True], "integers"),
        ("1", "list"),
    ],
)
def test_invalid_layer_selection(layers: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_fp8(esm_model(num_layers=4), layers=layers, emulate=True)  # type: ignore[arg-type]


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="fp8.recipe"):
        apply_fp8(esm_model(), recipe="delayed", emulate=True)
    with pytest.raises(ValueError, match="tensorwise"):
        apply_fp8(esm_model(), recipe="rowwise", fsdp_float8_all_gather=True, emulate=True)
    with pytest.raises(ValueError, match="min_features"):
        apply_fp8(esm_model(), min_features=-1, emulate=True)
    with pytest.raises(ValueError, match="layers"):
        apply_fp8(nn.Sequential(nn.Linear(16, 16)), emulate=True)
    model = esm_model()
    apply_fp8(model, layers=[1], emulate=True)
    with pytest.raises(ValueError, match="already holds FP8"):
        apply_fp8(model, layers=[1], emulate=True)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Linear(64, 256)
        self.wide = nn.Linear(256, 256)
        self.odd = nn.Linear(40, 256)  # 40 is not a multiple of 16: cannot use FP8 GEMMs


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_width_filter_and_unaligned_dims_are_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = _Stack()
    with caplog.at_level(logging.WARNING, logger="bioscale.precision.fp8"):
        apply_fp8(model, min_features=128, emulate=True)
    assert fp8_layer_names(model) == ["layers.0.wide", "layers.1.wide"]
    assert "layers.0.odd (40->256: not multiples of 16)" in caplog.text
    assert "layers.1.narrow (64->256: narrower than min_features=128)" in caplog.text


def test_without_fp8_gpu_the_error_says_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sm_89"):
        apply_fp8(esm_model(), recipe="tensorwise")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"A100.*compute capability 8\.0"):
        apply_fp8(esm_model(), recipe="tensorwise")


def test_token_count_not_a_multiple_of_16_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import bioscale.precision.fp8 as fp8

    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("torch without _scaled_mm")
    monkeypatch.setattr(fp8, "check_fp8_hardware", lambda device=None: None)  # real FP8 GEMMs, on CPU
    model = esm_model(num_layers=1)
    apply_fp8(model, recipe="tensorwise")
    with pytest.raises(ValueError, match=r"multiple of 16, got 30 .*pad_to_multiple_of=16"):
        model(**masked_batch(batch=1, length=30))
    try:
        loss = model(**masked_batch(batch=1, length=32)).loss
    except RuntimeError as exc:  # a torch build without CPU FP8 GEMMs: the check above is what this test is about
        pytest.skip(f"no FP8 GEMM on this CPU build: {exc}")
    assert torch.isfinite(loss)


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # makes `import torchao.float8` fail
    with pytest.raises(ImportError, match=r"pip install 'bioscale\[fp8\]'"):
        apply_fp8(esm_model(), emulate=True)


def test_meta_build_keeps_parameter_names_and_initialises() -> None:
    reference_keys = list(esm_model(device="meta").state_dict())
    model = esm_model(device="meta")
    apply_fp8(model, layers=[2, 4], emulate=True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    # Checkpoints and HF exports see the same tensors as for a bf16 model.
    assert list(model.state_dict()) == reference_keys
    weight = model.layers[1].mlp.up_proj.weight
    assert weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)
    loss = model(**masked_batch()).loss
    assert torch.isfinite(loss)
    precompute_fp8_scales(model)  # no FSDP-sharded FP8 weights: a no-op, must not fail


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_training_tracks_high_precision(recipe: str) -> None:
    """Same init and batches: FP8 casts perturb the losses a little, not the trajectory."""

    def train(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        model = esm_model(num_layers=2)
        if fp8:
            apply_fp8(model, recipe=recipe, emulate=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(8):
            loss = model(**masked_batch(seed=step, batch=8)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    reference, fp8 = train(False), train(True)
    assert reference[-1] < reference[0] - 0.05  # the run learns, so the comparison means something
    assert fp8 != reference  # the FP8 casts really ran
    for ref, got in zip(reference, fp8):
        assert got == pytest.approx(ref, rel=0.02)


def test_compiled_fp8_forward_matches_eager() -> None:
    model = esm_model(num_layers=2)
    apply_fp8(model, recipe="tensorwise", layers=[2], emulate=True)
    batch = masked_batch()
    eager = model(**batch).loss
    for block in model.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    compiled = model(**batch).loss
    torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()
