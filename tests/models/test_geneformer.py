"""Geneformer against its referee, stock ``transformers.BertForMaskedLM``: logits, packing, conversion, loading, the
L0 recipe (CPU). GPU twins (bf16, compiled varlen, FP8) are at the end, skipped without CUDA."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

import bioscale.models as bm
from bioscale.models.geneformer import (
    GeneformerConfig,
    GeneformerForMaskedLM,
    GeneformerForSequenceClassification,
    GeneformerModel,
    config_from_hf,
    config_to_hf,
)
from bioscale.data.singlecell import geneformer_tokenizer
from bioscale.models.geneformer.spec import flops_per_token, matmul_params

PAD, MASK = 0, 1


def tiny_bert_config(**overrides: object) -> BertConfig:
    """A 2-layer Geneformer-style BERT: ReLU, post-LN, eps 1e-12, tiny vocabulary, no dropout."""
    kwargs: dict[str, object] = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="relu", max_position_embeddings=48, layer_norm_eps=1e-12, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def reference(config: BertConfig | None = None, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    model = BertForMaskedLM(config or tiny_bert_config()).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so every tensor is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def cells(lengths: list[int], vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded cells of genes 2..vocab-1 (some <mask>): ``(input_ids, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, vocab, (n,), generator=g)
        ids[row, 1:n:5] = MASK
        mask[row, :n] = 1
    return ids, mask


def packed(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | int]:
    lengths = mask.sum(-1)
    flat = torch.cat([ids[r, : int(n)] for r, n in enumerate(lengths)])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    longest = int(lengths.max())
    return dict(input_ids=flat[None], position_ids=positions[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=longest, max_length_k=longest)  # fmt: skip


# ---- the function ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "padded_vocab_size"),
    [({}, None), ({"hidden_act": "gelu", "num_attention_heads": 2, "type_vocab_size": 1}, 64),
     ({"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3}, None)],
    ids=["relu", "gelu-padded-vocab", "48x3"],
)  # fmt: skip
def test_padded_logits_and_loss_match_bert(overrides: dict, padded_vocab_size: int | None) -> None:
    hf = reference(tiny_bert_config(**overrides))
    model = bm.from_hf(hf, padded_vocab_size=padded_vocab_size).eval()
    ids, mask = cells([17, 9, 30])
    labels = torch.where(ids == MASK, torch.randint(2, 50, ids.shape), torch.full_like(ids, -100))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert got.logits.shape == expected.logits.shape
    assert (got.logits - expected.logits)[real].abs().max() <= 1e-4
    assert got.loss == pytest.approx(expected.loss.item(), abs=1e-5)
    assert int(got.num_label_tokens) == int((labels != -100).sum())


def test_base_model_equals_bert_encoder() -> None:
    hf = reference()
    model = bm.from_hf(hf).eval()
    ids, mask = cells([12, 20])
    with torch.no_grad():
        expected = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_packed_equals_padded_per_cell_with_positions_restarting() -> None:
    model = bm.from_hf(reference()).eval()
    ids, mask = cells([11, 23, 5])
    with torch.no_grad():
        alone = [model(input_ids=ids[r : r + 1, : int(n)]).logits[0] for r, n in enumerate(mask.sum(-1))]
        batch = packed(ids, mask)
        out = model(**batch).logits[0]
        # without position_ids the model derives them from cu_seq_lens: the same restart at 0 per cell
        derived = model(**{k: v for k, v in batch.items() if k != "position_ids"}).logits[0]
    assert torch.equal(out, derived)
    assert torch.allclose(out, torch.cat(alone), atol=1e-5)
    # positions do restart: cell 2 packed after cell 1 equals cell 2 alone, not cell 2 shifted by 11 positions
    shifted = model(input_ids=ids[1:2, :23], position_ids=torch.arange(11, 34)[None]).logits[0]
    assert not torch.allclose(out[11:34], shifted, atol=1e-3)


def test_no_leakage_between_packed_cells() -> None:
    model = bm.from_hf(reference()).eval()
    ids, mask = cells([10, 14])
    other = ids.clone()
    other[1, :14] = torch.randint(2, 50, (14,))
    with torch.no_grad():
        a = model(**packed(ids, mask)).logits[0]
        b = model(**packed(other, mask)).logits[0]
    assert torch.equal(a[:10], b[:10])  # the first cell never saw the second
    assert not torch.allclose(a[10:], b[10:])


def test_vocabulary_padding_changes_nothing_and_stays_zero() -> None:
    hf = reference()
    plain, padded = bm.from_hf(hf).eval(), bm.from_hf(hf, padded_vocab_size=64).eval()
    ids, mask = cells([9, 16])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           padded(input_ids=ids, attention_mask=mask).logits)  # fmt: skip
    padded.train()
    out = padded(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
    out.loss.backward()
    embedding = padded.bert.embeddings.word_embeddings.weight
    assert embedding.shape[0] == 64 and torch.count_nonzero(embedding[50:]) == 0
    assert torch.count_nonzero(embedding.grad[50:]) == 0


def test_logits_on_labels_only_gives_the_same_loss() -> None:
    model = bm.from_hf(reference()).eval()
    ids, mask = cells([15, 7])
    labels = torch.where(ids == MASK, torch.randint(2, 50, ids.shape), torch.full_like(ids, -100))
    full = model(input_ids=ids, attention_mask=mask, labels=labels)
    only = model(input_ids=ids, attention_mask=mask, labels=labels, logits_on_labels_only=True)
    assert only.logits.shape == (int((labels != -100).sum()), 50)
    assert only.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)


def test_heads_packed_equal_padded() -> None:
    config = GeneformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=48, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, num_labels=3)  # fmt: skip
    ids, mask = cells([8, 13, 6])
    for task in ("base", "token_classification", "sequence_classification"):
        for pooling in ("mean", "cls"):
            config.classifier_pooling = pooling
            torch.manual_seed(0)
            model = bm.build_model(config, task=task, device="cpu").eval()
            with torch.no_grad():
                padded_out = model(input_ids=ids, attention_mask=mask)
                packed_out = model(**packed(ids, mask))
            if task == "sequence_classification":
                assert torch.allclose(padded_out.logits, packed_out.logits, atol=1e-5), pooling
                continue
            field = "last_hidden_state" if task == "base" else "logits"
            assert torch.allclose(getattr(padded_out, field)[mask.bool()], getattr(packed_out, field)[0], atol=1e-5)


def test_sequence_head_pools_as_configured() -> None:
    config = GeneformerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=48, num_labels=2,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = GeneformerForSequenceClassification(config).eval()
    ids, mask = cells([9, 12])
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        mean = (hidden * weights).sum(1) / weights.sum(1)
        expected_mean = model.classifier(model.pooler(mean))
        expected_cls = model.classifier(model.pooler(hidden[:, 0]))
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected_mean, atol=1e-6)
        model.config.classifier_pooling = "cls"
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected_cls, atol=1e-6)


def test_blocks_compile_fullgraph_and_match_eager() -> None:
    model = bm.from_hf(reference()).eval()
    ids, mask = cells([11, 23, 5])
    with torch.no_grad():
        eager_packed, eager_padded = model(**packed(ids, mask)).logits, model(input_ids=ids, attention_mask=mask).logits
        for block in model.layers:
            block.compile(backend="aot_eager", fullgraph=True)  # no graph break, no host sync inside a block
        compiled_packed = model(**packed(ids, mask)).logits
        compiled_padded = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled_packed, eager_packed, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled_padded[mask.bool()], eager_padded[mask.bool()], atol=1e-5, rtol=0)


def test_fp8_per_layer_converts_the_chosen_blocks_and_keeps_the_head_in_high_precision() -> None:
    pytest.importorskip("torchao.float8")
    from bioscale.precision import apply_fp8, fp8_layer_names

    config = bm.build_config("geneformer", "debug", vocab_size=64, num_hidden_layers=3)
    model = bm.build_model(config)
    apply_fp8(model, recipe="tensorwise", layers=[2, 3], emulate=True)  # 1-indexed blocks: the first stays bf16/fp32
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    names = fp8_layer_names(model)
    assert sorted(names) == sorted(f"bert.layers.{i}.{n}" for i in (1, 2)
                                   for n in ("attention.qkv_proj", "attention.out_proj", "mlp.up_proj",
                                             "mlp.down_proj")), names  # fmt: skip
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear and type(model.lm_head.dense) is torch.nn.Linear
    ids, mask = cells([16, 16], vocab=64)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.where(ids == MASK, 5, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.layers[2].attention.qkv_proj.weight.grad is not None
    # The converted model still exports as a stock BERT with the same parameter names.
    assert isinstance(bm.to_hf(model), BertForMaskedLM)


# ---- conversion and loading -----------------------------------------------------------------------------------------


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertForTokenClassification, BertForSequenceClassification])
def test_round_trip_bert_bioscale_bert_is_tensor_identical(cls: type) -> None:
    torch.manual_seed(0)
    hf = cls(tiny_bert_config(num_labels=3)).eval()
    model = bm.from_hf(hf)
    back = bm.to_hf(model)
    assert type(back) is cls
    _assert_same_state(hf, back)
    again = bm.from_hf(back)
    _assert_same_state(model, again)
    if cls is BertForSequenceClassification:
        assert model.config.classifier_pooling == "cls"
        ids, mask = cells([7, 11])
        with torch.no_grad():
            assert torch.allclose(hf(input_ids=ids, attention_mask=mask).logits,
                                  model.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-5)  # fmt: skip


def test_bert_model_round_trip_and_pooler_warning() -> None:
    torch.manual_seed(0)
    bare = BertModel(tiny_bert_config(), add_pooling_layer=False)
    _assert_same_state(bare, bm.to_hf(bm.from_hf(bare)))
    with pytest.warns(UserWarning, match="pooler is dropped"):
        bm.from_hf(BertModel(tiny_bert_config()))


def test_tied_decoder_stays_tied_through_save_load_and_export(tmp_path: Path) -> None:
    model = bm.from_hf(reference())
    model.save_pretrained(tmp_path / "bioscale")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "bioscale")
    assert isinstance(loaded, GeneformerForMaskedLM)
    _assert_same_state(model, loaded)
    # The decoder is the embedding matrix itself: changing one changes the logits through both uses.
    ids, mask = cells([6])
    before = loaded(input_ids=ids).logits.detach()
    with torch.no_grad():
        loaded.bert.embeddings.word_embeddings.weight[7] += 1.0
    assert not torch.allclose(loaded(input_ids=ids).logits[..., 7], before[..., 7])
    # The stock export keeps BERT's tie, in this interpreter and after its own save / load.
    hf = bm.to_hf(model)
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    hf.save_pretrained(tmp_path / "hf")
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "hf")
    assert reloaded.cls.predictions.decoder.weight.data_ptr() == reloaded.bert.embeddings.word_embeddings.weight.data_ptr()
    _assert_same_state(hf, reloaded)
    with pytest.raises(ValueError, match="not tied"):
        untied = reference(tiny_bert_config(tie_word_embeddings=False))
        with torch.no_grad():
            untied.cls.predictions.decoder.weight.add_(1.0)
        bm.from_hf(untied)


def test_export_loads_with_stock_transformers_and_no_bioscale(tmp_path: Path) -> None:
    model = bm.from_hf(reference()).eval()
    bm.to_hf(model).save_pretrained(tmp_path)
    ids, _ = cells([9])
    expected = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected.detach()}, tmp_path / "probe.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForMaskedLM; "
        "assert 'bioscale' not in sys.modules; "
        f"m = AutoModelForMaskedLM.from_pretrained({str(tmp_path)!r}).eval(); "
        f"p = torch.load({str(tmp_path / 'probe.pt')!r}); "
        "d = (m(input_ids=p['ids']).logits - p['logits']).abs().max().item(); "
        "print(type(m).__name__, d); assert d < 1e-4 and 'bioscale' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("BertForMaskedLM")


def test_load_model_converts_a_stock_bert_directory(tmp_path: Path) -> None:
    from bioscale.use import load_model

    hf = reference()
    hf.save_pretrained(tmp_path)
    # A tokenizer saved beside it (as bioscale's exports have): load_model uses it, not the shared vocabulary.
    vocab_file = tmp_path / "genes.txt"
    vocab_file.write_text("\n".join(["<pad>", "<mask>"] + [f"ENSG{i:011d}" for i in range(48)]) + "\n")
    geneformer_tokenizer(vocab_file).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, task="masked_lm")
    assert isinstance(loaded.model, GeneformerForMaskedLM) and loaded.family == "geneformer"
    assert len(loaded.tokenizer) == 50
    _assert_same_state(bm.from_hf(hf), loaded.model)
    base = load_model(tmp_path, task="base").model
    assert isinstance(base, GeneformerModel)
    head = load_model(tmp_path, task="sequence_classification", config_overrides={"num_labels": 4}).model
    assert head.config.classifier_pooling == "mean" and head.classifier.out_features == 4
    _assert_same_state(bm.from_hf(hf).bert, head.bert)


def test_meta_build_then_init_is_complete_and_idempotent() -> None:
    config = bm.build_config("geneformer", "debug", vocab_size=40, padded_vocab_size=48)
    model = bm.build_model(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, first[key]), key
    embeddings = model.bert.embeddings
    assert torch.count_nonzero(embeddings.word_embeddings.weight[PAD]) == 0  # padding_idx row, as BERT's init
    assert torch.count_nonzero(embeddings.word_embeddings.weight[40:]) == 0  # vocabulary padding
    # Only the word embedding has vocabulary rows: every learned position is drawn, also past the 40 tokens.
    assert bool((embeddings.position_embeddings.weight.abs().sum(-1) > 0).all())
    assert torch.equal(model.lm_head.bias, torch.zeros(48))
    std = model.layers[0].attention.qkv_proj.weight.std().item()
    assert 0.015 < std < 0.025  # normal(0.02)


# Parameter counts against BertForMaskedLM of the same shape (its tied decoder counted once; its decoder bias is the
# tied cls.predictions.bias); the name is the published rounded count. The reference recipe's "4b" shape (36 x 2560,
# FFN 10240, as the issue and bionemo's config state it) holds 2.91B parameters: the name is the recipe's, not a count.
@pytest.mark.parametrize(("size", "named"), [("V1_10M", 10e6), ("V2_104M", 104e6), ("V2_316M", 316e6), ("106M", 106e6),
                                             ("4B", 2.91e9)])  # fmt: skip
def test_sizes_have_the_published_parameter_count(size: str, named: float) -> None:
    config = bm.build_config("geneformer", size)
    model = bm.build_model(config)
    with torch.device("meta"):
        stock = BertForMaskedLM(config_to_hf(config))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in stock.parameters())
    assert abs(count - named) / named < 0.08, count


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    config = bm.build_config("geneformer", "V2_104M")
    hidden, layers = 768, 12
    assert matmul_params(config) == layers * (4 * hidden**2 + 2 * hidden * 3072) + hidden**2 + 20275 * hidden
    assert flops_per_token(config, 2048) == 6 * matmul_params(config) + 12 * layers * hidden * 2048
    assert bm.get_model_spec("geneformer").flops_per_token is flops_per_token


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("is_decoder", True, "is_decoder"), ("add_cross_attention", True, "add_cross_attention"),
     ("hidden_act", "gelu_new", "hidden_act"), ("position_embedding_type", "relative_key", "position_embedding_type")],
)  # fmt: skip
def test_bert_variants_geneformer_does_not_use_are_refused_by_name(field: str, value: object, message: str) -> None:
    config = tiny_bert_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config_from_hf(config)


def test_bad_forward_inputs_raise() -> None:
    model = bm.from_hf(reference()).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.randint(2, 50, (1, 49)))
    with pytest.raises(ValueError, match="vocab_size"):
        model(input_ids=torch.tensor([[2, 50]]))
    with pytest.raises(ValueError, match="token-type"):
        model(input_ids=torch.tensor([[2, 3]]), token_type_ids=torch.tensor([[0, 1]]))
    zeros = model(input_ids=torch.tensor([[2, 3]]), token_type_ids=torch.zeros(1, 2, dtype=torch.long)).logits
    assert torch.equal(zeros, model(input_ids=torch.tensor([[2, 3]])).logits)  # BERT adds row 0 either way
    with pytest.raises(ValueError, match="hidden_act"):
        GeneformerConfig(hidden_act="swish")
    model.train()
    ids, mask = cells([8, 8])
    with pytest.raises(ValueError, match="attention dropout"):  # packed training needs attention dropout 0
        bm.from_hf(reference(tiny_bert_config(attention_probs_dropout_prob=0.1))).train()(**packed(ids, mask))


# ---- the L0 recipe --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # 60 steps of the recipe on 128-gene cells: ~20-60 s on 2 shared CPU cores
def test_l0_sanity_geneformer_loss_falls_below_chance(tmp_path: Path, shared_data: Path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    if not (shared_data / "genecorpus_500_samples.parquet").is_file():
        pytest.skip("genecorpus_500_samples.parquet not in the shared data folder")
    cfg = load_config("L0_sanity_geneformer", [
        "device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_n_steps=1",
        "checkpoint.save_every_n_steps=0", "checkpoint.save_final_model=true", f"run_dir={tmp_path / 'run'}",
        "num_train_steps=60", "data.max_seq_length=128",
    ])  # fmt: skip
    summary = train(cfg)
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 60 and summary["model"] == "geneformer/debug"
    chance = math.log(25426)  # uniform over the V1 vocabulary: 10.14 nats; the untrained model starts there
    assert losses[0] == pytest.approx(chance, abs=0.1)
    # Measured (fp32, CPU, these overrides): 6.8 at step 40-60; the genes' frequency in the top-128 cells is 6.57
    # nats. 7.5 is clearly below chance (2.6 nats) and fails a run whose loss did not fall.
    assert sum(losses[-10:]) / 10 < 7.5
    # Every cell (~2,048 genes) was truncated to its top 128 genes, and the loader's counts say so.
    assert summary["data_policy"]["cropped"] == summary["data_policy"]["records_used"] > 0
    final = json.loads((Path(summary["final_model_hf"]) / "config.json").read_text())
    assert final["architectures"] == ["BertForMaskedLM"] and final["hidden_act"] == "relu"


@pytest.mark.parametrize("recipe", ["L1_geneformer_104M", "L1_geneformer_316M"])
def test_l1_recipes_fit_their_data_and_train_packed(recipe: str, shared_data: Path) -> None:
    """The GPU recipes, checked on CPU: the model's vocabulary is the V2 tokenizer's (the corpus's V1 ids + <cls> /
    <eos>), cells fit the learned positions, attention dropout is 0 (packed batches) and the first packed batch is
    <cls> genes <eos> cells within the vocabulary."""
    from bioscale.data import build_dataloader, get_tokenizer
    from bioscale.train.config import load_config

    if not (shared_data / "genecorpus_500_samples.parquet").is_file():
        pytest.skip("genecorpus_500_samples.parquet not in the shared data folder")
    cfg = load_config(recipe, ["data.num_workers=0", "data.max_tokens_per_batch=4096", "data.pin_memory=false"])
    config = bm.build_config(cfg.model.name, cfg.model.size, **cfg.model.overrides)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    assert config.vocab_size == len(tokenizer) == 25428 and config.max_position_embeddings == 4096
    assert config.attention_probs_dropout_prob == 0.0 and config.hidden_dropout_prob == 0.02
    assert cfg.data.use_sequence_packing and cfg.data.max_seq_length <= config.max_position_embeddings
    batch = next(iter(build_dataloader(cfg.data, tokenizer)))
    ids, cu = batch["input_ids"][0], batch["cu_seq_lens_q"]
    starts = cu[:-1][cu[:-1] < cu[-1]].long()
    assert int(ids.max()) < config.vocab_size and bool((ids[starts] == tokenizer.cls_token_id).all())
    assert int(batch["max_length_q"]) <= cfg.data.max_seq_length


# ---- GPU twins (run on a CUDA machine) ------------------------------------------------------------------------------


def _gpu_model(**overrides: object) -> GeneformerForMaskedLM:
    torch.manual_seed(0)
    config = bm.build_config("geneformer", "debug", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             **overrides)  # fmt: skip
    return bm.build_model(config, device="cuda").eval()


@pytest.mark.gpu
def test_gpu_bf16_autocast_tracks_fp32() -> None:
    model = _gpu_model()
    ids, mask = cells([200, 150, 256], vocab=25426)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        fp32 = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    # bf16 has 8 mantissa bits: logits of a 2-layer model agree to a few 1e-2 (relative to their spread)
    assert ((bf16 - fp32)[real].abs().max() / fp32[real].std()).item() < 0.05
    assert (bf16[real].argmax(-1) == fp32[real].argmax(-1)).float().mean() > 0.9


@pytest.mark.gpu
def test_gpu_packed_compiled_varlen_equals_eager_padded() -> None:
    model = _gpu_model(attn_backend="varlen")
    ids, mask = cells([300, 77, 512, 129], vocab=25426)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed(ids, mask).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float()[mask.cuda().bool()]
        for block in model.layers:
            block.compile(fullgraph=True)
        compiled = model(**batch).logits.float()[0]
    # the same bf16 math through two kernels (flash varlen vs SDPA): differences at bf16 rounding
    assert ((compiled - eager).abs().max() / eager.std()).item() < 0.05


@pytest.mark.gpu
def test_gpu_fp8_training_steps_track_bf16() -> None:
    pytest.importorskip("torchao")
    from bioscale.precision import apply_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    ids, mask = cells([256] * 8, vocab=25426)
    labels = torch.where(ids == MASK, torch.randint(2, 25426, ids.shape), torch.full_like(ids, -100))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed(ids, mask).items()}
    batch["labels"] = labels[mask.bool()][None].cuda()
    losses = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        config = bm.build_config("geneformer", "V1_10M", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attn_backend="varlen")  # fmt: skip
        model = bm.build_model(config, device="meta")
        if fp8:
            apply_fp8(model, recipe="tensorwise")
        model.to_empty(device="cuda")
        torch.manual_seed(0)
        model.init_weights()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        losses[fp8] = curve
    assert all(math.isfinite(x) for x in losses[True])
    assert losses[True][-1] < losses[True][0]
    assert abs(losses[True][-1] - losses[False][-1]) / losses[False][-1] < 0.05
