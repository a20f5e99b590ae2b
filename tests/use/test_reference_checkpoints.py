"""Checkpoint interchange with the reference's genomic Llama 3 models: the byte-level tokenizer's ids equal the
reference table; a stock ``LlamaForCausalLM`` checkpoint trained with it (vocab 256, ``<EOS>`` 0 / ``<PAD>`` 1 /
``<BOS>`` 2) loads, with its saved tokenizer or without one, and generates what ``transformers`` generates; no
prompt ever ends with ``<eos>``, also on the stock path (``save_pretrained`` -> ``AutoTokenizer`` ->
``model.generate(**tok(prompt))``); Transformer Engine checkpoints are refused rather than loaded as random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bioscale.data.tokenizers import (
    NUCLEOTIDE_SPECIAL_TOKENS,
    NUCLEOTIDE_VOCAB,
    CharTokenEncoder,
    _char_level_tokenizer,
    nucleotide_ascii_tokenizer,
    nucleotide_tokenizer,
    record_affixes,
    tokenizer_kind,
)
from bioscale.use import export_model, generate_dna, load_model
from bioscale.use.loading import default_tokenizer, open_prompt_tokenizer

# The reference's table (bionemo-recipes models/llama3: tests/test_tokenizer.py and create_tokenizer.py).
REFERENCE_IDS = {"<EOS>": 0, "<PAD>": 1, "<BOS>": 2, "<UNK>": 3, "A": 65, "C": 67, "G": 71, "T": 84, "N": 78,
                 "R": 82, "Y": 89, "a": 97, "c": 99, "g": 103, "t": 116, "n": 110}  # fmt: skip


def _reference_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer built the way the reference builds its own (every character its code, ids 0-3 special, a
    post-processor that appends <EOS> to every encoding), as its checkpoints ship it."""
    special = {"<BOS>": 2, "<EOS>": 0, "<PAD>": 1, "<UNK>": 3}
    vocab = {**{chr(i): i for i in range(256) if i not in special.values()}, **special}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<BOS> $A <EOS>", pair="<BOS> $A <EOS> <BOS> $B <EOS>", special_tokens=[("<BOS>", 2), ("<EOS>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<UNK>", pad_token="<PAD>", eos_token="<EOS>",
                                   bos_token="<BOS>")  # fmt: skip


def test_ids_equal_the_reference_table() -> None:
    ours, reference = nucleotide_ascii_tokenizer(), _reference_style_tokenizer()
    vocab = ours.get_vocab()
    assert {t: vocab[t] for t in REFERENCE_IDS} == REFERENCE_IDS
    assert vocab == reference.get_vocab() and len(ours) == 256
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    text = "".join(chr(i) for i in range(4, 256)) + "\u20ac\x00"  # every character, one above U+00FF, a reserved id
    assert ours(text, add_special_tokens=False)["input_ids"] == reference(text, add_special_tokens=False)["input_ids"]
    assert ours("AACGTacgtNRY")["input_ids"] == [2, 65, 65, 67, 71, 84, 97, 99, 103, 116, 78, 82, 89]  # no <EOS>
    assert reference("ACGT")["input_ids"] == [2, 65, 67, 71, 84, 0]  # the reference appends <EOS>: a prompt is closed
    assert tokenizer_kind(reference) == tokenizer_kind(ours) == "nucleotide_ascii"
    # The training pipeline puts the same special tokens around a record as the reference's tokenizer did.
    assert record_affixes(ours) == record_affixes(reference) == ([2], [0])
    encoder = CharTokenEncoder(ours)
    for record in ("ACGTacgtNNNN", "gattaca<>@#", "A"):
        assert encoder.encode(record).tolist() == reference(record)["input_ids"]


