"""Fine-tuning: DSSP labels, the by-sequence split, heads that never mix packed sequences, LoRA on Porter6 lowering
the loss with an adapter that round-trips, full fine-tuning of the sequence heads, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from bioscale.use import (
    DSSP8_LABELS,
    DSSP8_TO_DSSP3_INDEX,
    dssp8_to_dssp3,
    finetune,
    load_finetune_config,
    load_finetuned,
    load_model,
)
from bioscale.use.cli import finetune_main
from bioscale.use.finetune import Example, collate_examples, resolve_data_path, split_by_sequence

from .conftest import PROTEINS

TINY = ["max_length=48", "max_tokens_per_batch=480", "log_every=5", "eval_every=1000", "device=cpu", "warmup_steps=2"]


def test_dssp_labels_and_reduction() -> None:
    assert DSSP8_LABELS == ("H", "G", "I", "E", "B", "T", "S", "~")
    assert dssp8_to_dssp3("HGIEBTS~") == "HHHEECCC"
    assert dssp8_to_dssp3("-C") == "CC"  # other coil spellings
    assert "".join("HEC"[i] for i in DSSP8_TO_DSSP3_INDEX) == dssp8_to_dssp3("".join(DSSP8_LABELS))
    with pytest.raises(ValueError, match="'Q' at position 3 is not an 8-state DSSP label"):
        dssp8_to_dssp3("HHQ")


def test_split_by_sequence_keeps_duplicates_together_and_ignores_order() -> None:
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)) for _ in range(200)]
    sequences += sequences[:50]  # duplicates
    train, val = split_by_sequence(sequences, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(sequences)))
    val_set = {sequences[i] for i in val}
    assert not val_set & {sequences[i] for i in train}
    assert 20 < len(val_set) < 60
    shuffled = list(reversed(sequences))
    _, val_shuffled = split_by_sequence(shuffled, 0.2, seed=3)
    assert {shuffled[i] for i in val_shuffled} == val_set
    _, val_other_seed = split_by_sequence(sequences, 0.2, seed=4)
    assert {sequences[i] for i in val_other_seed} != val_set


@pytest.mark.parametrize("batching", ["packed", "padded"])
@pytest.mark.parametrize("task", ["token_classification", "sequence_classification"])
def test_heads_never_mix_sequences_in_a_batch(esm_dir: Path, task: str, batching: str) -> None:
    loaded = load_model(esm_dir, task=task, config_overrides={"num_labels": 3})
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    examples = []
    for sequence in PROTEINS.values():
        ids = tokenizer(sequence)["input_ids"]
        target = [-100] + [i % 3 for i in range(len(ids) - 2)] + [-100] if task == "token_classification" else 1
        examples.append(Example(token_ids=ids, target=target))
    together = collate_examples(examples, task=task, batching=batching, pad_token_id=1, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(**together.inputs).logits
        if task == "token_classification":
            flat = together.flatten(logits)
            per_example = [flat[together.token_example == i] for i in range(len(examples))]
        else:
            per_example = list(logits)
        for example, joint in zip(examples, per_example):
            alone = collate_examples(
                [example], task=task, batching="padded", pad_token_id=1, device=torch.device("cpu")
            )
            reference = model(**alone.inputs).logits
            reference = alone.flatten(reference) if task == "token_classification" else reference[0]
            torch.testing.assert_close(joint, reference, atol=2e-5, rtol=0)


def test_lora_on_porter6_lowers_loss_and_adapter_round_trips(esm_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "ss_lora"
    config = load_finetune_config(
        "token_classification",
        [f"model={esm_dir}", f"data={shared_data / 'porter6_secondary_structure_sample.parquet'}", f"output_dir={out}",
         "lora.enabled=true", "lr=5e-3", "max_steps=16", "max_train_sequences=12", "max_val_sequences=4", *TINY],
    )  # fmt: skip
    result = finetune(config, progress=False)
    # Only the adapters and the new head train.
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert any("qkv_proj.lora_A" in name for name in trainable)
    assert result.history[0]["step"] == 0
    initial_loss, final_loss = result.history[0]["val_loss"], result.metrics["loss"]
    assert final_loss < initial_loss - 0.2, (initial_loss, final_loss)
    assert {"q8", "q3", "accuracy"} <= set(result.metrics) and result.metrics["q3"] >= result.metrics["q8"]

    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final"]["loss"] == pytest.approx(final_loss)
    example = Example(token_ids=result.tokenizer("MKTAYIAKQRQISFVKSHFSRQ")["input_ids"], target=[-100] * 24)
    batch = collate_examples([example], task="token_classification", batching="padded", pad_token_id=1,
                             device=torch.device("cpu"))  # fmt: skip
    with torch.no_grad():
        trained = result.model.eval()(**batch.inputs).logits
        restored = load_finetuned(out).model(**batch.inputs).logits
        merged = load_finetuned(out, merge=True)
        merged_logits = merged.model(**batch.inputs).logits
    torch.testing.assert_close(restored, trained, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged_logits, trained, atol=1e-4, rtol=0)
    assert type(merged.model).__name__ == "Esm2ForTokenClassification"
    assert merged.model.config.id2label[7] == "~"


def _sequence_table(tmp_path: Path) -> Path:
    """Synthetic labels a small model can learn: charge sign (classification) and K+R fraction (regression)."""
    rng = np.random.default_rng(0)
    sequences, classes, values = [], [], []
    for _ in range(48):
        n = int(rng.integers(12, 40))
        basic = rng.random() < 0.5
        pool = list("KRKRAG") if basic else list("DEDEAG")
        sequence = "".join(rng.choice(pool, n))
        sequences.append(sequence)
        classes.append("basic" if basic else "acidic")
        values.append(sum(c in "KR" for c in sequence) / n)
    path = tmp_path / "labels.csv"
    pa_csv.write_csv(pa.table({"sequence": sequences, "label": classes, "value": values}), path)
    return path


@pytest.mark.parametrize("task", ["sequence_classification", "sequence_regression"])
def test_full_finetune_sequence_heads(esm_dir: Path, tmp_path: Path, task: str) -> None:
    data = _sequence_table(tmp_path)
    label_column = "label" if task == "sequence_classification" else "value"
    result = finetune(
        load_finetune_config(task, [f"model={esm_dir}", f"data={data}", f"label_column={label_column}",
                                    f"output_dir={tmp_path / 'out'}", "max_steps=12", "lr=2e-3", "val_fraction=0.25",
                                    *TINY]),
        progress=False,
    )  # fmt: skip
    assert result.metrics["loss"] < result.history[0]["val_loss"]
    if task == "sequence_classification":
        assert result.metrics["accuracy"] >= 0.75
    else:
        assert result.metrics["spearman"] > 0.5 and {"mse", "pearson"} <= set(result.metrics)
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    restored = load_finetuned(tmp_path / "out")
    assert restored.model.config.problem_type == (
        "single_label_classification" if task == "sequence_classification" else "regression"
    )


def test_config_and_input_errors(esm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no_such_key"):
        load_finetune_config("token_classification", [f"model={esm_dir}", "no_such_key=1"])
    with pytest.raises(ValueError, match="model"):
        load_finetune_config("sequence_classification", [f"data={tmp_path}/x.csv"])
    with pytest.raises(ValueError, match="no fine-tuning recipe 'nope'"):
        load_finetune_config("nope")
    assert finetune_main(["--task", "token_classification", "--model", str(esm_dir), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label_set"] == "dssp8" and printed["model"] == str(esm_dir)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"Sequence": ["MKV", "MKVL"], "Secondary_structure": ["HHH", "HH"]}), bad)
    argv = ["--task", "token_classification", "--model", str(esm_dir), "--data", str(bad), "device=cpu"]
    assert finetune_main(argv) == 2
    assert "row 1 (row1): 4 residues but 2 per-residue labels" in capsys.readouterr().err
    argv = ["--task", "token_classification", "--model", str(tmp_path / "missing"), "--data", str(bad)]
    assert finetune_main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipe_data_resolves_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped recipes name ``../shared/data/...``: it must resolve outside the repository root too."""
    shared = tmp_path / "elsewhere" / "shared_data"
    shared.mkdir(parents=True)
    (shared / "porter6_secondary_structure_sample.parquet").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    monkeypatch.setenv("BIOSCALE_SHARED_DATA", str(shared))
    default = load_finetune_config("token_classification", ["model=m"]).data
    assert resolve_data_path(default) == str(shared / "porter6_secondary_structure_sample.parquet")
    (tmp_path / "mine.csv").write_text("sequence,label\n")
    assert resolve_data_path("mine.csv") == "mine.csv"  # existing paths are kept as given
    assert resolve_data_path("../shared/data/absent.parquet") == "../shared/data/absent.parquet"  # error names it
    assert resolve_data_path("missing.csv") == "missing.csv"


