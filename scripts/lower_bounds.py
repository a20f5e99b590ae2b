"""Print pip constraints that pin every dependency of bioscale (and the named extras) to its declared lower bound.

``scripts/check_versions.sh oldest`` installs with these, so the lower bounds in ``pyproject.toml`` are tested, not
guessed. Usage: ``python scripts/lower_bounds.py [EXTRA ...]``. torch is left out: its lower bound is checked on the
GPU machine (the CPU machines install the local torch 2.13.0 wheel).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def lower_bound_pins(extras: list[str]) -> list[str]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", requirement)
        if match is None:
            raise ValueError(f"cannot read requirement {requirement!r}")
        name, spec = match.group(1).lower(), match.group(3)
        bound = re.search(r"(>=|==)\s*([^,;\s]+)", spec)
        if name in SKIP or bound is None:
            continue
        pins[name] = f"{name}=={bound.group(2)}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(lower_bound_pins(sys.argv[1:])))
