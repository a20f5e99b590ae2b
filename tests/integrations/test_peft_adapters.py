"""PEFT on bioscale models (issue 22): the stock target names adapt what they adapt on the stock model, LoRA on Q and
V alone works, and adapters move between a bioscale model and its stock counterpart with equal outputs.

"Stock" is ``to_hf(model)`` (``EsmForMaskedLM``, ``LlamaForCausalLM``, Geneformer's ``BertForMaskedLM``) or, for
the families without a stock class, the published module built from the exported checkpoint (AMPLIFY, CodonFM;
skipped where ``../shared/reference`` is absent). Logits are compared at 1e-5: float32, the same weights, different
but equivalent kernels.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bioscale.models import build_config, build_model, get_model_spec, to_hf
from bioscale.models.adapters import ProjectionAlias

from .helpers import contract_families, logits_of, stock_model, unpadded_ids

peft = pytest.importorskip("peft")
bpeft = pytest.importorskip("bioscale.integrations.peft")
LoraConfig = peft.LoraConfig


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(build_config(name, "debug"), device="cpu").eval()


def _lora_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear in a block of the unfused model: the family's full stock target list."""
    block = copy.deepcopy(model).unfuse_projections().layers[0]
    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, nn.Linear)})


def _stock_lists(name: str, model: nn.Module) -> list[list[str]]:
    spec = get_model_spec(name)
    every = _block_linear_names(model)
    qkv = [leaf.rsplit(".", 1)[-1] for leaf in type(model.layers[0]).adapter_layout["attention.qkv_proj"]]
    return [list(spec.adapter_targets), qkv, every]


def _lora(targets, **kwargs) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)


@pytest.mark.parametrize("name", contract_families())
def test_stock_target_lists_adapt_the_stock_parameter_count(name: str) -> None:
    model = _model(name)
    for targets in _stock_lists(name, model):
        stock = peft.get_peft_model(copy.deepcopy(stock_model(model)), _lora(targets))
        ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(targets))
        assert _lora_count(ours) == _lora_count(stock) > 0, targets


def test_all_linear_leaves_out_the_llama_head_as_for_stock_llama() -> None:
    # get_output_embeddings() returns the untied lm_head, so PEFT excludes it as it does for LlamaForCausalLM.
    model = _model("llama3")
    stock = peft.get_peft_model(stock_model(model), _lora("all-linear"))
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora("all-linear"))
    assert _lora_count(ours) == _lora_count(stock)
    assert not any("lm_head.lora" in n for n, _ in ours.named_parameters())


@pytest.mark.parametrize("name", contract_families())
def test_default_targets_are_registered_with_peft(name: str) -> None:
    model = _model(name)
    stock = peft.get_peft_model(copy.deepcopy(stock_model(model)), LoraConfig(r=4, target_modules=list(
        get_model_spec(name).adapter_targets)))  # fmt: skip
    ours = bpeft.get_peft_model(copy.deepcopy(model), LoraConfig(r=4))  # no target_modules: the registered default
    assert _lora_count(ours) == _lora_count(stock) > 0


