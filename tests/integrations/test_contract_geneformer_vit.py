"""The ``PreTrainedModel`` contract (``bioscale.models.hf_contract``) where Geneformer and ViT differ from the token
families the parametrized tests drive: each against its stock ``transformers`` counterpart (``to_hf``).

Geneformer joins ``contract_families()`` (labels, flattening collators, checkpointing, resizing, PEFT counts and
adapter moves run there); this file adds what is BERT's own: ``Trainer`` numbers of every head against stock
``BertFor*`` and the tied decoder through a resize. Stock BERT takes ``**kwargs`` but ignores ``num_items_in_batch``,
so ``Trainer`` doubles its loss at ``gradient_accumulation_steps=2`` (measured below); Geneformer declares
``accepts_loss_kwargs=False`` and equals the stock run told the same. ViT is an image classifier, outside the token
tests: its whole contract is here, against ``ViTForImageClassification`` for the plain config (no registers, no
QK-norm, class-token pooling). float32; tolerances as in ``test_trainer_contract.py`` (5 Adam steps through different
kernels).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer
from transformers.utils.generic import find_labels

from bioscale.data.hf_collators import MLMDataCollator
from bioscale.models import build_config, build_model, get_model_spec, to_hf

from .helpers import ListDataset, logits_of, pad_collator, token_examples, train_and_log, training_args

peft = pytest.importorskip("peft")
bpeft = pytest.importorskip("bioscale.integrations.peft")


def _close(actual: list[float], expected: list[float], rtol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=1e-6)


def _lora_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def _lora(targets, **kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)


# ---- Geneformer ----------------------------------------------------------------------------------------------------
# A 256-gene vocabulary and 32 positions keep each Trainer run well under a second; the shape is the debug size's.
_GENEFORMER = dict(vocab_size=256, max_position_embeddings=32, num_labels=3, classifier_pooling="cls")


def _geneformer(task: str = "masked_lm") -> nn.Module:
    torch.manual_seed(0)
    return build_model(build_config("geneformer", "debug", **_GENEFORMER), task=task, device="cpu")


def _gene_data(task: str, config) -> tuple[list[dict], object]:
    """Examples and a padded collator for ``task``: MLM labels; a class per gene (-100 where unlabelled, as in the MLM
    examples); a class per cell."""
    examples = token_examples(config, causal=False)
    pad = pad_collator(config.pad_token_id)
    if task == "token_classification":
        examples = [{"input_ids": e["input_ids"], "labels": [-100 if t == -100 else t % 3 for t in e["labels"]]}
                    for e in examples]  # fmt: skip
    if task != "sequence_classification":
        return examples, pad

    def cells(features):
        batch = pad(features)
        batch["labels"] = torch.tensor([len(f["input_ids"]) % 3 for f in features])
        return batch

    return examples, cells


def _stock_run(model: nn.Module, examples, collator, args, *, told: bool = True):
    """``Trainer`` on the stock BERT of ``model``; ``told``: told ``accepts_loss_kwargs=False`` as Geneformer declares
    (as stock ESM declares itself), so that Trainer divides by the accumulation steps."""
    stock = to_hf(copy.deepcopy(model))
    if told:
        stock.accepts_loss_kwargs = False
    return train_and_log(stock, examples, collator, args)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize(("task", "layout"), [("masked_lm", "padded"), ("masked_lm", "packed"),
                                              ("token_classification", "padded"), ("token_classification", "packed"),
                                              ("sequence_classification", "padded")])  # fmt: skip
def test_geneformer_trainer_matches_stock_bert(task: str, layout: str, accumulation: int, tmp_path: Path) -> None:
    model = _geneformer(task)
    config = model.config
    examples, collator = _gene_data(task, config)
    args = training_args(tmp_path, gradient_accumulation_steps=accumulation,
                         per_device_train_batch_size=4 // accumulation)  # fmt: skip
    # Stock BERT has no packed attention: its padded run is the reference for both layouts.
    stock = _stock_run(model, examples, collator, args)
    if layout == "packed":
        collator = MLMDataCollator(mask_token_id=config.mask_token_id, pad_token_id=config.pad_token_id,
                                   special_token_ids=[], random_token_ids=[2], packed=True)  # fmt: skip
    losses, grad_norms = train_and_log(model, examples, collator, args)
    assert len(losses) == len(stock[0]) == 5
    _close(losses, stock[0])
    _close(grad_norms, stock[1])


def test_stock_bert_doubles_its_loss_at_accumulation_2_and_geneformer_does_not(tmp_path: Path) -> None:
    # Why Geneformer declares accepts_loss_kwargs=False: the plain stock run (Trainer infers True from **kwargs, passes
    # num_items_in_batch, BERT ignores it, Trainer skips its own division) logs twice the step's loss and gradient.
    model = _geneformer()
    examples, collator = _gene_data("masked_lm", model.config)
    args = training_args(tmp_path, max_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    plain = _stock_run(model, examples, collator, args, told=False)
    ours = train_and_log(copy.deepcopy(model), examples, collator, args)
    _close([plain[0][0], plain[1][0]], [2 * ours[0][0], 2 * ours[1][0]])
    with torch.no_grad():  # and ours is the mean of the two micro-batch means (examples 0-1, 2-3)
        means = [model(**collator(examples[k : k + 2])).loss for k in (0, 2)]
    torch.testing.assert_close(torch.tensor(ours[0][0]), torch.stack(means).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("task", ["masked_lm", "token_classification", "sequence_classification"])
def test_geneformer_losses_equal_stock_bert_and_ignore_num_items_like_it(task: str) -> None:
    model = _geneformer(task).eval()
    stock = to_hf(copy.deepcopy(model)).eval()
    examples, collator = _gene_data(task, model.config)
    batch = collator(examples[:4])
    with torch.no_grad():
        ours, theirs = model(**batch), stock(**batch)
        counted = model(**batch, num_items_in_batch=torch.tensor(1000))
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(counted.loss, ours.loss)  # accepts_loss_kwargs=False: Trainer never passes it; ignored if sent


def test_geneformer_resize_keeps_the_decoder_tied_and_its_bias(tmp_path: Path) -> None:
    model = _geneformer().eval()
    vocab = model.config.vocab_size
    assert model.get_output_embeddings() is None  # the decoder is the word-embedding matrix (ESM-2's rule)
    with torch.no_grad():  # a trained bias (it starts at zero)
        model.lm_head.bias.normal_()
    bias = model.lm_head.bias.detach().clone()
    model.resize_token_embeddings(vocab + 3, pad_to_multiple_of=8)
    assert model.lm_head.bias.shape[0] == model.get_input_embeddings().weight.shape[0] == 264
    torch.testing.assert_close(model.lm_head.bias[:vocab], bias, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.bias[vocab : vocab + 3], bias.mean().expand(3), rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[5, vocab + 2, 7, 1, 9]])  # a new gene id is a valid input
    stock = to_hf(model)
    stock.save_pretrained(tmp_path)
    stock = type(stock).from_pretrained(tmp_path).eval()
    decoder = stock.cls.predictions.decoder
    assert decoder.weight.data_ptr() == stock.bert.embeddings.word_embeddings.weight.data_ptr()  # tied
    assert decoder.weight.shape[0] == decoder.bias.shape[0] == vocab + 3
    torch.testing.assert_close(decoder.bias, model.lm_head.bias[: vocab + 3], rtol=0, atol=0)
    torch.testing.assert_close(logits_of(stock, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "key", "value", "dense"]])
def test_a_geneformer_adapter_applies_to_stock_bert_with_equal_outputs(targets: list[str]) -> None:
    model = _geneformer().eval()
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(targets)).eval()
    stock = peft.get_peft_model(to_hf(copy.deepcopy(model)), _lora(targets))
    assert _lora_count(ours) == _lora_count(stock) > 0
    moved = bpeft.adapter_to_hf(ours).eval()
    assert type(moved.get_base_model()).__name__ == "BertForMaskedLM"
    ids = torch.randint(2, model.config.vocab_size, (2, 12))
    torch.testing.assert_close(logits_of(moved, ids), logits_of(ours, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(moved, ids), logits_of(model, ids))  # the adapter does something


# ---- ViT -----------------------------------------------------------------------------------------------------------


def _vit(task: str = "image_classification") -> nn.Module:
    torch.manual_seed(0)
    config = build_config("vit", "debug", num_labels=3, num_register_tokens=0, qk_norm=False, global_pool="token")
    return build_model(config, task=task, device="cpu")


def _images(num: int = 16, seed: int = 0) -> list[dict]:
    """32 x 32 RGB images with class ids; the second image is unlabelled (-100), so micro-batches hold different
    numbers of labelled images and a mean of micro-batch means differs from the step's mean."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (num,), generator=gen).tolist()
    labels[1] = -100
    return [{"pixel_values": torch.randn(3, 32, 32, generator=gen), "labels": label} for label in labels]


