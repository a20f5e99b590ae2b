"""Zero-shot variant scores: batched and packed (and padded) masked log-likelihood ratios equal a brute-force
computation with one forward per variant, for codon substitutions (EnCodon) and amino-acid substitutions (ESM-2,
AMPLIFY); bad substitutions are refused naming the record and position; ``bioscale score`` writes the same numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bioscale.data.cds import write_cds_fasta
from bioscale.data.tokenizers import amplify_tokenizer, codon_tokenizer, protein_tokenizer
from bioscale.models import build_config, build_model
from bioscale.use.variants import Substitution, score_main, score_substitutions, score_variants

from .conftest import PROTEINS

# Two short CDS (an ATG ... stop reading frame each).
CDS = {
    "geneA": "ATGGCCAAAGGTTTTGAAGACCTGTGGCGTATTAAACCGTAA",
    "geneB": "ATGTCTGAACAGAAACTGATTTCTGAAGAAGATCTGTAG",
}
CODON_VARIANTS = {"geneA": ["GCC2GCA", "GCC2GGG", "TGG9TGA", "3:AAA>AAG"], "geneB": ["GAA3GAT", "ATG1GTG", "TAG13TAA"]}


def _spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the init, so that the masked distributions (and the scores) are far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def encodon():
    return _spread(build_model(build_config("codonfm", "debug"), device="cpu")), codon_tokenizer()


def brute_force(model, tokenizer, sequence: str, substitution: str, unit: int) -> float:
    """One forward per variant: mask the position in the sequence, log-softmax there, alt minus ref."""
    sub = Substitution.parse(substitution)
    ids = tokenizer(sequence)["input_ids"]
    index = 1 + sub.position - 1  # every tokenizer here puts one special token first
    ref = sequence[(sub.position - 1) * unit : sub.position * unit]
    assert tokenizer.convert_ids_to_tokens(ids[index]) == ref
    masked = list(ids)
    masked[index] = tokenizer.mask_token_id
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([masked])).logits[0, index].float(), dim=-1)
    return float(log_probs[tokenizer.convert_tokens_to_ids(sub.alt)] - log_probs[ids[index]])


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_codon_scores_equal_one_forward_per_variant(encodon, batching: str) -> None:
    model, tokenizer = encodon
    variants = [(record, CDS[record], subs) for record, subs in CODON_VARIANTS.items()]
    scores = score_variants(model, tokenizer, variants, batching=batching, max_tokens_per_batch=40)
    assert [(s.record, s.substitution) for s in scores] == [
        (record, str(Substitution.parse(sub))) for record, subs in CODON_VARIANTS.items() for sub in subs
    ]
    for score in scores:
        expected = brute_force(model, tokenizer, CDS[score.record], score.substitution, unit=3)
        assert score.score == pytest.approx(expected, abs=1e-5)
        assert score.score == pytest.approx(score.alt_log_prob - score.ref_log_prob, abs=1e-9)
    assert max(abs(s.score) for s in scores) > 0.1  # not a comparison of near-zero numbers
    # The two substitutions at position 2 of geneA share one masked copy: the same reference log-probability.
    assert scores[0].ref_log_prob == scores[1].ref_log_prob


@pytest.mark.parametrize(("family", "tokenizer"), [("esm2", protein_tokenizer), ("amplify", amplify_tokenizer)])
def test_amino_acid_scores_equal_one_forward_per_variant(family: str, tokenizer) -> None:
    model = _spread(build_model(build_config(family, "debug"), device="cpu"))
    tok = tokenizer()
    variants = {"hba": (PROTEINS["hba"], ["M1A", "V2L", "K41R"]), "hbb": (PROTEINS["hbb"], ["E7K", "E7V"])}
    for batching in ("packed", "padded"):
        scores = score_variants(model, tok, variants, batching=batching, max_tokens_per_batch=256)
        assert len(scores) == 5
        for score in scores:
            expected = brute_force(model, tok, PROTEINS[score.record], score.substitution, unit=1)
            assert score.score == pytest.approx(expected, abs=1e-5)


def test_bad_substitutions_are_refused_naming_record_and_position(encodon) -> None:
    model, tokenizer = encodon
    seq = CDS["geneA"]
    cases = [
        ("GCA2GCT", r"record 'geneA', substitution GCA2GCT: the reference codon at position 2 is 'GCC', not 'GCA'"),
        ("AAA99AAG", r"record 'geneA', substitution AAA99AAG: position 99 is out of range 1..14 \(codons\)"),
        ("GCC2GNN", r"the alternative 'GNN' is not a codon token"),
        ("GC2GG", r"the reference must be one codon"),
        ("GCC2", r"expected REF<position>ALT"),
    ]
    for substitution, message in cases:
        with pytest.raises(ValueError, match=message):
            score_substitutions(model, tokenizer, seq, [substitution], record="geneA")
    with pytest.raises(ValueError, match=r"record 'geneA': a coding sequence of 43 bases is not a whole number"):
        score_substitutions(model, tokenizer, seq + "A", ["GCC2GCA"], record="geneA")
    with pytest.raises(ValueError, match="exceed the model's context of 2048 tokens"):
        score_substitutions(model, tokenizer, "ATG" * 2100, ["ATG1GTG"])
    protein = _spread(build_model(build_config("esm2", "debug"), device="cpu"))
    with pytest.raises(ValueError, match="the reference residue at position 1 is 'M', not 'K'"):
        score_substitutions(protein, protein_tokenizer(), PROTEINS["hba"], ["K1A"], record="hba")


def test_bioscale_score_writes_the_scores(encodon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = encodon
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    fasta = write_cds_fasta(CDS.items(), tmp_path / "genes.fna")
    table = tmp_path / "variants.tsv"
    table.write_text("record\tsubstitution\ngeneA\tGCC2GCA\ngeneB\tGAA3GAT\n")
    out = tmp_path / "scores.tsv"
    code = score_main([str(tmp_path / "model"), str(fasta), "--variants", str(table), "--variant", "geneA:TGG9TGA",
                       "-o", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(out.open(), delimiter="\t"))
    # Grouped by record in the order first named (--variant before --variants), in the given order inside a record.
    assert [(r["record"], r["substitution"]) for r in rows] == [("geneA", "TGG9TGA"), ("geneA", "GCC2GCA"),
                                                                ("geneB", "GAA3GAT")]  # fmt: skip
    expected = brute_force(model, tokenizer, CDS["geneB"], "GAA3GAT", unit=3)
    assert float(rows[2]["score"]) == pytest.approx(expected, abs=1e-5)
    code = score_main([str(tmp_path / "model"), str(fasta), "--variant", "geneA:GCA2GCT", "--device", "cpu"])
    assert code == 2 and "the reference codon at position 2 is 'GCC', not 'GCA'" in capsys.readouterr().err
