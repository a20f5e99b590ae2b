"""Tiny in-memory data and runs for the framework-integration tests: token examples for any registered family,
collators for padded batches, and a ``transformers`` ``Trainer`` run that returns its logged losses and gradient norms.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from bioscale.models import get_model_spec, list_models
from bioscale.models.hf_contract import HFContractMixin

# Families on the contract that the token-based tests here cannot drive, with where their contract is tested.
TOKEN_TESTS_DO_NOT_APPLY = {
    "vit": "an image classifier (pixel_values, no vocabulary): test_contract_geneformer_vit.py tests its contract",
}


def contract_families() -> list[Any]:
    """Every registered family as a pytest param; families the token tests cannot drive, or not on the contract, are
    skipped with the reason."""
    import pytest

    params = []
    for name in list_models():
        reason = TOKEN_TESTS_DO_NOT_APPLY.get(name)
        if reason is None:
            try:
                cls = get_model_spec(name).model_class()
            except ImportError as exc:  # a family registered by name whose code is not in this checkout yet
                reason = f"family {name!r} is not importable here: {exc}"
            else:
                if not issubclass(cls, HFContractMixin):
                    reason = f"{cls.__name__} does not use HFContractMixin"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _special_ids(config: PretrainedConfig) -> set[int]:
    names = ("pad_token_id", "mask_token_id", "cls_token_id", "bos_token_id", "eos_token_id", "unk_token_id",
             "sep_token_id")  # fmt: skip
    return {int(v) for n in names if isinstance(v := getattr(config, n, None), int)}


def token_examples(
    config: PretrainedConfig, *, causal: bool, num: int = 16, lengths: tuple[int, int] = (5, 13), seed: int = 0
) -> list[dict[str, list[int]]]:
    """``num`` examples of ordinary tokens with fixed labels: next-token labels (= the inputs) for a causal family;
    for a masked family a start and an end token (where the vocabulary has them: Geneformer V1 cells are genes only)
    around residues of which ~25% (at least one) are replaced by ``<mask>`` and labelled (the start token is never a
    label, as in real MLM batches)."""
    rng = np.random.default_rng(seed)
    ordinary = np.array(sorted(set(range(config.vocab_size)) - _special_ids(config)))
    examples = []
    for _ in range(num):
        ids = rng.choice(ordinary, size=int(rng.integers(*lengths)))
        if causal:
            examples.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
            continue
        start = [v for n in ("cls_token_id", "bos_token_id") if (v := getattr(config, n, None)) is not None][:1]
        end = [config.eos_token_id] if getattr(config, "eos_token_id", None) is not None else []
        chosen = rng.random(ids.size) < 0.25
        chosen[rng.integers(ids.size)] = True
        if not start:  # DataCollatorWithFlattening unlabels each sequence's first token: leave it unlabelled here too
            chosen[0], chosen[1] = False, chosen[1] or not chosen[1:].any()
        labels = [-100] * len(start) + np.where(chosen, ids, -100).tolist() + [-100] * len(end)
        inputs = start + np.where(chosen, config.mask_token_id, ids).tolist() + end
        examples.append({"input_ids": inputs, "labels": labels})
    return examples


def pad_collator(pad_token_id: int) -> Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Padded ``[B, S]`` batches (``attention_mask``; labels -100 on padding) of examples with labels."""

    def collate(features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_token_id or 0, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """CPU, examples in order, constant learning rate, a log line per step, nothing saved or reported."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=5, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, train_sampling_strategy="sequential",
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train_and_log(
    model: PreTrainedModel, examples: list[dict[str, Any]], collator: Callable, args: TrainingArguments
) -> tuple[list[float], list[float]]:
    """Losses and gradient norms ``Trainer`` logged, one per optimizer step."""
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(examples), data_collator=collator)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    return [float(e["loss"]) for e in steps], [float(e["grad_norm"]) for e in steps]


# ---- the stock (or published) counterpart of a bioscale model ------------------------------------------------------
# ../shared/reference holds the published AMPLIFY and CodonFM code (test oracles only; see its README).
REFERENCE_ROOT = Path(os.environ.get("BIOSCALE_REFERENCE_DIR", Path(__file__).resolve().parents[2].parent / "shared"
                                     / "reference"))  # fmt: skip


def _import_reference(name: str) -> Any | None:
    if name == "amplify":
        folder, paths = "amplify_reference", [str(REFERENCE_ROOT), str(REFERENCE_ROOT / "shims")]
    else:
        folder, paths = "codonfm_reference", [str(REFERENCE_ROOT)]
    if not (REFERENCE_ROOT / folder).is_dir():
        return None
    sys.path[:0] = paths
    try:
        if name == "amplify":
            from amplify_reference.amplify_hf import AMPLIFY, AMPLIFYConfig

            return AMPLIFY, AMPLIFYConfig
        import einops  # noqa: F401  (the reference attention imports it)
        from codonfm_reference.encodon import EnCodon
        from codonfm_reference.encodon_config import EnCodonConfig

        return EnCodon, EnCodonConfig
    except ImportError:
        return None
    finally:
        for path in paths:
            sys.path.remove(path)


def stock_model(model: PreTrainedModel) -> torch.nn.Module:
    """The counterpart of ``model`` with its weights: ``to_hf(model)`` where that is a stock ``transformers`` model,
    else the published module (AMPLIFY, CodonFM) built from the exported checkpoint; skips where that code is absent."""
    import pytest

    from bioscale.models import spec_for_model, to_hf

    exported = to_hf(model)
    if isinstance(exported, torch.nn.Module):
        return exported.eval()
    name = spec_for_model(model).name
    found = _import_reference(name)
    if found is None:
        pytest.skip(f"the published {name} code is not at {REFERENCE_ROOT}")
    model_cls, config_cls = found
    fields = inspect.signature(config_cls.__init__).parameters
    config = config_cls(**{k: v for k, v in exported.config.items() if k in fields})
    reference = model_cls(config)
    reference.load_state_dict(exported.state_dict(), strict=True)
    return reference.eval()


def unpadded_ids(config: PretrainedConfig, *, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` ordinary tokens, no padding (every published model takes them without a mask)."""
    ordinary = sorted(set(range(config.vocab_size)) - _special_ids(config))
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(ordinary)[torch.randint(len(ordinary), (batch, length), generator=gen)]


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits over the real vocabulary, whatever the model's output type and forward signature."""
    with torch.no_grad():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT too
        if type(base).__name__ == "EnCodon":  # the published CodonFM needs a mask
            return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        return model(input_ids=input_ids).logits
