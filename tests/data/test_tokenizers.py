"""Tokenizers: ESM-2's exact ids (against transformers' own EsmTokenizer), round trips, and the LUT encoder."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer, EsmTokenizer

from bioscale.data import CharTokenEncoder, canonical_token_ids, nucleotide_tokenizer, protein_tokenizer

# ESM-2's alphabet as the issue states it (== facebook/esm2_t6_8M_UR50D vocab.txt), written out independently of the
# module under test.
ESM2_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]


@pytest.fixture(scope="module")
def esm_reference(tmp_path_factory) -> EsmTokenizer:
    vocab = tmp_path_factory.mktemp("esm") / "vocab.txt"
    vocab.write_text("\n".join(ESM2_VOCAB))
    return EsmTokenizer(str(vocab))


def test_protein_ids_are_esm2s():
    tok = protein_tokenizer()
    assert len(tok) == 33
    assert tok.get_vocab() == {t: i for i, t in enumerate(ESM2_VOCAB)}
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 32)
    assert tok.model_max_length == 1026
    assert tok("MKV")["input_ids"] == [0, 20, 15, 7, 2]
    assert tok("MKT")["input_ids"] == [0, 20, 15, 11, 2]
    assert tok.decode(tok("MKT")["input_ids"]) == "<cls>MKT<eos>"


@pytest.mark.parametrize(
    "text", ["MKVLAAGIT", "LAGVSERTIDPKQNFYMHWCXBUZO.-", "M K V", "MK<mask>VL", "A", "MKV" * 400]
)
def test_protein_matches_transformers_esm_tokenizer(esm_reference, text):
    tok = protein_tokenizer()
    assert tok(text)["input_ids"] == esm_reference(text)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == esm_reference(text, add_special_tokens=False)["input_ids"]
    pair = tok("MKV", "LLA")["input_ids"]
    assert pair == esm_reference("MKV", "LLA")["input_ids"]


def test_protein_lower_case_and_unknown():
    tok = protein_tokenizer()
    assert tok("mkv")["input_ids"] == tok("MKV")["input_ids"]  # ESM's tokenizer would give <unk>: documented
    assert tok("M*J")["input_ids"] == [0, 20, 3, 3, 2]  # characters outside the alphabet are <unk>


def test_round_trip_decode_and_save_load(tmp_path):
    for tok, text in ((protein_tokenizer(), "MKVLAXBUZO.-"), (nucleotide_tokenizer(), "ACGTNRYSWKMBDHV")):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        tok.save_pretrained(tmp_path / str(len(tok)))
        config = json.loads((tmp_path / str(len(tok)) / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # resolvable by transformers 4.x and 5.x
        loaded = AutoTokenizer.from_pretrained(tmp_path / str(len(tok)))
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded(text.lower())["input_ids"] == ids
        assert loaded.all_special_ids == tok.all_special_ids
        assert (loaded.pad_token_id, loaded.mask_token_id, loaded.eos_token_id) == (1, tok.mask_token_id, 2)
        assert loaded.model_max_length == tok.model_max_length
        assert pickle.loads(pickle.dumps(tok))(text)["input_ids"] == ids
        padded = loaded(["A", text], padding=True)["input_ids"]
        short = len(loaded("A")["input_ids"])  # <cls> A <eos> (protein); <bos> A (DNA: no <eos> after a prompt)
        assert padded[0][short:] == [loaded.pad_token_id] * (len(text) - 1)


def test_nucleotide_vocabulary():
    tok = nucleotide_tokenizer()
    expected = ["<bos>", "<pad>", "<eos>", "<unk>", "<mask>", *"ACGTNRYSWKMBDHV"]
    assert tok.get_vocab() == {t: i for i, t in enumerate(expected)}
    assert len(tok) == 20
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    # <bos> + bases, no <eos>: a prompt encoded by the stock tokenizer stays open (the data pipeline adds <eos>).
    assert tok("acgtn")["input_ids"] == [0, 5, 6, 7, 8, 9]
    assert tok("ACXU")["input_ids"] == [0, 5, 6, 3, 3]
    assert CharTokenEncoder(tok).encode("acgtn").tolist() == [0, 5, 6, 7, 8, 9, 2]


@pytest.mark.parametrize("make", [protein_tokenizer, nucleotide_tokenizer])
def test_lut_encoder_matches_tokenizer(make):
    tok = make()
    encoder = CharTokenEncoder(tok)
    rng = np.random.default_rng(0)
    chars = np.array(list("LAGVSERTIDPKQNFYMHWCXBUZO.-ACGTNRYSWKMBDHVacgtmkvlxjJ*#9éß"))
    # The DNA tokenizer adds no <eos> after a prompt; the training encoder ends every record with one.
    record_eos = [tok.eos_token_id] if make is nucleotide_tokenizer else []
    for _ in range(200):
        text = "".join(rng.choice(chars, size=int(rng.integers(1, 50))))
        expected = tok(text)["input_ids"] + record_eos
        got = encoder.encode(text)
        assert got.dtype == np.uint8
        assert got.tolist() == expected, text
    assert encoder.num_special == 2


def test_canonical_token_ids():
    prot, dna = protein_tokenizer(), nucleotide_tokenizer()
    assert canonical_token_ids(prot, "protein") == list(range(4, 24))
    assert canonical_token_ids(dna, "nucleotide") == [5, 6, 7, 8]
    assert canonical_token_ids(prot) == list(range(4, 24))  # kind recognised from the vocabulary
    assert canonical_token_ids(dna, "other") == list(range(5, 20))  # any other: every non-special, non-<…> token
    assert canonical_token_ids(prot, "other") == list(range(4, 31))  # <null_1> excluded