@pytest.mark.parametrize("name", contract_families())
def test_lora_on_query_and_value_alone(name: str) -> None:
    model = _model(name)
    q, k, v = [leaf.rsplit(".", 1)[-1] for leaf in type(model.layers[0]).adapter_layout["attention.qkv_proj"]]
    wrapped = bpeft.get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=[q, v])).train()
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in wrapped.named_parameters() if p.requires_grad}
    assert adapted == {q, v}
    ids = unpadded_ids(model.config)
    labels = ids if get_model_spec(name).causal else ids.masked_fill(torch.rand(ids.shape) < 0.7, -100)
    wrapped(input_ids=ids, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    # The fused path is untouched where nothing is adapted: the base model's outputs are still the model's.
    with wrapped.disable_adapter():
        torch.testing.assert_close(logits_of(wrapped.eval(), ids), logits_of(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", contract_families())
def test_merge_export_and_stock_load_give_equal_logits(name: str, tmp_path: Path) -> None:
    model = _model(name)
    wrapped = bpeft.get_peft_model(copy.deepcopy(model), _lora(_block_linear_names(model))).eval()
    ids = unpadded_ids(model.config)
    expected = logits_of(wrapped, ids)
    merged = wrapped.merge_and_unload()  # still unfused: exports and state dicts keep the canonical names
    assert set(merged.state_dict()) == set(model.state_dict())
    exported = to_hf(merged)
    if isinstance(exported, nn.Module):  # a stock transformers class: through its own save / load
        exported.save_pretrained(tmp_path)
        loaded = type(exported).from_pretrained(tmp_path).eval()
    else:
        loaded = stock_model(merged)
    torch.testing.assert_close(logits_of(loaded, ids), expected, rtol=1e-5, atol=1e-5)
    # And back to the fused training layout, exactly.
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    merged.fuse_projections()
    assert merged.projections_fused and all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", contract_families())
def test_adapters_move_between_bioscale_and_stock_with_equal_outputs(name: str) -> None:
    spec = get_model_spec(name)
    model = _model(name)
    ids = unpadded_ids(model.config)
    targets = _block_linear_names(model)
    # bioscale -> stock
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(targets)).eval()
    state = peft.get_peft_model_state_dict(ours)
    stock = peft.get_peft_model(stock_model(model), _lora(sorted(bpeft.target_modules_to_hf(
        spec, ours.peft_config["default"].target_modules)))).eval()  # fmt: skip
    result = peft.set_peft_model_state_dict(stock, bpeft.adapter_state_dict_to_hf(spec, state))
    assert not result.unexpected_keys
    torch.testing.assert_close(logits_of(stock, ids), logits_of(ours, ids), rtol=1e-5, atol=1e-5)
    # stock -> bioscale (a fresh adapter trained "elsewhere")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(stock_model(model), _lora(targets)).eval()
    back = bpeft.get_peft_model(copy.deepcopy(model), _lora(targets)).eval()
    result = peft.set_peft_model_state_dict(
        back, bpeft.adapter_state_dict_from_hf(spec, peft.get_peft_model_state_dict(theirs))
    )
    assert not result.unexpected_keys
    torch.testing.assert_close(logits_of(back, ids), logits_of(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["esm2", "llama3", "geneformer"])
def test_adapter_to_hf_and_back_in_one_call(name: str) -> None:
    model = _model(name)
    ids = unpadded_ids(model.config)
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(list(get_model_spec(name).adapter_targets))).eval()
    stock = bpeft.adapter_to_hf(ours).eval()
    assert isinstance(stock.get_base_model(), type(to_hf(model)))
    torch.testing.assert_close(logits_of(stock, ids), logits_of(ours, ids), rtol=1e-5, atol=1e-5)
    again = bpeft.adapter_from_hf(stock).eval()
    torch.testing.assert_close(logits_of(again, ids), logits_of(ours, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["esm2", "llama3", "geneformer"])
def test_a_bioscale_adapter_refuses_to_load_onto_the_stock_model(name: str, tmp_path: Path) -> None:
    # Before: PEFT matched the leaf names on the stock model, found no tensor for them and only warned, leaving the
    # adapter at its initialisation. The saved config now names the exact modules adapted.
    model = _model(name)
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(list(get_model_spec(name).adapter_targets)))
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        peft.PeftModel.from_pretrained(stock_model(model), tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model).unfuse_projections(), tmp_path).eval()
    ids = unpadded_ids(model.config)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(ours.eval(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", contract_families())
def test_stock_names_on_the_fused_layout_fail_loudly(name: str) -> None:
    model = _model(name)
    every = _block_linear_names(model)
    # Some stock names exist in the fused layout too (ESM's lm_head.dense, Llama's o_proj): the model refuses the
    # partial match with the fix; a list that matches nothing is PEFT's own "not found".
    with pytest.raises(ValueError, match="unfuse_projections|not found"):
        peft.get_peft_model(copy.deepcopy(model), _lora(every))


@pytest.mark.parametrize("name", contract_families())
def test_add_adapter_unfuses_first(name: str) -> None:
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(MIN_PEFT_VERSION)
    except ValueError as exc:  # transformers 5.24 wants PEFT >= 0.22 there; constraints.txt locks 0.21.2
        pytest.skip(f"transformers' add_adapter refuses this PEFT: {exc}")
    target = _model(name)
    target.add_adapter(_lora(list(get_model_spec(name).adapter_targets)))
    assert not target.projections_fused
    assert any(isinstance(m, ProjectionAlias) for m in target.modules())


@pytest.mark.parametrize("name", contract_families())
def test_activation_checkpointing_under_peft(name: str) -> None:
    # Module names stay those of the plain model under activation checkpointing, so PEFT still finds the adapter's
    # tensors (with a wrapping checkpoint its state dict came back empty), and the gradients are unchanged.
    model = _model(name)
    ids = unpadded_ids(model.config)
    labels = ids if get_model_spec(name).causal else ids.masked_fill(torch.rand(ids.shape) < 0.7, -100)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        wrapped = bpeft.get_peft_model(copy.deepcopy(model), _lora(list(get_model_spec(name).adapter_targets))).train()
        if checkpointing:
            wrapped.get_base_model().activation_checkpointing_enable()
        assert len(peft.get_peft_model_state_dict(wrapped)) == 4 * len(model.layers)
        wrapped(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=0, atol=0, msg=key)
