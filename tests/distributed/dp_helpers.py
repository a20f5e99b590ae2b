"""What the data-parallel tests share: the protein causal-LM run they compare, its initial weights, and torchrun.

A plain module (not ``conftest.py``), imported by a name unique across ``tests/`` (see tests/train/train_helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# A protein causal LM with deterministic windows: see tests/train/test_train.py::PROTEIN_CLM.
PROTEIN_CLM = [
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every_n_steps=1",
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


def save_initial_weights(folder: Path) -> Path:
    """The Llama 3 debug model of :data:`PROTEIN_CLM`, seeded, as a ``save_pretrained`` folder (``model.init_from``)."""
    from bioscale.models import build_config, build_model
    from bioscale.train.config import load_config

    cfg = load_config("L0_sanity_llama3", ["device=cpu", *PROTEIN_CLM])
    torch.manual_seed(0)
    model = build_model(build_config("llama3", "debug", **cfg.model.overrides), task="causal_lm", device="cpu")
    path = folder / "llama3_debug_protein"
    model.save_pretrained(path)
    return path


def torchrun_train(
    recipe: str, overrides: list[str], *, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=<nproc> -m bioscale.cli train --config-name <recipe> <overrides>``."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), full_env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "bioscale.cli",
        "train",
        "--config-name",
        recipe,
        *overrides,
    ]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, check=False, timeout=600)
