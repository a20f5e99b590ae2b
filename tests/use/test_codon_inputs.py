"""Coding sequences through the use paths of a codon model (CodonFM EnCodon): ``bioscale embed`` gives one vector per
codon and a pooled mean over codons, equal to a direct forward of the codon tokenizer's ids; inputs are cleaned as
CDSs with a counted warning; fine-tuning reads the same codon tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
import torch

from bioscale.data.tokenizers import codon_tokenizer
from bioscale.models import build_config, build_model
from bioscale.use import embed, load_model
from bioscale.use.finetune import build_examples, finetune, load_finetune_config

from .conftest import write_fasta

# Real coding sequences: the first 21 codons of E. coli lacZ, of human HBB (lower case) and of a GFP (as RNA).
CDS = {
    "lacZ": "ATGACCATGATTACGGATTCACTGGCCGTCGTTTTACAACGTCGTGACTGGGAAAACCCTGGC",
    "hbb": "atggtgcatctgactcctgaggagaagtctgccgttactgccctgtggggcaaggtgaacgtg",
    "gfp": "AUGGUGAGCAAGGGCGAGGAGCUGUUCACCGGGGUGGUGCCCAUCCUGGUCGAGCUGGACGGC",
}


@pytest.fixture(scope="module")
def codon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = build_model(build_config("codonfm", "debug"), task="masked_lm", device="cpu").eval()
    path = tmp_path_factory.mktemp("encodon")
    model.save_pretrained(path)
    codon_tokenizer().save_pretrained(path)
    return path


def _direct(model: torch.nn.Module, sequence: str) -> torch.Tensor:
    """Last hidden states of one CDS alone, through the codon tokenizer (``<CLS>`` codons ``<SEP>``)."""
    ids = codon_tokenizer()(sequence.upper().replace("U", "T"))["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_embed_is_per_codon_and_equals_a_direct_forward(codon_dir: Path, tmp_path: Path) -> None:
    result = embed(codon_dir, write_fasta(tmp_path / "cds.fna", CDS), per_residue=True, device="cpu", progress=False)
    base = load_model(codon_dir, task="base", device="cpu").model.eval()
    assert list(result.ids) == list(CDS)
    for row, (record_id, sequence) in enumerate(CDS.items()):
        hidden = _direct(base, sequence)
        assert result.lengths[row] == len(sequence) // 3 == hidden.shape[0] - 2
        torch.testing.assert_close(torch.from_numpy(result.per_residue[row]), hidden[1:-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(result.pooled[row]), hidden[1:-1].mean(0), rtol=1e-4, atol=1e-5)
    cls = embed(codon_dir, list(CDS.values()), pooling="cls", device="cpu", progress=False)
    torch.testing.assert_close(torch.from_numpy(cls.pooled[0]), _direct(base, CDS["lacZ"])[0], rtol=1e-4, atol=1e-5)


def test_windows_count_codons_and_cover_the_sequence(codon_dir: Path) -> None:
    """A context of 8 tokens is 6 codons: a 21-codon CDS is cut in codon-aligned windows, never mid-codon."""
    sequence = CDS["lacZ"]
    windowed = embed(codon_dir, [sequence], max_length=8, window_overlap=2, per_residue=True, device="cpu",
                     progress=False)  # fmt: skip
    assert windowed.num_windowed == 1 and windowed.lengths[0] == len(sequence) // 3
    base = load_model(codon_dir, task="base", device="cpu").model.eval()
    first = _direct(base, sequence[:18])  # the first window: codons 1-6
    torch.testing.assert_close(torch.from_numpy(windowed.per_residue[0][:4]), first[1:5], rtol=1e-4, atol=1e-5)
    truncated = embed(codon_dir, [sequence], max_length=8, long_sequences="truncate", device="cpu", progress=False)
    assert truncated.lengths[0] == 6


def test_cds_cleaning_is_counted_and_an_empty_cds_is_refused(codon_dir: Path) -> None:
    messy = {"partial": CDS["lacZ"] + "AC", "ambiguous": "ATGNNNAAATAA", "nostart": "CCCAAATAG"}
    with pytest.warns(UserWarning) as caught:
        result = embed(codon_dir, messy, device="cpu", progress=False)
    message = " ".join(str(w.message) for w in caught)
    assert "1 are not a whole number of codons" in message
    assert "1 hold bases other than ACGT (1 codons read as <UNK>)" in message
    assert "do not begin with a start codon" in message
    assert list(result.lengths) == [len(CDS["lacZ"]) // 3, 4, 3]
    with pytest.raises(ValueError, match="'tiny'.*no whole codon"):
        embed(codon_dir, {"tiny": "AT"}, device="cpu", progress=False)


def test_finetune_examples_and_a_sequence_head_on_codons(codon_dir: Path, tmp_path: Path) -> None:
    tokenizer = codon_tokenizer()

    class Data:
        ids = list(CDS)
        sequences = list(CDS.values())
        labels = ["a", "b", "a"]

    examples, _ = build_examples(Data, [0, 1, 2], tokenizer, task="sequence_classification", max_length=64,
                                 label_names=["a", "b"], label_set="auto")  # fmt: skip
    for example, sequence in zip(examples, CDS.values()):
        assert example.token_ids == tokenizer(sequence.upper().replace("U", "T"))["input_ids"]
    rng = np.random.default_rng(0)
    codons = [c for c in tokenizer.get_vocab() if len(c) == 3]
    # GC-rich vs AT-rich synthetic genes: a label a sequence head learns from codon identity alone.
    rich = ["".join(rng.choice([c for c in codons if c.count("G") + c.count("C") >= 2], 20)) for _ in range(16)]
    poor = ["".join(rng.choice([c for c in codons if c.count("G") + c.count("C") <= 1], 20)) for _ in range(16)]
    table = tmp_path / "genes.csv"
    pa_csv.write_csv(pa.table({"sequence": ["ATG" + s for s in rich + poor], "label": ["gc"] * 16 + ["at"] * 16}), table)
    result = finetune(
        load_finetune_config("sequence_classification", [
            f"model={codon_dir}", f"data={table}", "label_column=label", f"output_dir={tmp_path / 'out'}",
            "max_steps=20", "lr=3e-3", "val_fraction=0.25", "max_length=32", "max_tokens_per_batch=512",
            "log_every=10", "eval_every=1000", "device=cpu", "warmup_steps=2",
        ]),
        progress=False,
    )  # fmt: skip
    assert result.metrics["accuracy"] >= 0.75