def _stack(features) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip


def test_vit_trainer_finds_only_labels_and_passes_loss_kwargs() -> None:
    spec = get_model_spec("vit")
    for task, cls in spec.model_classes.items():
        assert find_labels(cls) == ([] if task == "base" else ["labels"]), cls.__name__
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())
    model = _vit()
    with pytest.raises(ValueError, match="seq_idx"):  # no packing and no token head: the options are refused
        model(**_stack(_images(2)), seq_idx=torch.zeros(2, 17, dtype=torch.long))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_vit_trainer_matches_transformers_vit(accumulation: int, tmp_path: Path) -> None:
    # ViTForImageClassification divides its summed loss by Trainer's num_items_in_batch (fixed_cross_entropy); with an
    # unlabelled image in one micro-batch, only a model that does the same gives its numbers at accumulation 2.
    model = _vit()
    examples = _images()
    args = training_args(tmp_path, gradient_accumulation_steps=accumulation,
                         per_device_train_batch_size=4 // accumulation)  # fmt: skip
    stock = train_and_log(to_hf(copy.deepcopy(model)), examples, _stack, args)
    losses, grad_norms = train_and_log(model, examples, _stack, args)
    assert len(losses) == len(stock[0]) == 5
    _close(losses, stock[0])
    _close(grad_norms, stock[1])


def test_vit_evaluate_returns_eval_loss_and_calls_compute_metrics(tmp_path: Path) -> None:
    model = _vit()
    calls = []

    def compute_metrics(prediction) -> dict[str, float]:
        calls.append(prediction)
        return {"num_predictions": float(len(prediction.predictions))}

    examples = _images(8)
    args = training_args(tmp_path, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, eval_dataset=ListDataset(examples), data_collator=_stack,
                      compute_metrics=compute_metrics)  # fmt: skip
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    stock = Trainer(model=to_hf(copy.deepcopy(model)), args=args, eval_dataset=ListDataset(examples),
                    data_collator=_stack).evaluate()  # fmt: skip
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"]), torch.tensor(stock["eval_loss"]), rtol=1e-5, atol=0)
    assert len(calls) == 1 and metrics["eval_num_predictions"] == 8
    assert calls[0].predictions.shape == (8, 3)  # logits only: num_label_tokens is not a prediction


def test_vit_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    model = _vit().train()
    batch = _stack(_images(4))
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    names = [n for n, _ in model.named_modules()]
    model(**batch).loss.backward()
    assert [n for n, _ in model.named_modules()] == names  # PEFT finds its layers by these names
    for key, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(key).grad, grad, rtol=0, atol=0, msg=key)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    # And through Trainer's switch.
    examples = _images()
    unchecked = train_and_log(_vit(), examples, _stack, training_args(tmp_path, max_steps=2))
    checked_model = _vit()
    checked = train_and_log(checked_model, examples, _stack,
                            training_args(tmp_path, max_steps=2, gradient_checkpointing=True))  # fmt: skip
    assert checked_model.is_activation_checkpointing
    torch.testing.assert_close(torch.tensor(checked), torch.tensor(unchecked), rtol=1e-6, atol=0)


