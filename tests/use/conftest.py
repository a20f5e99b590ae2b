"""Tiny checkpoints for the use tests, written once per session: a bioscale ESM-2 masked LM, the same weights as a
plain ``transformers`` ``EsmForMaskedLM`` directory, and a bioscale Llama 3 causal LM with the nucleotide tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bioscale.data.tokenizers import nucleotide_tokenizer, protein_tokenizer
from bioscale.models import build_config, build_model, to_hf

# Real protein fragments (UniProt P69905 HBA_HUMAN, P68871 HBB_HUMAN, P0DTC2 spike N-terminus), short enough for CPU.
PROTEINS = {
    "hba": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL",
    "hbb": "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKVKAHGKKVLGAFSDGLAHLDNLKGTFATLSELHCDKLHVDPENFRLL",
    "spike": "MFVFLVLLPLVSSQCVNLTTRTQLPPAYTNSFTRGVYYPDKVFRSSVLHSTQDLFLPFFSNVTWFHAIHVSGTNGTKRFDNPVLPFNDGVYFAS",
    "short": "MKV",
}


def _save(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def esm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bioscale ``Esm2ForMaskedLM`` (debug size, random weights) with its tokenizer."""
    torch.manual_seed(1)
    model = build_model(build_config("esm2", "debug"), task="masked_lm", device="cpu").eval()
    return _save(model, protein_tokenizer(), tmp_path_factory.mktemp("esm_bioscale"))


@pytest.fixture(scope="session")
def esm_hf_dir(esm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as :func:`esm_dir`, saved as a plain ``transformers`` ``EsmForMaskedLM``."""
    from bioscale.use import load_model

    loaded = load_model(esm_dir, task="masked_lm")
    return _save(to_hf(loaded.model), loaded.tokenizer, tmp_path_factory.mktemp("esm_hf"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bioscale ``Llama3ForCausalLM`` (debug size, random weights) over the 20-token nucleotide vocabulary."""
    torch.manual_seed(2)
    tokenizer = nucleotide_tokenizer()
    config = build_config(
        "llama3",
        "debug",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model(config, task="causal_lm", device="cpu").eval()
    return _save(model, tokenizer, tmp_path_factory.mktemp("llama_bioscale"))


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    path.write_text("".join(f">{name} test record\n{seq[:60]}\n{seq[60:]}\n" for name, seq in records.items()))
    return path
