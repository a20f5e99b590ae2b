"""The training loop in-process: L0_sanity learns and fills its run directory, the export equals the trained
weights, gradient accumulation equals the full batch, and non-finite steps are skipped, counted and stopped."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import losses, run_in_process

from bioscale.train.metrics import read_metrics

L0_STEPS = 40

# A protein causal LM (Llama 3 debug on the demo proteome, ProGen-style) with deterministic windows: sequences of
# varied length, so the loss normaliser and padding both matter, and no random masking or cropping, so two batchings
# of the same sequences must give the same losses.
PROTEIN_CLM = [
    "data.source=demo:protein",
    "data.tokenizer=protein",
    "data.crop=window",
    "data.max_seq_length=64",
    "data.shuffle=false",
    "++model.overrides.vocab_size=33",
    "++model.overrides.pad_token_id=1",
    "++model.overrides.bos_token_id=0",
    "++model.overrides.eos_token_id=2",
    "optimizer.lr=3e-3",
    "scheduler.warmup_steps=1",
]


@pytest.fixture(scope="module")
def l0_run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("l0_sanity") / "run"
    summary = run_in_process(
        "L0_sanity",
        run_dir,
        [
            f"num_train_steps={L0_STEPS}",
            "logging.tensorboard=true",
            "checkpoint.save_final_model=true",
            "checkpoint.save_every_n_steps=20",
        ],
    )
    return run_dir, summary


def test_l0_sanity_loss_falls(l0_run):
    run_dir, summary = l0_run
    trajectory = losses(run_dir)
    assert len(trajectory) == L0_STEPS
    # An untrained model predicts uniformly over the 33 tokens: loss ln(33) = 3.50 (measured 3.51 at step 1).
    assert trajectory[0] == pytest.approx(math.log(33), abs=0.1)
    # Measured on this recipe (40 steps, fp32, CPU): the mean of the last five steps is 2.82, about the entropy of
    # the amino-acid composition (~2.9 nats), i.e. the model has learnt at least the residue frequencies. 3.0 leaves
    # room for other CPUs' rounding but fails a model that did not learn (it would stay near 3.5).
    assert sum(trajectory[-5:]) / 5 < 3.0
    assert summary["num_skipped_steps"] == 0
    assert summary["final_step"] == L0_STEPS


def test_l0_sanity_run_directory_holds_every_artifact(l0_run):
    run_dir, summary = l0_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step_*")) == ["step_20", "step_40"]
    for export in ("final_model", "final_model_hf"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (ckpt_dir / export / name).is_file(), f"{export}/{name}"
    record = read_metrics(run_dir / "metrics.jsonl")[-1]
    required = {
        "step",
        "loss",
        "perplexity",
        "grad_norm",
        "lr",
        "step_time",
        "tokens_per_sec_per_gpu",
        "real_tokens_per_sec_per_gpu",
        "mfu",
        "peak_mem_gb",
    }
    assert required <= set(record)
    assert record["step"] == L0_STEPS
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert record["mfu"] is None  # CPU: no peak to compare against
    assert 0 < record["real_tokens_per_sec_per_gpu"] <= record["tokens_per_sec_per_gpu"]
    assert summary["final_model"] == str(ckpt_dir / "final_model")


def test_export_loads_with_from_pretrained_and_matches_the_trained_weights(l0_run):
    """Reference: the model weights in the last DCP checkpoint (written from the live model, not by the export)."""
    import transformers
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import bioscale  # noqa: F401  (registers the Auto classes)
    from bioscale.models import build_config, build_model

    run_dir, _ = l0_run
    ckpt_dir = run_dir / "checkpoints"
    dcp_to_torch_save(ckpt_dir / f"step_{L0_STEPS}", run_dir / "last.pt")
    trained_state = torch.load(run_dir / "last.pt", weights_only=False)["model_optim"]["model"]
    reference = build_model(build_config("esm2", "debug"), task="masked_lm", device="cpu")
    reference.load_state_dict(trained_state)
    reference.eval()

    exported = AutoModelForMaskedLM.from_pretrained(ckpt_dir / "final_model").eval()
    assert type(exported).__name__ == "Esm2ForMaskedLM"
    plain = transformers.EsmForMaskedLM.from_pretrained(ckpt_dir / "final_model_hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "final_model")
    batch = tokenizer(
        ["MKTAYIAKQRQISFVKSHFSRQ", "MSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQK"], return_tensors="pt", padding=True
    )
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        expected = reference(**batch).logits
        torch.testing.assert_close(exported(**batch).logits, expected, rtol=0, atol=0)
        # Stock ESM's logits at padding positions depend on the transformers release (4.x SDPA lets padded queries
        # attend differently); they are never read, so compare the real tokens.
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(plain(**batch).logits[real], expected[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        expected, build_model(build_config("esm2", "debug"), task="masked_lm", device="cpu")(**batch).logits
    )  # training changed something


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    full = run_in_process(
        "L0_sanity_llama3",
        tmp_path / "full",
        [*PROTEIN_CLM, "num_train_steps=4", "data.micro_batch_size=4", "grad_acc_steps=1"],
    )
    run_in_process(
        "L0_sanity_llama3",
        tmp_path / "acc",
        [*PROTEIN_CLM, "num_train_steps=4", "data.micro_batch_size=2", "grad_acc_steps=2"],
    )
    full_records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    acc_records = read_metrics(tmp_path / "acc" / "metrics.jsonl")
    # Same sequences per step (the label counts agree exactly) ...
    assert [r["num_label_tokens"] for r in acc_records] == [r["num_label_tokens"] for r in full_records]
    assert len({r["num_label_tokens"] for r in full_records}) > 1  # varied lengths: the normaliser matters
    # ... and the same losses and gradient norms up to float32 summation order.
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    assert [r["grad_norm"] for r in acc_records] == pytest.approx([r["grad_norm"] for r in full_records], rel=1e-4)
    assert full["final_loss"] < full["first_loss"]


def _inject_nan(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss of the given (1-based) steps NaN; with grad_acc_steps=1 there is one call per step."""
    import bioscale.train.train as train_module

    real = train_module.model_loss
    calls = {"n": 0}

    def model_loss(model, batch, *, task):
        calls["n"] += 1
        loss = real(model, batch, task=task)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(train_module, "model_loss", model_loss)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _inject_nan(monkeypatch, {3, 4})
    summary = run_in_process(
        "L0_sanity",
        tmp_path,
        ["num_train_steps=6", "nan_tolerance=3", "checkpoint.save_every_n_steps=1", "checkpoint.keep_last_n=10"],
    )
    assert summary["num_skipped_steps"] == 2
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] is None for r in records] == [False, False, True, True, False, False]
    assert [r["num_skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]

    def weights(step: int) -> dict:
        dcp_to_torch_save(tmp_path / "checkpoints" / f"step_{step}", tmp_path / f"{step}.pt")
        return torch.load(tmp_path / f"{step}.pt", weights_only=False)["model_optim"]["model"]

    # Skipped steps leave the weights untouched; the surrounding steps change them.
    for step_a, step_b, equal in ((2, 3, True), (3, 4, True), (4, 5, False), (1, 2, False)):
        a, b = weights(step_a), weights(step_b)
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == equal, (step_a, step_b)


def test_too_many_consecutive_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from bioscale.train.train import NonFiniteLossError

    _inject_nan(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps \(up to step 4\).*step_2"):
        run_in_process(
            "L0_sanity", tmp_path, ["num_train_steps=10", "nan_tolerance=2", "checkpoint.save_every_n_steps=2"]
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_2"]


@pytest.mark.slow
def test_compile_and_activation_checkpointing_keep_the_losses(tmp_path):
    """Per-block torch.compile (inductor on CPU, with a compile preset) + selective AC on packed batches vs the eager
    loop: same losses."""
    packed = ["num_train_steps=3", "use_sequence_packing=true", "data.max_tokens_per_batch=1024"]
    run_in_process("L0_sanity", tmp_path / "eager", packed)
    compiled = [*packed, "compile=true", "compile_presets=[persistent_rows_2048]", "activation_checkpointing=selective"]
    run_in_process("L0_sanity", tmp_path / "compiled", compiled)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_train_accepts_a_config_built_in_python(tmp_path, monkeypatch):
    from bioscale.data import DataConfig
    from bioscale.train.config import CheckpointConfig, LoggingConfig, TrainConfig
    from bioscale.train.train import train

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(
        num_train_steps=2,
        device="cpu",
        dtype="fp32",
        data=DataConfig(source="demo:protein", max_seq_length=64, micro_batch_size=4),
        logging=LoggingConfig(log_every_n_steps=1, tensorboard=False, progress_bar=False),
        checkpoint=CheckpointConfig(save_final_model=False),
    )
    summary = train(cfg)
    assert summary["final_step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "outputs" / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize(
    ("override", "named"),
    [("fp8_config.enabled=true", "fp8.enabled"), ("cp_size=2", "torchrun")],
)
def test_switches_this_machine_cannot_run_fail_clearly(tmp_path, override, named):
    # A plain CPU process: FP8 needs an sm_89+ GPU, context parallelism several ranks. ValueError -> CLI exit 2.
    with pytest.raises(ValueError, match=named):
        run_in_process("L0_sanity", tmp_path, ["num_train_steps=1", override])


def _record_layouts(monkeypatch) -> list[list[tuple[int, ...]]]:
    """The micro-batch shapes each step runs as (``rows_and_rest`` in the trainer), one list per packed batch."""
    import bioscale.train.train as train_module

    layouts: list[list[tuple[int, ...]]] = []
    convert = train_module.rows_and_rest

    def recording(batch, **kwargs):
        pieces = convert(batch, **kwargs)
        layouts.append([tuple(p["input_ids"].shape) for p in pieces])
        return pieces

    monkeypatch.setattr(train_module, "rows_and_rest", recording)
    return layouts


def test_uniform_packs_run_as_rows_with_the_same_losses(tmp_path: Path, shared_data: Path, monkeypatch) -> None:
    """Geneformer cells longer than the context pack into equal-length segments: with ``data.dense_uniform_packs``
    the trainer runs them as rows without a mask; the per-step losses equal the packed run's (float32, CPU)."""
    if not (shared_data / "genecorpus_500_samples.parquet").is_file():
        pytest.skip("genecorpus_500_samples.parquet not in the shared data folder")
    layouts = _record_layouts(monkeypatch)
    overrides = ["num_train_steps=4", "data.use_sequence_packing=true", "data.max_seq_length=32",
                 "data.max_tokens_per_batch=128", "data.shuffle=false"]  # fmt: skip
    run_in_process("L0_sanity_geneformer", tmp_path / "rows", overrides)
    assert layouts == [[(4, 32)]] * 4  # every step: 4 whole cells of 32 genes, as rows
    layouts.clear()
    run_in_process("L0_sanity_geneformer", tmp_path / "packed", [*overrides, "data.dense_uniform_packs=false"])
    assert layouts == []
    rows, packed = losses(tmp_path / "rows"), losses(tmp_path / "packed")
    assert len(rows) == 4
    assert rows == pytest.approx(packed, rel=1e-5, abs=1e-6)


def test_packs_with_a_shorter_cell_run_as_rows_plus_a_packed_rest_with_the_same_losses(
    tmp_path: Path, shared_data: Path, monkeypatch
) -> None:  # shared_data: the Geneformer gene vocabulary
    """A corpus of cells mostly longer than the context with a few short ones (the shared Genecorpus sample has 3 in
    500): a pack holding a short cell runs as the static rows plus a packed micro-batch of the rest, in the same
    step; the per-step losses equal the packed run's (float32, CPU)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    lengths = [40] * 24
    lengths[2] = lengths[13] = 19  # two short cells
    cells = [rng.integers(2, 25_000, size=n).tolist() for n in lengths]
    pq.write_table(pa.table({"input_ids": cells, "length": lengths}), tmp_path / "cells.parquet")
    layouts = _record_layouts(monkeypatch)
    overrides = ["num_train_steps=5", "data.use_sequence_packing=true", "data.max_seq_length=32",
                 "data.max_tokens_per_batch=128", "data.pad_to_multiple_of=16", "data.shuffle=false",
                 f"data.source={tmp_path / 'cells.parquet'}"]  # fmt: skip
    run_in_process("L0_sanity_geneformer", tmp_path / "rows", overrides)
    flat = [shape for step in layouts for shape in step]
    assert (4, 32) in flat and any(shape[0] == 1 for shape in flat), layouts  # rows and a packed rest both ran
    assert all(step[0] == (4, 32) for step in layouts), layouts  # the rows keep one static shape
    layouts.clear()
    run_in_process("L0_sanity_geneformer", tmp_path / "packed", [*overrides, "data.dense_uniform_packs=false"])
    rows, packed = losses(tmp_path / "rows"), losses(tmp_path / "packed")
    assert len(rows) == 5
    assert rows == pytest.approx(packed, rel=1e-5, abs=1e-6)