def test_vit_embeddings_are_the_patch_convolution_and_resize_is_refused() -> None:
    model = _vit()
    stock = to_hf(copy.deepcopy(model))
    patch = model.get_input_embeddings()
    assert isinstance(patch, nn.Conv2d) and patch is model.vit.embeddings.patch_embed
    # transformers returns ViTPatchEmbeddings, whose projection is the same convolution.
    assert torch.equal(stock.get_input_embeddings().projection.weight, patch.weight)
    assert model.get_output_embeddings() is None
    with pytest.raises(ValueError, match="no vocabulary"):
        model.resize_token_embeddings(10)
    with pytest.raises(ValueError, match="no vocabulary"):
        model.vit.resize_token_embeddings()


# target list -> the modules it names on ViTForImageClassification (transformers 5.24, the pinned release)
_HF_LISTS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ["fc1", "fc2"]]
# transformers 4.x's names: stock 5.x finds none of them (PEFT refuses), and neither does bioscale.
_HF4_LISTS = [["query", "value"], ["query", "key", "value", "dense"]]


@pytest.mark.parametrize("targets", _HF_LISTS + _HF4_LISTS)
def test_vit_hf_target_lists_adapt_the_stock_count_or_fail_as_on_stock(targets: list[str]) -> None:
    model = _vit()
    stock_model = to_hf(copy.deepcopy(model))
    if targets in _HF4_LISTS:
        for make, base in ((peft.get_peft_model, stock_model), (bpeft.get_peft_model, model)):
            with pytest.raises(ValueError, match="not found"):
                make(copy.deepcopy(base), _lora(targets))
        return
    stock = peft.get_peft_model(copy.deepcopy(stock_model), _lora(targets))
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(targets))
    assert _lora_count(ours) == _lora_count(stock) > 0


