"""Helpers for the pipeline tests: running the commands as real processes, and small FASTA inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "src"


def subprocess_env() -> dict[str, str]:
    """The environment for a child process that must import this checkout's bioscale (installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_command(
    args: list[str], *, cwd: Path, stdin: str | None = "", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` in ``cwd`` with ``stdin`` as its input (``""``: an empty, closed stdin, as a pipe gives)."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, input=stdin, capture_output=True, text=True, env=subprocess_env(),
        timeout=timeout,
    )


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return path
