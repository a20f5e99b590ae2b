"""``bioscale --help`` is only the help: on stdout, nothing on stderr, fast, torch never imported; ``import bioscale``
prints nothing either (transformers imports torchao when it is installed; its import-time notices are silenced)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = (
    "import sys, bioscale_cli\n"
    "code = bioscale_cli.main(['--help'])\n"
    "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'bioscale --help imported torch'\n"
    "sys.exit(code)\n"
)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)


def test_help_prints_only_the_help_and_imports_no_torch() -> None:
    proc = _run([sys.executable, "-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: bioscale <command>") and "train" in proc.stdout


def test_installed_command_help_is_quiet() -> None:
    script = Path(sys.executable).parent / "bioscale"
    command = str(script) if script.exists() else shutil.which("bioscale")
    if command is None:
        pytest.skip("the bioscale console script is not installed in this environment")
    proc = _run([command, "--help"])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "usage: bioscale" in proc.stdout


def test_no_command_is_a_usage_error() -> None:
    proc = _run([sys.executable, "-m", "bioscale_cli"])
    assert proc.returncode == 2 and "usage: bioscale" in proc.stderr and proc.stdout == ""


def test_import_bioscale_prints_nothing() -> None:
    proc = _run([sys.executable, "-c", "import bioscale"])
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")
