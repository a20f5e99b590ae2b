"""The reference-compatible DNA recipe (``L0_sanity_llama3_ascii``: byte-level tokenizer, soft-masked bases kept,
upper-cased and ambiguity-free targets) trains, and ``summary.json`` reports the genomic label counts."""

from __future__ import annotations

import json
from pathlib import Path

from train_helpers import run_in_process

from bioscale.train.config import load_config


def test_ascii_recipe_resolves_to_the_reference_vocabulary() -> None:
    cfg = load_config("L0_sanity_llama3_ascii")
    assert cfg.data.tokenizer == "nucleotide_ascii" and cfg.data.keep_case and cfg.data.uppercase_labels
    assert dict(cfg.model.overrides) == {"vocab_size": 256, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 0}


def test_ascii_recipe_trains_and_counts_its_labels(tmp_path: Path) -> None:
    fasta = tmp_path / "soft_masked.fasta"
    fasta.write_text("".join(f">r{i}\n{'ACGTacgtNNAC' * 20}ggccRYATTTGA\n" for i in range(8)))
    summary = run_in_process("L0_sanity_llama3_ascii", tmp_path / "run",
                             [f"data.source={fasta}", "num_train_steps=3", "data.max_seq_length=64"])  # fmt: skip
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    counts = on_disk["data_policy"]
    assert counts == summary["data_policy"]
    assert counts["lowercase_kept"] > 0 and counts["uppercased"] == 0
    assert counts["labels_uppercased"] > 0 and counts["labels_ambiguous_ignored"] > 0
    assert on_disk["final_loss"] is not None
