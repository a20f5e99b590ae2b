"""What ``--scale tiny|small|medium|full`` means for each stage: data size, training steps, evaluation size.

One table, so a reader sees in one place what a tiny run skips. ``tiny`` is the smoke test (the whole pipe in about a
minute or two on 2 CPU cores, on the offline demo corpus); ``small`` and ``medium`` are quick GPU iterations on the
ESM-2 8M shape; ``full`` uses all the data. Every value can still be overridden per stage (``--max-records``,
``--train-override num_train_steps=...``, ``--max-sequences``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from bioscale.pipeline.artifacts import Modality, Scale

SCALES: tuple[str, ...] = get_args(Scale)


@dataclass(frozen=True)
class ScalePreset:
    # data: keep at most this many unique sequences (None: all), read in source order
    max_records: int | None
    # data: DNA records are cut into chunks of this many bases before de-duplication and the split
    dna_chunk_length: int
    # data: the demo corpus curated when no source is given, per modality
    demo_source: dict[str, str]
    # train: recipe and overrides per modality (user overrides are appended after these, so they win)
    recipe: dict[str, str]
    train_overrides: dict[str, tuple[str, ...]]
    # eval: validation sequences scored (None: all)
    eval_max_sequences: int | None
    # eval: Porter6 proteins used by the secondary-structure probe (train + test; None: all)
    ss_max_proteins: int | None
    # eval: L-BFGS iterations of the linear probe
    probe_max_iter: int
    # eval: optimizer steps of the secondary-structure fine-tune (--ss-head lora|full) per model
    ss_finetune_steps: int = 500


_RECIPES = {"protein": "L0_sanity", "dna": "L0_sanity_llama3"}

PRESETS: dict[str, ScalePreset] = {
    "tiny": ScalePreset(
        max_records=1_000,
        dna_chunk_length=1_000,
        demo_source={"protein": "demo:protein", "dna": "demo:dna-small"},
        recipe=_RECIPES,
        # The recipes' own model sizes (ESM-2 / Llama 3 `debug`) and a short budget with no periodic checkpoint: the
        # pipe must finish in about a minute on 2 CPU cores.
        train_overrides={
            "protein": ("num_train_steps=40", "checkpoint.save_every_n_steps=0"),
            "dna": ("num_train_steps=40", "checkpoint.save_every_n_steps=0"),
        },
        eval_max_sequences=64,
        ss_max_proteins=80,
        probe_max_iter=50,
        ss_finetune_steps=20,
    ),
    "small": ScalePreset(
        max_records=20_000,
        dna_chunk_length=4_096,
        demo_source={"protein": "demo:protein", "dna": "demo:dna"},
        recipe=_RECIPES,
        train_overrides={
            "protein": ("model.size=esm2_t6_8M", "num_train_steps=1000", "scheduler.warmup_steps=100"),
            "dna": ("num_train_steps=1000", "scheduler.warmup_steps=100"),
        },
        eval_max_sequences=1_000,
        ss_max_proteins=500,
        probe_max_iter=300,
    ),
    "medium": ScalePreset(
        max_records=200_000,
        dna_chunk_length=4_096,
        demo_source={"protein": "demo:protein", "dna": "demo:dna"},
        recipe=_RECIPES,
        train_overrides={
            "protein": ("model.size=esm2_t6_8M", "num_train_steps=5000", "scheduler.warmup_steps=500"),
            "dna": ("num_train_steps=5000", "scheduler.warmup_steps=500"),
        },
        eval_max_sequences=5_000,
        ss_max_proteins=None,
        probe_max_iter=300,
    ),
    "full": ScalePreset(
        max_records=None,
        dna_chunk_length=8_192,
        demo_source={"protein": "demo:protein", "dna": "demo:dna"},
        recipe=_RECIPES,
        train_overrides={
            "protein": ("model.size=esm2_t6_8M", "num_train_steps=20000", "scheduler.warmup_steps=2000"),
            "dna": ("num_train_steps=20000", "scheduler.warmup_steps=2000"),
        },
        eval_max_sequences=None,
        ss_max_proteins=None,
        probe_max_iter=500,
    ),
}


def get_preset(scale: str) -> ScalePreset:
    if scale not in PRESETS:
        raise ValueError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    return PRESETS[scale]


def check_modality(kind: str) -> Modality:
    if kind not in ("protein", "dna"):
        raise ValueError(f"unknown kind {kind!r}: expected 'protein' or 'dna'")
    return kind  # type: ignore[return-value]