def test_vit_timm_lists_are_refused_with_the_bioscale_names() -> None:
    model = _vit()
    # On the unfused layout fc1 / fc2 exist and PEFT would adapt them alone (as on ViTForImageClassification).
    with pytest.raises(ValueError, match=r"\['qkv'\].*qkv_proj on the fused model"):
        bpeft.get_peft_model(copy.deepcopy(model), _lora(["qkv", "fc1", "fc2"]))
    for fused in (True, False):
        base = copy.deepcopy(model) if fused else copy.deepcopy(model).unfuse_projections()
        with pytest.raises(ValueError, match="not found"):
            peft.get_peft_model(base, _lora(["qkv"]))
    # The fused names adapt what timm's lists adapt: one LoRA over the qkv rows (r * (D + 3D)), and the MLP.
    hidden, ffn, layers = model.config.hidden_size, model.config.intermediate_size, len(model.layers)
    qkv = peft.get_peft_model(copy.deepcopy(model), _lora(["qkv_proj"]))
    assert _lora_count(qkv) == layers * 4 * (hidden + 3 * hidden)
    mlp = peft.get_peft_model(copy.deepcopy(model), _lora(["qkv_proj", "up_proj", "down_proj"]))
    assert _lora_count(mlp) == _lora_count(qkv) + layers * 4 * 2 * (hidden + ffn)


def test_vit_fused_names_equal_timms_lists_on_timm() -> None:
    pytest.importorskip("timm")
    from bioscale.models.vit import to_timm

    model = _vit()
    timm_model = to_timm(copy.deepcopy(model))
    for timm_targets, ours_targets in ((["qkv"], ["qkv_proj"]), (["qkv", "fc1", "fc2"], ["qkv_proj", "up_proj",
                                                                                         "down_proj"])):  # fmt: skip
        theirs = peft.get_peft_model(copy.deepcopy(timm_model), _lora(timm_targets))
        ours = peft.get_peft_model(copy.deepcopy(model), _lora(ours_targets))
        assert _lora_count(ours) == _lora_count(theirs) > 0


def test_vit_default_targets_and_adapter_to_stock_give_equal_outputs() -> None:
    model = _vit().eval()
    default = bpeft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4))  # the registered q_proj / v_proj
    stock = peft.get_peft_model(to_hf(copy.deepcopy(model)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert _lora_count(default) == _lora_count(stock) > 0
    ours = bpeft.get_peft_model(copy.deepcopy(model), _lora(_HF_LISTS[1])).eval()
    moved = bpeft.adapter_to_hf(ours).eval()
    pixels = _stack(_images(3))["pixel_values"]
    with torch.no_grad():
        expected = ours(pixel_values=pixels).logits
        torch.testing.assert_close(moved(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(pixel_values=pixels).logits, expected)
    back = bpeft.adapter_from_hf(moved).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)