@pytest.mark.parametrize("make", [nucleotide_ascii_tokenizer, nucleotide_tokenizer])
def test_stock_transformers_prompt_has_no_eos(make, tmp_path: Path) -> None:
    """save_pretrained -> AutoTokenizer -> LlamaForCausalLM.generate(**tok(prompt)): the prompt ends with its last
    base, and generation continues it."""
    make().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    encoded = tok("ACGTT", return_tensors="pt")
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert ids[-1] == tok.convert_tokens_to_ids("T")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    out = LlamaForCausalLM(config).eval().generate(**encoded, max_new_tokens=3, do_sample=False)
    assert out[0, : len(ids)].tolist() == ids and out.shape[1] == len(ids) + 3


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock LlamaForCausalLM over the 256-token byte vocabulary (the reference's special ids), saved with the
    reference's tokenizer, as its export script writes one."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=0, pad_token_id=1,
                         initializer_range=0.2, rope_theta=500000.0)  # fmt: skip
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("reference_llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    _reference_style_tokenizer().save_pretrained(path)
    return path


def test_reference_checkpoint_loads_and_generates_like_transformers(reference_checkpoint: Path) -> None:
    loaded = load_model(reference_checkpoint, task="causal_lm")
    assert type(loaded.model).__name__ == "Llama3ForCausalLM"
    tok = loaded.tokenizer
    assert tokenizer_kind(tok) == "nucleotide_ascii" and tok("ACGT")["input_ids"] == [2, 65, 67, 71, 84]
    prompts = ["ACGTacgtNNAC", "gattaca", "T"]  # soft-masked bases keep their own ids
    kwargs = dict(max_new_tokens=24, device="cpu", dtype=torch.float32)
    ours = generate_dna(loaded.model, prompts, tokenizer=tok, **kwargs)
    stock = LlamaForCausalLM.from_pretrained(reference_checkpoint).eval()
    reference = generate_dna(stock, prompts, tokenizer=tok, **kwargs)
    assert ours.engine == "static" and reference.engine == "transformers"
    assert [s.prompt for s in ours.samples] == prompts
    assert [s.generated for s in ours.samples] == [s.generated for s in reference.samples]
    assert set("".join(s.generated for s in ours.samples)) <= set("ACGTNRYSWKMBDHVacgtnryswkmbdhv")
    # The same continuation from the stock model fed the reference's own encoding minus its <EOS>.
    first = _reference_style_tokenizer()(prompts[0])["input_ids"][:-1]
    with torch.no_grad():
        out = stock.generate(input_ids=torch.tensor([first]), max_new_tokens=1, do_sample=False,
                             suppress_tokens=[i for i in range(256) if chr(i) not in "ACGTNRYSWKMBDHVacgtnryswkmbdhv"
                                              and i != 0])  # fmt: skip
    assert tok.convert_ids_to_tokens(int(out[0, -1])) == ours.samples[0].generated[0]


def test_reference_checkpoint_without_tokenizer_gets_the_byte_tokenizer(reference_checkpoint: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((reference_checkpoint / name).read_bytes())
    loaded = load_model(tmp_path, task="causal_lm")
    assert tokenizer_kind(loaded.tokenizer) == "nucleotide_ascii"
    assert tokenizer_kind(default_tokenizer("llama3", loaded.model.config)) == "nucleotide_ascii"
    assert tokenizer_kind(default_tokenizer("llama3")) == "nucleotide"  # bioscale's compact default otherwise
    result = generate_dna(tmp_path, "ACGT", max_new_tokens=4, device="cpu")
    assert result.samples[0].num_new_tokens >= 1


def test_saved_tokenizers_that_append_eos_are_reopened(tmp_path: Path) -> None:
    reopened = open_prompt_tokenizer(_reference_style_tokenizer())
    assert reopened("ACG")["input_ids"] == [2, 65, 67, 71]
    compact = AutoTokenizer.from_pretrained(_save(nucleotide_tokenizer(), tmp_path / "new"))
    assert open_prompt_tokenizer(compact) is compact  # already open: unchanged
    # A compact tokenizer saved before the DNA tokenizers stopped appending <eos> (its tokenizer.json says so).
    old = _char_level_tokenizer(NUCLEOTIDE_VOCAB, NUCLEOTIDE_SPECIAL_TOKENS, "<bos>", "<eos>", 8192, bos_token="<bos>")
    old = AutoTokenizer.from_pretrained(_save(old, tmp_path / "old"))
    assert old("ACG")["input_ids"] == [0, 5, 6, 7, 2]
    assert open_prompt_tokenizer(old)("ACG")["input_ids"] == [0, 5, 6, 7]
    assert record_affixes(old) == record_affixes(open_prompt_tokenizer(old)) == ([0], [2])  # training: one <eos>


def _save(tok, path: Path) -> Path:
    tok.save_pretrained(path)
    return path


def test_export_of_a_byte_vocabulary_model_serves_open_prompts(reference_checkpoint: Path, tmp_path: Path) -> None:
    out = export_model(reference_checkpoint, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("ACGT")["input_ids"] == [2, 65, 67, 71, 84]


def test_transformer_engine_checkpoints_are_refused(reference_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((reference_checkpoint / "config.json").read_text())
    config["architectures"] = ["NVLlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((reference_checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="Transformer Engine checkpoint.*export_llama3.py"):
        load_model(tmp_path, task="causal_lm")
