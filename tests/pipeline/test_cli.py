"""The commands as real processes: one JSON line on stdout, input from stdin, clear errors and exit status 2.

The chain runs ``bioscale data`` → ``train`` → ``eval`` with each stage's stdout fed to the next one's stdin (what a
shell pipe does), checking every stage's stdout on the way. ``train`` goes through the ``bioscale`` dispatcher when it
routes pipeline invocations to :func:`bioscale.pipeline.cli.train_main`, else through ``python -m bioscale.pipeline``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bioscale.cli import SUBCOMMANDS
from bioscale.pipeline import read_artifact, trace_lineage
from bioscale.pipeline.cli import data_main, eval_main, is_pipeline_train, pipeline_main, train_stage_main

from .conftest import run_command, subprocess_env

TRAIN_ROUTED = SUBCOMMANDS["train"][:2] == ("bioscale.pipeline.cli", "train_main")
TRAIN_COMMAND = ["bioscale.cli", "train"] if TRAIN_ROUTED else ["bioscale.pipeline", "train"]


def _one_json_line(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold exactly one line, got: {result.stdout[:2000]!r}"
    return json.loads(lines[0])


def test_data_train_eval_chained_through_stdin(tmp_path: Path) -> None:
    data = run_command(["bioscale.cli", "data", "--scale", "tiny", "--max-records", "150", "--out", "d"], cwd=tmp_path)
    dataset = _one_json_line(data)
    assert dataset["kind"] == "dataset" and Path(dataset["path"]) == tmp_path / "d"
    train = run_command([*TRAIN_COMMAND, "--scale", "tiny", "--out", "m", "num_train_steps=3"], cwd=tmp_path,
                        stdin=data.stdout)
    model = _one_json_line(train)
    assert model["kind"] == "model" and model["lineage"][0]["id"] == dataset["id"]
    assert "training recipe L0_sanity" in train.stderr  # logs go to stderr
    evaluation = _one_json_line(
        run_command(["bioscale.cli", "eval", "--scale", "tiny", "--out", "e", "--max-sequences", "4", "--no-ss"],
                    cwd=tmp_path, stdin=train.stdout)
    )
    assert evaluation["kind"] == "evaluation"
    assert evaluation["metrics"]["language_model"]["trained"]["num_sequences"] == 4
    assert [e.id for e, _ in trace_lineage(evaluation["path"])][:2] == [model["id"], dataset["id"]]
    assert read_artifact(evaluation["path"], "evaluation").id == evaluation["id"]


@pytest.mark.skipif(not TRAIN_ROUTED, reason="the dispatcher does not route `bioscale train` pipelines yet")
def test_shell_pipe(tmp_path: Path) -> None:
    python = sys.executable
    script = (
        "set -euo pipefail; "
        f"{python} -m bioscale.cli data --max-records 100 --out d "
        f"| {python} -m bioscale.cli train --out m num_train_steps=2 "
        f"| {python} -m bioscale.cli eval --out e --max-sequences 2 --no-ss --no-random-baseline"
    )
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=subprocess_env(), timeout=600)
    assert _one_json_line(result)["kind"] == "evaluation"


def test_wrong_kind_on_stdin_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process (the stdin/stdout plumbing is the same function a process runs; the chain above covers processes).
    assert data_main(["--max-records", "30", "--out", str(tmp_path / "d")]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(capsys.readouterr().out))
    assert eval_main(["--out", str(tmp_path / "e")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"artifact {tmp_path / 'd'} has field 'kind' = 'dataset', expected 'model'" in captured.err
    assert not (tmp_path / "e").exists()


def test_empty_stdin_and_missing_input(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert eval_main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "stdin is empty (did the upstream stage fail?)" in captured.err
    assert train_stage_main(["--input", "nowhere"]) == 2
    assert "artifact nowhere does not exist" in capsys.readouterr().err
    assert eval_main(["--scale", "huge"]) == 2  # argparse usage error
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_is_pipeline_train() -> None:
    assert is_pipeline_train(["--input", "x"], stdin_is_tty=True)
    assert is_pipeline_train(["--scale=tiny"], stdin_is_tty=True)
    assert is_pipeline_train([], stdin_is_tty=False)  # `… | bioscale train`
    assert is_pipeline_train(["num_train_steps=5"], stdin_is_tty=False)
    assert not is_pipeline_train(["--config-name", "L0_sanity"], stdin_is_tty=False)  # recipes, even under CI
    assert not is_pipeline_train(["--help"], stdin_is_tty=False)
    assert not is_pipeline_train([], stdin_is_tty=True)



def test_pipeline_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline_main(["--out", str(tmp_path / "p"), "--no-ss", "--seed", "2", "num_train_steps=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    evaluation = json.loads(lines[0])
    assert evaluation["kind"] == "evaluation" and evaluation["seed"] == 2
    assert [e.kind for e, _ in trace_lineage(evaluation["path"])] == ["model", "dataset", "source"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["data", "eval", "model"]
