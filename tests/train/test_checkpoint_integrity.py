"""Loading a checkpoint never runs code from it, even from one whose manifest was rewritten to match (issue 25).

Each crafted entry is a pickle whose ``__reduce__`` calls ``open(marker, "w")``: had anything unpickled it the way
torch's defaults do (``pickle.load`` for DCP's ``.metadata``, ``torch.load(weights_only=False)`` for DCP's non-tensor
entries) or bioscale once did (``pickle.loads`` of its trainer state), the marker file would exist. The loads must
fail with a ``CheckpointError`` that names the checkpoint folder, and the marker must not exist.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from bioscale.train.checkpoint import (
    COMPLETE_MARKER,
    DCP_METADATA,
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    JsonState,
    ModelOptimizerState,
    sha256_file,
)


class _CreatesMarker:
    """Unpickling this calls ``open(path, "w")``, which creates the file: proof that code from the file ran."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(model, optimizer, box):
    return {
        "model_optim": ModelOptimizerState(model, optimizer),
        "trainer": JsonState("trainer", get=lambda: dict(box), set=lambda s: box.update(s)),
    }


def _reseal(folder) -> None:
    """Rewrite the manifest and the marker to match the folder's files, as someone who crafted the folder would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in manifest["files"]
    }
    raw = json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(raw)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    marker["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("where", ["json_state_file", "dcp_non_tensor_entry"])
def test_crafted_pickle_in_trainer_state_runs_nothing(tmp_path, monkeypatch, where):
    marker = tmp_path / "code_ran"
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path / "ckpt", rank=0)
    if where == "dcp_non_tensor_entry":
        # The optimizer's param groups are DCP's non-tensor entries: write a checkpoint whose "lr" is the payload,
        # through the manager itself, so the manifest matches it.
        real = ModelOptimizerState.state_dict

        def crafted(self):
            state = real(self)
            state["optim"]["param_groups"][0]["lr"] = _CreatesMarker(marker)
            return state

        monkeypatch.setattr(ModelOptimizerState, "state_dict", crafted)
        manager.save(1, _state(model, optimizer, {"step": 1}))
        monkeypatch.undo()
    else:
        manager.save(1, _state(model, optimizer, {"step": 1}))
        (tmp_path / "ckpt" / "step_1" / "trainer.json").write_bytes(pickle.dumps(_CreatesMarker(marker)))
        _reseal(tmp_path / "ckpt" / "step_1")
    folder = tmp_path / "ckpt" / "step_1"
    box: dict = {}
    with pytest.raises(CheckpointError, match=str(folder)):
        manager.load(folder, _state(*_model_and_optimizer(), box))
    assert not marker.exists()
    assert box == {}


@pytest.mark.parametrize("manifest", ["rewritten_to_match", "left_as_written"])
def test_crafted_dcp_metadata_runs_nothing(tmp_path, manifest):
    marker = tmp_path / "code_ran"
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path / "ckpt", rank=0)
    manager.save(1, _state(model, optimizer, {"step": 1}))
    folder = tmp_path / "ckpt" / "step_1"
    (folder / DCP_METADATA).write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=4))
    if manifest == "rewritten_to_match":
        _reseal(folder)
        expected = r"not DCP metadata \(global [a-z_.]*open is not part of DCP metadata: refused\)"
    else:
        expected = r"failed verification: .metadata: .*(truncated|SHA-256)"
    with pytest.raises(CheckpointError, match=expected) as caught:
        manager.load(folder, _state(*_model_and_optimizer(), {}))
    assert str(folder) in str(caught.value)
    assert not marker.exists()


def test_json_state_round_trips_tuples_arrays_and_tensors(tmp_path):
    """What the RNG states hold (tuples, NumPy arrays, a uint8 tensor) comes back equal and of the same types."""
    import numpy as np

    from bioscale.train.checkpoint import get_rng_state, set_rng_state

    model, optimizer = _model_and_optimizer()
    rng_box: dict = {}
    state = {
        "model_optim": ModelOptimizerState(model, optimizer),
        "rng": JsonState("rng", get=get_rng_state, set=lambda s: rng_box.update(s), per_rank=True),
    }
    manager = CheckpointManager(tmp_path, rank=0)
    manager.save(1, state)
    expected = (torch.rand(3), np.random.rand(2))
    manager.load(tmp_path / "step_1", state)
    set_rng_state(rng_box)
    assert isinstance(rng_box["python"], tuple) and isinstance(rng_box["numpy"][1], np.ndarray)
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(2), expected[1])
    assert (tmp_path / "step_1" / "rng_0.json").is_file()