def test_finetune_config_shares_the_trainer_sections_and_keeps_the_flat_names(tmp_path: Path) -> None:
    from bioscale.train.config import OptimizerConfig, SchedulerConfig

    base = ["model=m", "data=d.parquet"]
    new = load_finetune_config("token_classification", [*base, "optimizer.lr=2e-3", "scheduler.warmup_steps=7",
                                                        "num_train_steps=9", "max_grad_norm=0.5"])  # fmt: skip
    old = load_finetune_config("token_classification", [*base, "lr=2e-3", "warmup_steps=7", "max_steps=9",
                                                        "grad_clip=0.5"])  # fmt: skip
    assert isinstance(new.optimizer, OptimizerConfig) and isinstance(new.scheduler, SchedulerConfig)
    assert (new.optimizer.lr, new.scheduler.warmup_steps, new.num_train_steps, new.max_grad_norm) == (2e-3, 7, 9, 0.5)
    assert (old.optimizer, old.scheduler, old.num_train_steps, old.max_grad_norm) == (
        new.optimizer, new.scheduler, new.num_train_steps, new.max_grad_norm)  # fmt: skip
    recipe = tmp_path / "old_style.yaml"  # a recipe file written for the flat schema
    recipe.write_text("task: token_classification\nmodel: m\ndata: d.parquet\nlr: 3.0e-3\nmax_steps: 4\n")
    loaded = load_finetune_config(recipe)
    assert (loaded.optimizer.lr, loaded.num_train_steps) == (3e-3, 4)
    with pytest.raises(ValueError, match="same setting"):
        load_finetune_config("token_classification", [*base, "lr=1e-3", "optimizer.lr=2e-3"])
    with pytest.raises(ValueError, match="scheduler.kind must be one of"):
        load_finetune_config("token_classification", [*base, "scheduler.kind=step"])
