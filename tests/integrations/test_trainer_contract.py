"""bioscale models inside ``transformers``' ``Trainer`` (issue 22): the numbers of the stock models, on CPU.

Each trap the issue measured is asserted as the invariant it broke: a run's logged losses and gradient norms equal the
stock ``EsmForMaskedLM`` / ``LlamaForCausalLM`` run with the same weights (``to_hf``) and data, at gradient
accumulation 1 and 2, padded and packed; ``evaluate()`` returns ``eval_loss`` and calls ``compute_metrics``;
activation checkpointing leaves the gradients alone. float32 throughout; the tolerances are float32 rounding of
different kernels (5 Adam steps), the gradient-accumulation comparisons within one model are exact up to summation
order.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer

from bioscale.data.hf_collators import MLMDataCollator
from bioscale.models import build_config, build_model, get_model_spec, to_hf

from .helpers import ListDataset, contract_families, pad_collator, token_examples, train_and_log, training_args

_STOCK_RUNS: dict[tuple[str, int, str], tuple[list[float], list[float]]] = {}


def _family(name: str):
    spec = get_model_spec(name)
    config = build_config(name, "debug")
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    examples = token_examples(config, causal=spec.causal)
    return spec, config, model, examples


def _mlm_collator(config, packed: bool) -> MLMDataCollator:
    return MLMDataCollator(
        mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id, special_token_ids=[],
        random_token_ids=[0], packed=packed,
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", ["esm2", "llama3"])
def test_trainer_matches_the_stock_model(name: str, accumulation: int, layout: str, tmp_path: Path) -> None:
    spec, config, model, examples = _family(name)
    args = training_args(tmp_path, gradient_accumulation_steps=accumulation,
                         per_device_train_batch_size=4 // accumulation)  # fmt: skip
    packed = layout == "packed"
    collator = (DataCollatorWithFlattening() if spec.causal else _mlm_collator(config, packed=True)) if packed \
        else pad_collator(config.pad_token_id)  # fmt: skip
    # Stock ESM has no packed attention (it would attend across sequences): its padded run is the reference for both.
    stock_layout = layout if spec.causal else "padded"
    key = (name, accumulation, stock_layout)
    if key not in _STOCK_RUNS:
        stock_collator = collator if stock_layout == layout else pad_collator(config.pad_token_id)
        _STOCK_RUNS[key] = train_and_log(to_hf(copy.deepcopy(model)), examples, stock_collator, args)
    losses, grad_norms = train_and_log(model, examples, collator, args)
    stock_losses, stock_grad_norms = _STOCK_RUNS[key]
    assert len(losses) == len(stock_losses) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(grad_norms), torch.tensor(stock_grad_norms), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", contract_families())
def test_gradient_accumulation_normalises_as_declared(name: str, tmp_path: Path) -> None:
    # Issue 22's doubling: at accumulation 2 the logged loss was twice the step's. Families that honour
    # num_items_in_batch divide by the step's global label count, so accumulation 2 x 2 equals one batch of 4;
    # those that declare accepts_loss_kwargs=False (ESM-2, as stock ESM) give the mean of the micro-batch means.
    spec, config, model, examples = _family(name)
    collator = pad_collator(config.pad_token_id)
    one = train_and_log(copy.deepcopy(model), examples, collator, training_args(tmp_path, max_steps=1))
    two = train_and_log(copy.deepcopy(model), examples, collator,
                        training_args(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2))  # fmt: skip
    if type(model).accepts_loss_kwargs:
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    else:
        with torch.no_grad():  # the first step's micro-batches: examples 0-1 and 2-3 (sequential sampling)
            means = [model(**collator(examples[k : k + 2])).loss for k in (0, 2)]
        torch.testing.assert_close(torch.tensor(two[0][0]), torch.stack(means).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", contract_families())
def test_evaluate_returns_eval_loss_and_calls_compute_metrics(name: str, tmp_path: Path) -> None:
    spec, config, model, examples = _family(name)
    calls = []

    def compute_metrics(prediction) -> dict[str, float]:
        calls.append(prediction)
        return {"num_predictions": float(len(prediction.predictions))}

    trainer = Trainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=4),
                      eval_dataset=ListDataset(examples[:8]), data_collator=pad_collator(config.pad_token_id),
                      compute_metrics=compute_metrics)  # fmt: skip
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert len(calls) == 1 and metrics["eval_num_predictions"] == 8


@pytest.mark.parametrize("name", contract_families())
def test_activation_checkpointing_gives_the_same_gradients(name: str, tmp_path: Path) -> None:
    spec, config, model, examples = _family(name)
    collator = pad_collator(config.pad_token_id)
    plain = train_and_log(copy.deepcopy(model), examples, collator, training_args(tmp_path, max_steps=2))
    checkpointed = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=2, gradient_checkpointing=True)
    checkpointed_run = train_and_log(checkpointed, examples, collator, args)
    assert checkpointed.is_activation_checkpointing
    torch.testing.assert_close(torch.tensor(checkpointed_run), torch.tensor(plain), rtol=1e-6, atol=0)
    # Exports and checkpoints keep the plain names while the blocks are wrapped.
    assert set(checkpointed.state_dict()) == set(model.state_dict())
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.is_activation_checkpointing
