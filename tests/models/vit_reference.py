"""timm, the ViT tests' referee, importable where its torchvision dependency cannot load (plain functions).

timm imports torchvision at import time (``timm.layers`` for ``FrozenBatchNorm2d``, ``timm.data`` for its transforms).
torchvision's PyPI wheels are CUDA builds: against the CPU torch this repository pins for CI (2.13.0+cpu) their C++
extension does not load and ``import torchvision`` fails (``operator torchvision::nms does not exist``), so CI keeps
torchvision uninstalled and timm would not import. ``VisionTransformer`` never calls torchvision (no batch norm, no
transforms), so :func:`import_timm` imports timm with placeholder ``torchvision`` modules that exist only during that
import: the model code under test is timm's own. Where a working torchvision is installed (a GPU machine) it is used
as it is. transformers is imported first, so it has already decided that torchvision is absent and never sees the
placeholders.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import pytest


class _Placeholder(type):
    """A class whose every attribute is another placeholder class (hashable, subclassable, never called by ViT)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(cls, name, value)
        return value


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _forget(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_timm() -> Any:
    """The ``timm`` module (skips the test when timm is not installed)."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "models"):
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install 'bioscale[vit]')")
    import transformers.image_utils  # noqa: F401  (transformers settles on "no torchvision" before any placeholder)

    try:
        import timm

        return timm
    except (ImportError, RuntimeError):  # no torchvision, or one whose C++ ops do not load against this torch
        _forget("timm")
        _forget("torchvision")
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        _forget("torchvision")
    return timm


def timm_vit(**kwargs: Any) -> Any:
    """A timm ``VisionTransformer`` built directly from keyword arguments, in eval mode."""
    timm = import_timm()
    return timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
