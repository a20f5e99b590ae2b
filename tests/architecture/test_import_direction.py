"""Imports between bioscale's packages go one way, and imports across packages sit at module top.

The layers (``docs/architecture.md`` lists the same table): a module may import from its own package and from any
package of a *lower* layer, never from the same layer's other packages or from above. Lazy (in-function) imports of
bioscale's own modules hide the dependency graph, so they are refused too, except the few listed in ``LAZY_ALLOWED``
with the reason (each an optional heavy package behind the import, or a cycle the layering cannot break).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# package -> layer; the root package's leaf modules (constants, _quiet) are the bottom layer.
LAYERS: dict[str, int] = {
    "constants": 0,
    "_quiet": 0,
    "models": 1,
    "data": 1,
    "distributed": 2,
    "precision": 2,
    "train": 3,
    "integrations": 3,  # other frameworks' loops (Trainer + Accelerate, PEFT, Lightning) beside bioscale's own
    "use": 4,
    "eval": 5,
    "pipeline": 6,
    "cli": 7,
    "__init__": 7,  # ``import bioscale`` registers the models (it imports models and _quiet only)
}

# (importing module, imported module) -> why it stays inside a function.
LAZY_ALLOWED: dict[tuple[str, str], str] = {}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, bool, int]]:
    """(module, imported bioscale module, at module top, line) for every bioscale import under src/bioscale."""
    found = []
    for path in sorted((SRC / "bioscale").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function = _nodes_inside_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module.split(".")[0] == "bioscale" else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] == "bioscale"]
            else:
                continue
            found += [(module, name, id(node) not in in_function, node.lineno) for name in names]
    return found


def _nodes_inside_functions(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def test_imports_follow_the_layers() -> None:
    wrong = []
    for module, imported, _, line in _imports():
        source, target = _package_of(module), _package_of(imported)
        if source == target or imported == "bioscale":
            continue
        assert source in LAYERS and target in LAYERS, f"{module} or {imported}: add its package to LAYERS"
        if LAYERS[target] >= LAYERS[source]:
            wrong.append(f"{module}:{line} imports {imported} ({source} layer {LAYERS[source]} -> {target} "
                         f"layer {LAYERS[target]})")  # fmt: skip
    assert not wrong, "imports against the documented direction:\n" + "\n".join(wrong)


def test_bioscale_modules_are_imported_at_module_top() -> None:
    # Within one package a subcommand may import its own implementation lazily (a fast ``--help``); across
    # packages the dependency must be visible at the top of the module.
    lazy = [
        f"{module}:{line} imports {imported} inside a function"
        for module, imported, at_top, line in _imports()
        if not at_top and _package_of(module) != _package_of(imported) and (module, imported) not in LAZY_ALLOWED
    ]
    assert not lazy, "move these imports to the top of their module (or allow them with a reason):\n" + "\n".join(lazy)


def test_docs_list_the_same_layers() -> None:
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    section = text.split("<!-- import-layers -->")[1].split("<!-- /import-layers -->")[0]
    documented = {}
    for row in section.splitlines():
        cells = [c.strip(" `") for c in row.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].isdigit():
            for package in cells[1].split(","):
                documented[package.strip(" `")] = int(cells[0])
    assert documented == LAYERS


def test_the_checker_can_fail(tmp_path: Path) -> None:
    # A models module importing train is exactly what the first test must catch.
    assert LAYERS["train"] >= LAYERS["models"]
    assert _package_of("bioscale.models.esm2.modeling") == "models"
    assert _package_of("bioscale") == "__init__"
