"""The stages as Python functions: each alone, chained, with lineage recorded end to end and wrong inputs refused.

One tiny chain (demo corpus → 4 training steps of ESM-2 `debug` → evaluation on a few sequences) is built once per
module and inspected by the tests below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bioscale.eval import masked_lm_perplexity
from bioscale.pipeline import curate, evaluate, read_artifact, trace_lineage, train_stage
from bioscale.pipeline.stages import random_init_like
from bioscale.use.loading import load_model

from .conftest import write_fasta

TRAIN_STEPS = 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    dataset = curate(None, out=root / "data", max_records=200, seed=0)
    model = train_stage(dataset.path, out=root / "model", seed=0, overrides=[f"num_train_steps={TRAIN_STEPS}",
                                                                             "logging.log_every_n_steps=1"])
    from bioscale.pipeline.stages import PORTER6_FILENAME, find_shared_file

    ss = find_shared_file(PORTER6_FILENAME)
    evaluation = evaluate(model, out=root / "eval", seed=0, max_sequences=8, ss_max_proteins=16, probe_max_iter=10,
                          secondary_structure=ss if ss is not None else False)
    return {"root": root, "data": dataset, "model": model, "eval": evaluation, "ss": ss}


def test_model_artifact(chain: dict) -> None:
    model = read_artifact(chain["model"].path, "model", verify=True)
    assert model.modality == "protein" and model.scale == "tiny" and model.seed == 0
    assert model.metrics["final_step"] == TRAIN_STEPS
    assert model.config["recipe"] == "L0_sanity"
    assert f"data.source={chain['data'].file('train')}" in model.config["overrides"]
    assert [(e.kind, e.id) for e in model.lineage] == [("dataset", chain["data"].metadata.id)]
    rows = [json.loads(line) for line in chain["model"].file("metrics").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, TRAIN_STEPS + 1))
    loaded = load_model(chain["model"].file("model"), task="masked_lm")
    assert loaded.model.config.model_type == "bioscale_esm2"


def test_evaluation_artifact(chain: dict) -> None:
    evaluation = read_artifact(chain["eval"].path, "evaluation", verify=True)
    lm = evaluation.metrics["language_model"]
    assert set(lm) == {"trained", "random_init"}
    validation = _validation_sequences(chain["data"].file("validation"))[:8]
    assert lm["trained"]["num_sequences"] == len(validation) == 8
    # The recorded number is reproducible from the exported checkpoint and the same seeded masking.
    loaded = load_model(chain["model"].file("model"), task="masked_lm")
    again = masked_lm_perplexity(loaded.model, validation, loaded.tokenizer, max_length=128, seed=0, progress=False)
    assert lm["trained"]["perplexity"] == pytest.approx(again["perplexity"], rel=1e-5)
    assert 15 < lm["random_init"]["perplexity"] < 60  # near-uniform over 33 tokens
    for role in ("report_md", "report_html", "training_curves", "metrics"):
        assert chain["eval"].file(role).is_file()
    report = chain["eval"].file("report_md").read_text()
    assert chain["model"].metadata.id in report and chain["data"].metadata.id in report
    if chain["ss"] is not None:
        ss = evaluation.metrics["secondary_structure"]
        assert {"trained", "random_init", "residue_identity", "majority"} <= set(ss)
        assert "Q3" in report
    else:
        assert evaluation.metrics["secondary_structure"] is None


def _validation_sequences(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [s for f in sorted(path.glob("*.parquet")) for s in pq.read_table(f).column("sequence").to_pylist()]


def test_lineage_end_to_end(chain: dict) -> None:
    chain_ = trace_lineage(chain["eval"].path)
    kinds = [entry.kind for entry, _ in chain_]
    assert kinds[:3] == ["model", "dataset", "source"]
    assert chain_[0][0].id == chain["model"].metadata.id and chain_[1][0].id == chain["data"].metadata.id
    assert chain_[2][0].path.endswith(".faa")  # the demo proteome the dataset was curated from
    if chain["ss"] is not None:
        assert any(entry.path.endswith("porter6_secondary_structure_sample.parquet") for entry, _ in chain_)


def test_random_init_is_seeded_and_fresh(chain: dict) -> None:
    loaded = load_model(chain["model"].file("model"), task="masked_lm")
    a, b = random_init_like(loaded.model, seed=3), random_init_like(loaded.model, seed=3)
    c = random_init_like(loaded.model, seed=4)
    name, trained = next(iter(loaded.model.state_dict().items()))
    assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert not torch.equal(a.state_dict()[name], c.state_dict()[name])
    assert not torch.equal(a.state_dict()["esm.layers.0.attention.qkv_proj.weight"],
                           loaded.model.state_dict()["esm.layers.0.attention.qkv_proj.weight"])


def test_evaluate_on_a_fasta_and_a_plain_checkpoint(chain: dict, tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "x.fasta", [("a", "MKTAYIAKQRQISFVKSHFSRQ*"), ("b", "gshmledpv")])
    result = evaluate(chain["model"].file("model"), data=fasta, out=tmp_path / "e", secondary_structure=False,
                      random_baseline=False)
    meta = result.metadata
    assert meta.metrics["num_sequences"] == 2 and meta.metrics["data_policy"]["stop_stripped"] == 1
    assert [e.kind for e in meta.lineage] == ["source", "source"]  # a plain checkpoint dir, then the FASTA
    assert meta.lineage[1].id.startswith("sha256:")
    assert "Secondary-structure probe: disabled." in meta.metrics["notes"]
    with pytest.raises(ValueError, match=r"is not a model artifact, so it has no validation split: pass --data"):
        evaluate(chain["model"].file("model"), out=tmp_path / "e2", secondary_structure=False)


def test_evaluate_on_a_parquet_finds_its_sequence_column(chain: dict, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "porter_like.parquet"  # Porter6 spells the column "Sequence"
    pq.write_table(pa.table({"Sequence": ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPV"], "Secondary_structure": ["", ""]}), table)
    result = evaluate(chain["model"], data=table, out=tmp_path / "e", secondary_structure=False, random_baseline=False)
    assert result.metadata.metrics["num_sequences"] == 2
    assert result.metadata.lineage[-1].path == str(table.resolve())
    with pytest.raises(ValueError, match=r"no column 'sequence'"):
        evaluate(chain["model"], data=table, sequence_column="sequence", out=tmp_path / "e2", secondary_structure=False,
                 random_baseline=False)


def test_wrong_kinds_are_refused(chain: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has field 'kind' = 'model', expected 'dataset'"):
        train_stage(chain["model"].path, out=tmp_path / "m")
    with pytest.raises(ValueError, match=r"has field 'kind' = 'dataset', expected 'model'"):
        evaluate(chain["data"].path, out=tmp_path / "e")
    with pytest.raises(ValueError, match=r"override 'run_dir=/tmp/x': run_dir is set by the train stage"):
        train_stage(chain["data"].path, out=tmp_path / "m2", overrides=["run_dir=/tmp/x"])
    with pytest.raises(ValueError, match=r"has no metadata.json"):
        train_stage(tmp_path, out=tmp_path / "m3")
    assert not (tmp_path / "m").exists()  # nothing created before the input was validated


def test_dna_chain_reports_bits_per_base(tmp_path: Path) -> None:
    dataset = curate(None, out=tmp_path / "data", kind="dna", max_records=40, seed=0)
    assert dataset.metadata.config["source"] == "demo:dna-small"
    model = train_stage(dataset, out=tmp_path / "model", overrides=["num_train_steps=3"])
    assert model.metadata.config["recipe"] == "L0_sanity_llama3"
    result = evaluate(model, out=tmp_path / "eval", max_sequences=3)
    lm = result.metadata.metrics["language_model"]
    assert lm["trained"]["num_tokens"] == 3 * 1000  # three 1 kb chunks, every base scored
    assert lm["trained"]["bits_per_base"] == pytest.approx(lm["trained"]["nll_per_token"] / math.log(2))
    assert 3.8 < lm["random_init"]["bits_per_base"] < 4.8  # near uniform over 20 tokens: log2(20) = 4.32
    assert result.metadata.metrics["secondary_structure"] is None
    assert [e.kind for e, _ in trace_lineage(result.path)] == ["model", "dataset", "source"]


def test_secondary_structure_by_lora_fine_tune(chain: dict, tmp_path: Path, shared_data: Path) -> None:
    pytest.importorskip("peft")
    result = evaluate(chain["model"], out=tmp_path / "e", ss_head="lora", ss_finetune_steps=4, random_baseline=False,
                      max_sequences=8)  # fmt: skip
    ss = result.metadata.metrics["secondary_structure"]
    assert ss["method"] == "lora" and ss["max_steps"] == 4 and set(ss["trained"]) == {"q3", "q8", "loss"}
    assert result.metadata.config["ss_head"] == "lora"
    assert "lora fine-tune of a per-residue head" in (tmp_path / "e" / "report.md").read_text()
    with pytest.raises(ValueError, match="ss_head must be 'probe', 'lora' or 'full'"):
        evaluate(chain["model"], out=tmp_path / "e2", ss_head="linear")
