"""CheckpointManager: exact round trip of model/optimizer/extra (JSON) state, crash safety, pruning, async save."""

from __future__ import annotations

import shutil

import pytest
import torch

from bioscale.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointManager,
    JsonState,
    ModelOptimizerState,
    get_rng_state,
    list_checkpoints,
    set_rng_state,
)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _train_step(model, optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(5, 4, generator=gen)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _state(model, optimizer, box):
    return {
        "model_optim": ModelOptimizerState(model, optimizer),
        "trainer": JsonState("trainer", get=lambda: dict(box), set=lambda s: box.update(s)),
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_restores_model_optimizer_and_extra_state(tmp_path, async_save):
    model, optimizer = _model_and_optimizer(0)
    _train_step(model, optimizer, 1)
    box = {"step": 3, "nested": [1, None, {"a": 2.5}]}
    manager = CheckpointManager(tmp_path, rank=0, async_save=async_save)
    manager.save(3, _state(model, optimizer, box))
    manager.close()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]

    model2, optimizer2 = _model_and_optimizer(1)  # different weights, empty optimizer state
    box2: dict = {}
    _, path = manager.latest()
    manager.load(path, _state(model2, optimizer2, box2))
    assert box2 == box
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The optimizer moments came back too: the next step is identical.
    _train_step(model, optimizer, 2)
    _train_step(model2, optimizer2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_incomplete_and_temporary_checkpoints_are_never_picked(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, rank=0, keep_last_n=5)
    manager.save(1, _state(model, optimizer, {}))
    manager.save(2, _state(model, optimizer, {}))
    # A save that crashed before its marker: same files as a real one but no COMPLETE.
    shutil.copytree(tmp_path / "step_2", tmp_path / "step_3")
    (tmp_path / "step_3" / COMPLETE_MARKER).unlink()
    # A save truncated mid-write: marker present (copied) but DCP's metadata missing.
    shutil.copytree(tmp_path / "step_2", tmp_path / "step_4")
    (tmp_path / "step_4" / ".metadata").unlink()
    # A save still in its temporary folder (named for the run that writes it), and another run's.
    shutil.copytree(tmp_path / "step_2", tmp_path / f".tmp_step_5.{manager.run_id}")
    shutil.copytree(tmp_path / "step_2", tmp_path / ".tmp_step_5.otherrun")
    assert manager.latest()[0] == 2
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.load(tmp_path / "step_3", _state(model, optimizer, {}))
    # The same run restarted clears its own stale temporary folder, and only its own.
    CheckpointManager(tmp_path, rank=0, run_id=manager.run_id).remove_stale_tmp()
    assert not (tmp_path / f".tmp_step_5.{manager.run_id}").exists()
    assert (tmp_path / ".tmp_step_5.otherrun").is_dir()


def test_keep_last_n_prunes_oldest(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, rank=0, keep_last_n=2)
    for step in (10, 20, 30):
        manager.save(step, _state(model, optimizer, {}))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [20, 30]


def test_rng_state_round_trip():
    state = get_rng_state()
    expected = (torch.rand(3), torch.randint(0, 100, (2,)))
    torch.rand(10)
    set_rng_state(state)
    torch.testing.assert_close((torch.rand(3), torch.randint(0, 100, (2,))), expected, rtol=0, atol=0)
