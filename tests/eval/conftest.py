"""Tiny random-weight models for the evaluation tests (float32, CPU), and real protein fragments."""

from __future__ import annotations

import pytest
import torch

from bioscale.data.tokenizers import nucleotide_tokenizer, protein_tokenizer
from bioscale.models import build_config, build_model

# UniProt P69905 (HBA_HUMAN), P68871 (HBB_HUMAN) fragments and two short peptides: different lengths, so batches pad.
PROTEINS = [
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL",
    "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKVKAHGKKVLGAFSDGLAHLDNLKGTFATLSELHC",
    "MKTAYIAKQRQISFVKSHFSRQ",
    "GSHMLEDPV",
]
DNA = ["ACGTACGGTTACGATCGATCGGATCCA", "TTGACAGCTAGCTCAGTCCTAGG", "GATTACA" * 9]


@pytest.fixture(scope="session")
def esm():
    torch.manual_seed(11)
    model = build_model(build_config("esm2", "debug"), task="masked_lm", device="cpu").eval()
    return model, protein_tokenizer()


@pytest.fixture(scope="session")
def llama():
    torch.manual_seed(12)
    tokenizer = nucleotide_tokenizer()
    config = build_config(
        "llama3", "debug", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return build_model(config, task="causal_lm", device="cpu").eval(), tokenizer
