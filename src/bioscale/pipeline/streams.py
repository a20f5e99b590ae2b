"""Stdout discipline for piped stages: one JSON line on stdout, everything else on stderr.

``bioscale data | bioscale train | bioscale eval`` only works if stdout carries nothing but the artifact line. Python
code, tqdm, warnings and ``transformers`` logging already write to stderr, but a stray ``print`` in a library or a
C++ extension writing to file descriptor 1 would corrupt the pipe. :func:`stdout_to_stderr` therefore points both
``sys.stdout`` and file descriptor 1 at stderr for the duration of a stage and hands back a writer bound to the real
stdout for the final line. :func:`resolve_input_artifact` reads the upstream stage's line from stdin.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from bioscale.pipeline.artifacts import parse_artifact_line


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Send all stdout output to stderr inside the block; yield ``emit(obj)``, which writes one JSON line to stdout.

    ``emit`` may be called inside or after the block; the line is written to the original stdout when the block
    exits, so it is always the last thing on stdout.
    """
    pending: list[str] = []

    def emit(obj: dict[str, Any]) -> None:
        pending.append(json.dumps(obj, sort_keys=True, separators=(",", ":")))

    original_stdout: TextIO = sys.stdout
    sys.stdout.flush()
    saved_fd: int | None = None
    try:
        stdout_fd = original_stdout.fileno()
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        # Under pytest's capture (or any in-memory stream) there is no descriptor to redirect; the Python-level
        # redirect below still catches print().
        stdout_fd = stderr_fd = -1
    if stdout_fd >= 0 and stderr_fd >= 0:
        saved_fd = os.dup(stdout_fd)
        os.dup2(stderr_fd, stdout_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield emit
    finally:
        sys.stderr.flush()
        if saved_fd is not None:
            os.dup2(saved_fd, stdout_fd)
            os.close(saved_fd)
        for line in pending:
            original_stdout.write(line + "\n")
        original_stdout.flush()


def resolve_input_artifact(option: str | None, *, stdin: TextIO | None = None, what: str = "input artifact") -> Path:
    """The upstream artifact directory: ``option`` if given, else the last JSON line piped on stdin.

    Stdin is read only when no option is given and it is not a terminal (reading a terminal would wait for typing).
    """
    if option:
        return Path(option)
    stream = sys.stdin if stdin is None else stdin
    if stream is None or stream.closed or (hasattr(stream, "isatty") and stream.isatty()):
        raise ValueError(f"no {what}: pass --input ARTIFACT_DIR or pipe the previous stage's output into this one")
    return parse_artifact_line(stream.read(), origin="stdin")
