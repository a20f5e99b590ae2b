"""AMPLIFY's tokenizer (ids of the issue's table, on real UniRef90 sequences), its input policy, its MLM statistics
and packing, through the same data pipeline as ESM-2's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bioscale.data import (
    IGNORE_INDEX,
    DataConfig,
    InputPolicy,
    MLMCollator,
    build_dataloader,
    canonical_token_ids,
    count_tokens,
    get_policy_stats,
    get_tokenizer,
    nucleotide_tokenizer,
    pack_sequences,
    protein_tokenizer,
)
from bioscale.data.tokenizers import CharTokenEncoder, amplify_tokenizer

from .helpers import random_proteins, write_parquet

# The table, written out independently of the module under test: specials, the chain separator, the 20
# amino acids in ESM's order, then B (chandar-lab/AMPLIFY's 27-token amplify_vocab.txt; see tokenizers.py).
TABLE = ["<pad>", "<unk>", "<mask>", "<bos>", "<eos>", "|", *"LAGVSERTIDPKQNFYMHWC", "B"]
PAD, UNK, MASK, BOS, EOS, SEP = range(6)


def table_encode(sequence: str) -> list[int]:
    """``<bos> residues <eos>`` by the table: lower case is upper-cased, anything else is <unk>."""
    ids = {token: i for i, token in enumerate(TABLE)}
    return [BOS, *(ids.get(c.upper(), UNK) if len(c.upper()) == 1 else UNK for c in sequence), EOS]


@pytest.fixture(scope="module")
def tok():
    return amplify_tokenizer()


def test_vocabulary_and_special_ids_are_the_table(tok):
    assert len(tok) == 27 and tok.get_vocab() == {t: i for i, t in enumerate(TABLE)}
    special_ids = (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id, tok.bos_token_id, tok.eos_token_id)
    assert special_ids == (PAD, UNK, MASK, BOS, EOS)
    assert tok.convert_tokens_to_ids("|") == SEP and SEP in tok.all_special_ids
    assert tok.model_max_length == 2048
    assert tok("MKV")["input_ids"] == [BOS, 22, 17, 9, EOS]
    assert tok("mkvb")["input_ids"] == [BOS, 22, 17, 9, 26, EOS]
    assert tok("MK|XZUOJ*")["input_ids"] == [BOS, 22, 17, SEP, *[UNK] * 6, EOS]
    assert tok("MK<mask>V")["input_ids"] == [BOS, 22, 17, MASK, 9, EOS]
    assert tok.decode(tok("MKB")["input_ids"]) == "<bos>MKB<eos>"
    assert get_tokenizer("amplify").get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="unknown tokenizer 'esm'.*'amplify'"):
        get_tokenizer("esm")


def test_ids_equal_the_table_on_real_uniref90_sequences(tok, shared_data):
    import pyarrow.parquet as pq

    sequences = pq.read_table(shared_data / "uniref90_sample.parquet").column("sequence").to_pylist()
    encoder = CharTokenEncoder(tok)
    # All records with a character outside the 20 amino acids (X, B, U occur), and 1500 others.
    unusual = [s for s in sequences if set(s) - set("LAGVSERTIDPKQNFYMHWC")]
    sample = unusual + sequences[:1500]
    assert {"X", "B", "U"} <= set("".join(unusual))
    encoded = tok(sample, verbose=False)["input_ids"]
    for sequence, ids in zip(sample, encoded, strict=True):
        expected = table_encode(sequence)
        assert ids == expected
        assert encoder.encode(sequence).tolist() == expected
        assert encoder.encode(sequence.lower()).tolist() == expected


def test_lut_encoder_matches_the_tokenizer_on_random_text(tok):
    encoder = CharTokenEncoder(tok)
    rng = np.random.default_rng(0)
    chars = np.array(list("LAGVSERTIDPKQNFYMHWCXBUZOJ|.-*#9éacgtbxz"))
    for _ in range(200):
        text = "".join(rng.choice(chars, size=int(rng.integers(1, 50))))
        assert encoder.encode(text).tolist() == tok(text)["input_ids"] == table_encode(text), text
    assert encoder.num_special == 2


def test_saved_with_a_model_and_loaded_back(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.all_special_ids == tok.all_special_ids
    assert loaded("mk|vb")["input_ids"] == tok("MK|VB")["input_ids"]
    assert loaded(["MK", "MKVL"], padding=True)["input_ids"][0][4:] == [PAD, PAD]


def test_canonical_ids_are_the_twenty_residues(tok):
    assert canonical_token_ids(tok) == canonical_token_ids(tok, "amplify") == list(range(6, 26))  # not B, not |
    assert canonical_token_ids(tok, "protein") == list(range(6, 26))  # what perplexity scoring asks for


def test_policy_keeps_b_and_separator_and_maps_the_rest_counted():
    policy = InputPolicy("amplify")
    assert policy("r1", "mkvB|llXZUOJ*") == ["MKVB|LLXXXXX"]
    assert policy("r2", "MKV") == ["MKV"]
    stats = policy.stats
    assert (stats.uppercased, stats.stop_stripped, stats.records_mapped, stats.residues_mapped) == (1, 1, 1, 5)
    assert table_encode("MKVB|LLXXXXX") == amplify_tokenizer()("MKVB|LLXXXXX")["input_ids"]  # X becomes <unk>
    assert InputPolicy("amplify", unknown_residues="reject")("r3", "MKX") == []
    with pytest.raises(ValueError, match="character 'U' at position 3 is not in the amplify alphabet"):
        InputPolicy("amplify", unknown_residues="error")("r4", "MKUV")
    assert DataConfig(tokenizer="amplify").resolved_crop == "random"  # AMPLIFY crops long sequences at random


@pytest.mark.parametrize("packed", [False, True])
def test_mlm_statistics(tok, packed):
    """15% of the non-special tokens selected (Bernoulli per token), 80 / 10 / 10 <mask> / random residue / kept;
    random replacements are the 20 residues only; <bos>, <eos>, <pad>, <unk> and | are never selected."""
    encoder = CharTokenEncoder(tok)
    chains = random_proteins(300, seed=5, low=40, high=300)
    proteins = [p[: len(p) // 2] + "|" + p[len(p) // 2 :] + "BX" for p in chains]  # two chains, B and an unknown
    token_lists = [encoder.encode(p).astype(np.int64) for p in proteins]
    collator = MLMCollator(tok, random_token_ids=canonical_token_ids(tok, "amplify"))
    rng = np.random.default_rng(0)
    if packed:
        batches = [collator.apply(b, rng) for b in pack_sequences(token_lists, max_tokens=4096, pad_token_id=PAD)]
        original = torch.from_numpy(np.concatenate(token_lists))
        inputs = torch.cat([b["input_ids"][0] for b in batches])
        labels = torch.cat([b["labels"][0] for b in batches])
    else:
        batch = collator(token_lists, rng)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()  # padded with <pad> = 0
        keep = batch["attention_mask"].bool()
        original = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(t) for t in token_lists], batch_first=True)[keep]
        inputs, labels = batch["input_ids"][keep], batch["labels"][keep]
    is_special = torch.isin(original, torch.tensor([PAD, UNK, MASK, BOS, EOS, SEP]))
    selected = labels != IGNORE_INDEX
    assert not (selected & is_special).any()
    assert torch.equal(labels[selected], original[selected]) and torch.equal(inputs[~selected], original[~selected])
    rate = selected.sum().item() / (~is_special).sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)  # ~50k candidate tokens: 0.15 +- 5 sigma
    masked = (inputs[selected] == MASK).float().mean().item()
    kept = (inputs[selected] == original[selected]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1 + 0.1 / 20, abs=0.02)
    replaced = inputs[selected & (inputs != MASK) & (inputs != original)]
    assert replaced.numel() > 0 and set(replaced.tolist()) <= set(range(6, 26))


def test_loader_end_to_end_packed(tmp_path):
    proteins = random_proteins(200, seed=7, low=30, high=400)
    proteins[3] = "mkvxz" + proteins[3]  # counted: lower case, X and Z
    path = write_parquet(tmp_path / "p.parquet", proteins)
    cfg = DataConfig(source=str(path), tokenizer="amplify", use_sequence_packing=True, max_seq_length=128,
                     max_tokens_per_batch=1024, pad_to_multiple_of=16, shuffle_buffer_size=200)  # fmt: skip
    loader = build_dataloader(cfg, amplify_tokenizer())
    for batch, _ in zip(loader, range(10)):
        ids, cu = batch["input_ids"][0], batch["cu_seq_lens_q"].long()
        counts = count_tokens(batch, pad_token_id=PAD)
        assert ids.shape[0] % 16 == 0 and batch["max_length_q"] <= 128
        labels = batch["labels"][0]
        original = torch.where(labels != IGNORE_INDEX, labels, ids)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            segment = original[start:end]
            if segment[0] != PAD:  # the padding segment, if any, is all <pad>
                assert segment[0] == BOS and segment[-1] == EOS
                assert not torch.isin(segment[1:-1], torch.tensor([PAD, BOS, EOS])).any()
            assert torch.equal(batch["position_ids"][0, start:end], torch.arange(end - start))  # restart per sequence
        assert 0.08 < counts["num_label_tokens"] / counts["num_real_tokens"] < 0.2
    stats = get_policy_stats(loader)
    assert stats["records_mapped"] >= 1 and stats["residues_mapped"] >= 2 and stats["uppercased"] >= 1
    assert stats["cropped"] > 0  # records longer than 126 residues: one random window each


def test_loader_refuses_a_tokenizer_of_another_kind():
    with pytest.raises(ValueError, match=r"data\.tokenizer='amplify' but the tokenizer given has no <bos> token"):
        build_dataloader(DataConfig(tokenizer="amplify"), protein_tokenizer())
    with pytest.raises(ValueError, match=r"data\.tokenizer='amplify' but the tokenizer given has no token for"):
        build_dataloader(DataConfig(tokenizer="amplify"), nucleotide_tokenizer())
    with pytest.raises(ValueError, match=r"data\.tokenizer='protein' but the tokenizer given has no <cls> token"):
        build_dataloader(DataConfig(tokenizer="protein"), amplify_tokenizer())
