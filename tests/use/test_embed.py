"""Embeddings: batching invariance (alone == packed == padded), the ``transformers`` reference, the long-sequence
policies, output files, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bioscale.use import embed, load_model, read_embeddings, write_embeddings
from bioscale.use.cli import embed_main
from bioscale.use.embed import window_starts

from .conftest import PROTEINS, write_fasta

ATOL = 2e-5  # float32 on CPU; packed (block-diagonal mask) and padded kernels sum in different orders


def _embed(model, sequences, **kwargs):
    return embed(model, sequences, progress=False, device="cpu", dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_alone_equals_packed_and_padded_batches(esm_dir: Path, pooling: str) -> None:
    model = load_model(esm_dir, task="base").model
    packed = _embed(model, PROTEINS, pooling=pooling, per_residue=True, batching="packed")
    padded = _embed(model, PROTEINS, pooling=pooling, per_residue=True, batching="padded")
    # All four sequences share one batch in both layouts (the budget holds them all).
    for name, sequence in PROTEINS.items():
        alone = _embed(model, {name: sequence}, pooling=pooling, per_residue=True, batching="padded")
        i = packed.ids.index(name)
        np.testing.assert_allclose(packed.pooled[i], alone.pooled[0], atol=ATOL)
        np.testing.assert_allclose(padded.pooled[i], alone.pooled[0], atol=ATOL)
        np.testing.assert_allclose(packed.per_residue[i], alone.per_residue[0], atol=ATOL)
        np.testing.assert_allclose(padded.per_residue[i], alone.per_residue[0], atol=ATOL)
        assert packed.per_residue[i].shape == (len(sequence), model.config.hidden_size)


def test_matches_transformers_esm_reference(esm_dir: Path, esm_hf_dir: Path) -> None:
    """Mean pooling over residues (no <cls>/<eos>) of stock ``EsmModel`` hidden states, float64 reference."""
    from transformers import EsmModel

    reference_model = EsmModel.from_pretrained(esm_hf_dir, add_pooling_layer=False).double().eval()
    ours = _embed(esm_dir, PROTEINS, per_residue=True)
    from_hf_checkpoint = _embed(esm_hf_dir, PROTEINS, per_residue=True)  # converted through from_hf on load
    tokenizer = load_model(esm_dir).tokenizer
    for i, sequence in enumerate(PROTEINS.values()):
        ids = torch.tensor([tokenizer(sequence)["input_ids"]])
        with torch.no_grad():
            hidden = reference_model(input_ids=ids).last_hidden_state[0, 1:-1]
        np.testing.assert_allclose(ours.per_residue[i], hidden.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours.pooled[i], hidden.mean(0).numpy(), atol=1e-4)
        np.testing.assert_allclose(from_hf_checkpoint.pooled[i], ours.pooled[i], atol=1e-5)


def test_window_policy_averages_overlapping_windows(esm_dir: Path) -> None:
    model = load_model(esm_dir, task="base").model
    sequence = PROTEINS["hbb"]  # 107 residues; a 40-token context holds 38
    result = _embed(model, [sequence], per_residue=True, max_length=40, window_overlap=10)
    assert result.num_windowed == 1 and result.lengths[0] == len(sequence)
    starts = window_starts(len(sequence), 38, 10)
    assert starts[0] == 0 and starts[-1] == len(sequence) - 38
    total = np.zeros((len(sequence), model.config.hidden_size))
    coverage = np.zeros(len(sequence))
    for start in starts:
        piece = _embed(model, [sequence[start : start + 38]], per_residue=True, max_length=40)
        total[start : start + 38] += piece.per_residue[0]
        coverage[start : start + 38] += 1
    expected = total / coverage[:, None]
    np.testing.assert_allclose(result.per_residue[0], expected, atol=ATOL)
    np.testing.assert_allclose(result.pooled[0], expected.mean(0), atol=ATOL)


def test_truncate_warns_and_error_names_the_sequence(esm_dir: Path) -> None:
    with pytest.warns(UserWarning, match="1 of 2 sequences .* truncated"):
        result = _embed(esm_dir, {"long": PROTEINS["hbb"], "short": "MKV"}, max_length=22, long_sequences="truncate")
    assert result.num_truncated == 1 and list(result.lengths) == [20, 3]
    with pytest.raises(ValueError, match=f"sequence 'long' has {len(PROTEINS['hbb'])} residues"):
        _embed(esm_dir, {"long": PROTEINS["hbb"]}, max_length=22, long_sequences="error")


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_write_read_round_trip(esm_dir: Path, tmp_path: Path, suffix: str) -> None:
    result = _embed(esm_dir, PROTEINS, per_residue=True)
    write_embeddings(result, tmp_path / f"out{suffix}")
    back = read_embeddings(tmp_path / f"out{suffix}")
    assert back.ids == list(PROTEINS)
    np.testing.assert_array_equal(back.pooled, result.pooled)
    for a, b in zip(back.per_residue, result.per_residue):
        np.testing.assert_array_equal(a, b)


def test_cli_fasta_to_parquet(esm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fasta = write_fasta(tmp_path / "in.fasta", PROTEINS)
    out = tmp_path / "emb.parquet"
    assert embed_main([str(esm_dir), str(fasta), "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
    back = read_embeddings(out)
    expected = _embed(esm_dir, PROTEINS)
    assert back.ids == list(PROTEINS) and back.pooling == "mean"
    np.testing.assert_allclose(back.pooled, expected.pooled, atol=1e-6)
    assert "embedded 4 sequences" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(esm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    with pytest.raises(ValueError, match="no sequences found in .*empty.fasta"):
        _embed(esm_dir, empty)
    assert embed_main([str(esm_dir), str(empty), "-o", str(tmp_path / "x.npy"), "--device", "cpu"]) == 2
    assert "bioscale embed: error: no sequences found" in capsys.readouterr().err

    with pytest.raises(ValueError, match="model path '.*missing_model' does not exist"):
        _embed(tmp_path / "missing_model", ["MKV"])
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        _embed(tmp_path / "not_a_model", ["MKV"])
    assert embed_main([str(tmp_path / "missing_model"), str(empty), "-o", str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model path 'no_such_model' does not exist"):  # a bare name is no Hub id
        _embed("no_such_model", ["MKV"])


def test_model_argument_may_be_a_run_or_a_model_artifact(esm_dir: Path, tmp_path: Path) -> None:
    """What `bioscale train` leaves behind: a checkpoint directory with final_model/, or a model artifact."""
    import json
    import shutil

    shutil.copytree(esm_dir, tmp_path / "ckpt" / "final_model")
    shutil.copytree(esm_dir, tmp_path / "artifact" / "run" / "checkpoints" / "final_model")
    (tmp_path / "artifact" / "metadata.json").write_text(
        json.dumps({"kind": "model", "paths": {"model": "run/checkpoints/final_model"}})
    )
    reference = _embed(esm_dir, PROTEINS).pooled
    for wrapper in ("ckpt", "artifact"):
        np.testing.assert_array_equal(_embed(tmp_path / wrapper, PROTEINS).pooled, reference)
    (tmp_path / "artifact" / "metadata.json").write_text(json.dumps({"kind": "dataset", "paths": {}}))
    with pytest.raises(ValueError, match="has no config.json"):
        _embed(tmp_path / "artifact", ["MKV"])

    with pytest.raises(ValueError, match="sequence 'b' in .* is empty"):
        _embed(esm_dir, {"a": "MKV", "b": "  "})
    with pytest.raises(ValueError, match="input file .* does not exist"):
        _embed(esm_dir, tmp_path / "nope.fasta")


def test_causal_model_embeds_with_mean_pooling_only(llama_dir: Path) -> None:
    result = _embed(llama_dir, {"dna": "ACGTACGTNN"}, per_residue=True)
    assert result.pooled.shape == (1, 64) and result.per_residue[0].shape == (10, 64)
    with pytest.raises(ValueError, match="pooling='cls' needs a bidirectional encoder"):
        _embed(llama_dir, ["ACGT"], pooling="cls")
