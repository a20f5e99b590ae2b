"""Artifacts: metadata round trip, content ids, every validation failure with its message, lineage, stdin parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bioscale.pipeline.artifacts import (
    METADATA_FILENAME,
    ArtifactMetadata,
    LineageEntry,
    content_id,
    lineage_entry,
    parse_artifact_line,
    read_artifact,
    source_lineage_entry,
    trace_lineage,
    write_artifact,
)
from bioscale.pipeline.streams import resolve_input_artifact

from .conftest import subprocess_env


def _dataset(root: Path, *, content: str = "MKV\n", lineage: list[LineageEntry] | None = None) -> ArtifactMetadata:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(exist_ok=True)
    (root / "train" / "shard.txt").write_text(content)
    metadata = ArtifactMetadata(
        kind="dataset", modality="protein", paths={"train": "train"}, metrics={"n": 1}, config={"a": 1},
        lineage=lineage or [], seed=0, scale="tiny",
    )
    return write_artifact(root, metadata)


def test_write_read_round_trip(tmp_path: Path) -> None:
    written = _dataset(tmp_path / "ds")
    read = read_artifact(tmp_path / "ds", expected_kind="dataset", verify=True)
    assert read == written
    assert read.created.endswith("+00:00")  # UTC
    assert read.code_version is not None and read.code_version.bioscale
    assert len(read.id) == 32
    assert read.path(tmp_path / "ds", "train") == (tmp_path / "ds" / "train").resolve()


def test_content_id_depends_on_content_not_time(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a")
    b = _dataset(tmp_path / "b")
    c = _dataset(tmp_path / "c", content="MKW\n")
    assert a.id == b.id  # same files and fields, different directories and creation times
    assert a.id != c.id
    # Changing a file after writing is caught by verify=True.
    (tmp_path / "a" / "train" / "shard.txt").write_text("MKVV\n")
    read_artifact(tmp_path / "a")  # cheap read does not hash
    with pytest.raises(ValueError, match=r"field 'id' is .* but the content hashes to"):
        read_artifact(tmp_path / "a", verify=True)
    assert content_id(tmp_path / "b", b) == b.id


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", r"artifact .*nope does not exist"),
        ("file_not_dir", r"is not a directory"),
        ("no_metadata", r"has no metadata.json"),
        ("bad_json", r"metadata.json is not valid JSON"),
        ("not_object", r"must hold a JSON object"),
        ("bad_kind", r"field 'kind'"),
        ("missing_field", r"field 'kind': Field required"),
        ("unknown_field", r"field 'colour': Extra inputs are not permitted"),
        ("bad_schema", r"field 'schema_version'.*unsupported schema_version 99"),
        ("absolute_path", r"field 'paths': .*paths.train='/etc' must be a relative path"),
        ("escaping_path", r"paths.train='../x' must be a relative path"),
        ("missing_file", r"field 'paths.train' points to train, which does not exist"),
        ("bad_lineage", r"field 'lineage.0.id': Field required"),
    ],
)
def test_read_artifact_failures_name_path_and_field(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "art"
    if setup == "missing_dir":
        root = tmp_path / "nope"
    elif setup == "file_not_dir":
        root.write_text("x")
    else:
        root.mkdir()
        good = {"kind": "dataset", "paths": {}, "schema_version": 1}
        raw: object = {
            "no_metadata": None,
            "bad_json": "{not json",
            "not_object": [1, 2],
            "bad_kind": {**good, "kind": "checkpoint"},
            "missing_field": {"paths": {}},
            "unknown_field": {**good, "colour": "red"},
            "bad_schema": {**good, "schema_version": 99},
            "absolute_path": {**good, "paths": {"train": "/etc"}},
            "escaping_path": {**good, "paths": {"train": "../x"}},
            "missing_file": {**good, "paths": {"train": "train"}},
            "bad_lineage": {**good, "lineage": [{"kind": "dataset", "path": "/x"}]},
        }[setup]
        if raw is not None:
            text = raw if isinstance(raw, str) else json.dumps(raw)
            (root / METADATA_FILENAME).write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_artifact(root)
    assert str(root) in str(info.value)


def test_wrong_kind_names_expected_and_actual(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"has field 'kind' = 'dataset', expected 'model'"):
        read_artifact(tmp_path / "ds", expected_kind="model")
    with pytest.raises(ValueError, match=r"expected 'model' or 'evaluation'"):
        read_artifact(tmp_path / "ds", expected_kind=("model", "evaluation"))


def test_write_artifact_refuses_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    metadata = ArtifactMetadata(kind="model", paths={"model": "final_model"})
    with pytest.raises(ValueError, match=r"paths.model points to final_model, which does not exist"):
        write_artifact(tmp_path / "a", metadata)
    assert not (tmp_path / "a" / METADATA_FILENAME).exists()  # nothing half-written


def test_trace_lineage_walks_every_ancestor_and_checks_ids(tmp_path: Path) -> None:
    source = tmp_path / "raw.fasta"
    source.write_text(">a\nMKV\n")
    ds = _dataset(tmp_path / "ds", lineage=[source_lineage_entry(source)])
    (tmp_path / "model" / "weights").mkdir(parents=True)
    (tmp_path / "model" / "weights" / "w.bin").write_bytes(b"\x00\x01")
    model = write_artifact(
        tmp_path / "model",
        ArtifactMetadata(kind="model", paths={"model": "weights"}, lineage=[lineage_entry(tmp_path / "ds", ds)]),
    )
    (tmp_path / "eval").mkdir()
    evaluation = ArtifactMetadata(kind="evaluation", lineage=[lineage_entry(tmp_path / "model", model)])
    write_artifact(tmp_path / "eval", evaluation)
    chain = trace_lineage(tmp_path / "eval")
    assert [(e.kind, e.id) for e, _ in chain] == [("model", model.id), ("dataset", ds.id), ("source", chain[2][0].id)]
    assert chain[2][0].id.startswith("sha256:") and chain[2][1] is None
    # Replace the dataset: the model's record no longer matches and the walk says so.
    _dataset(tmp_path / "ds", content="MKVW\n")
    with pytest.raises(ValueError, match=r"now has id .* but .* was consumed"):
        trace_lineage(tmp_path / "eval")


def test_parse_artifact_line(tmp_path: Path) -> None:
    text = "some stray line\n" + json.dumps({"path": str(tmp_path / "x"), "kind": "dataset"}) + "\n"
    assert parse_artifact_line(text) == tmp_path / "x"
    with pytest.raises(ValueError, match=r"stdin is empty \(did the upstream stage fail\?\)"):
        parse_artifact_line("  \n")
    with pytest.raises(ValueError, match=r"no JSON line with a 'path' field"):
        parse_artifact_line('{"kind": "dataset"}\nnot json\n')


def test_resolve_input_artifact_prefers_option_and_refuses_a_terminal(tmp_path: Path) -> None:
    class Tty:
        closed = False

        def isatty(self) -> bool:
            return True

        def read(self) -> str:  # pragma: no cover - must not be called
            raise AssertionError("a terminal must not be read")

    assert resolve_input_artifact(str(tmp_path), stdin=Tty()) == tmp_path
    with pytest.raises(ValueError, match=r"pass --input ARTIFACT_DIR or pipe"):
        resolve_input_artifact(None, stdin=Tty())


def test_stdout_to_stderr_catches_fd_level_writes(tmp_path: Path) -> None:
    # In a real process (not under pytest's capture) both print() and raw writes to fd 1 must land on stderr,
    # and only the emitted line on stdout.
    code = (
        "import os, sys\n"
        "from bioscale.pipeline.streams import stdout_to_stderr\n"
        "with stdout_to_stderr() as emit:\n"
        "    print('python-level leak')\n"
        "    sys.stdout.flush()\n"
        "    os.write(1, b'fd-level leak\\n')\n"
        "    emit({'path': '/x'})\n"
        "print('after')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120, check=True
    )
    assert result.stdout == '{"path":"/x"}\nafter\n'
    assert "python-level leak" in result.stderr and "fd-level leak" in result.stderr
