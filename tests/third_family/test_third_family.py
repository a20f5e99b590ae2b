"""A third model family, defined only in ``tests/third_family/toyfam`` and registered with one call, goes through
everything a family must support: build, ``save_pretrained`` / ``from_pretrained`` (Auto classes), ``embed``,
fine-tuning and the trainer's L0 path. Nothing outside that folder names it: the registry's spec is the only place
that knows a family."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from toyfam import MODEL_SPEC, ToyForMaskedLM  # noqa: E402
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForTokenClassification  # noqa: E402

from bioscale.data.tokenizers import protein_tokenizer  # noqa: E402
from bioscale.models import build_config, build_model, get_model_spec, list_models, register_model_family  # noqa: E402
from bioscale.use import embed, finetune, load_finetune_config, load_model  # noqa: E402

register_model_family(MODEL_SPEC)  # the one registration

PROTEINS = ["MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF", "MVHLTPEEKSAVTALWGKVNVDEVGG", "MKV"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(build_config("toyfam", "debug"), task="masked_lm", device="cpu").eval()
    path = tmp_path_factory.mktemp("toyfam")
    model.save_pretrained(path)
    protein_tokenizer().save_pretrained(path)
    return path


def test_registered_everywhere() -> None:
    assert "toyfam" in list_models() and get_model_spec("toyfam") is MODEL_SPEC
    assert register_model_family(MODEL_SPEC) is MODEL_SPEC  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_model_family(get_model_spec("esm2"))


def test_build_on_meta_then_init_and_round_trip(toy_dir: Path) -> None:
    model = build_model(build_config("toyfam", "debug"), device="meta")
    assert isinstance(model, ToyForMaskedLM) and next(model.parameters()).device.type == "meta"
    loaded = AutoModelForMaskedLM.from_pretrained(toy_dir).eval()
    assert type(loaded) is ToyForMaskedLM
    reference = ToyForMaskedLM.from_pretrained(toy_dir).eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert type(AutoModel.from_pretrained(toy_dir)).__name__ == "ToyModel"
    head = AutoModelForTokenClassification.from_pretrained(toy_dir, num_labels=3)
    assert type(head).__name__ == "ToyForTokenClassification"


def test_load_model_and_embed_packed_equals_padded(toy_dir: Path) -> None:
    loaded = load_model(toy_dir, task="base")
    assert loaded.family == "toyfam" and type(loaded.model).__name__ == "ToyModel"
    packed = embed(toy_dir, PROTEINS, batching="packed", device="cpu", progress=False)
    padded = embed(toy_dir, PROTEINS, batching="padded", device="cpu", progress=False)
    assert packed.pooled.shape == (3, 32)
    torch.testing.assert_close(torch.as_tensor(packed.pooled), torch.as_tensor(padded.pooled), atol=1e-5, rtol=0)


def test_finetune_a_token_head(toy_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "ss.parquet"
    labels = ["".join("HEC"[i % 3] for i in range(len(p))) for p in PROTEINS * 4]
    pq.write_table(pa.table({"Sequence": PROTEINS * 4, "Secondary_structure": labels}), data)
    config = load_finetune_config(
        "token_classification",
        [f"model={toy_dir}", f"data={data}", f"output_dir={tmp_path / 'out'}", "label_set=dssp3", "max_steps=3",
         "max_length=48", "max_tokens_per_batch=480", "eval_every=1000", "device=cpu", "warmup_steps=1"],
    )  # fmt: skip
    result = finetune(config, progress=False)
    assert type(result.model).__name__ == "ToyForTokenClassification"
    assert torch.isfinite(torch.tensor(float(result.metrics["loss"])))


def test_trainer_l0_path(tmp_path: Path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.train import train

    cfg = load_config("L0_sanity", ["model.name=toyfam", "model.size=debug", "num_train_steps=4", "device=cpu",
                                    "logging.progress_bar=false", "logging.tensorboard=false",
                                    "logging.log_every_n_steps=1", "checkpoint.save_every_n_steps=0",
                                    f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    summary = train(cfg)
    assert summary["final_step"] == 4 and summary["model"] == "toyfam/debug"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["loss"] > 0 for row in rows)
    exported = AutoModelForMaskedLM.from_pretrained(summary["final_model"])
    assert type(exported) is ToyForMaskedLM
    assert summary["final_model_hf"] is None or not Path(summary["final_model_hf"]).exists()
