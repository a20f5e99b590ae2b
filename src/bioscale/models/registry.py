"""The model registry: one name maps to a :class:`ModelSpec` (config class, model class per task, named sizes,
``transformers`` adapter, FLOPs per token).

Adding a model family touches its own folder (which defines ``MODEL_SPEC``) and one line of :data:`_FAMILIES`.
Families are imported lazily so that importing the registry never imports every model.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

# name -> module that defines MODEL_SPEC
_FAMILIES: dict[str, str] = {
    "esm2": "bioscale.models.esm2.spec",
    "llama3": "bioscale.models.llama3.spec",
}

# PretrainedConfig arguments every family accepts besides its own.
_COMMON_CONFIG_KEYS = frozenset({"num_labels", "id2label", "label2id", "problem_type", "tie_word_embeddings"})


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of bioscale needs to know about one model family.

    Attributes:
        name: registry name (``"esm2"``, ``"llama3"``).
        config_class: the family's ``PretrainedConfig`` subclass.
        model_classes: task name → model class (``"base"`` always; ``"masked_lm"``, ``"causal_lm"``, ...).
        default_task: the pre-training task (the class ``build_model`` uses when no task is given).
        sizes: size name → config keyword arguments (``"debug"`` is always a tiny CPU-friendly shape).
        from_hf: ``transformers`` model → bioscale model (exact weights).
        to_hf: bioscale model → stock ``transformers`` model (exact weights).
        hf_model_types: ``transformers`` ``model_type`` values ``from_hf`` accepts.
        flops_per_token: ``(config, seq_len) -> float``, training FLOPs per token (see each family's docstring).
    """

    name: str
    config_class: type[PretrainedConfig]
    model_classes: Mapping[str, type[PreTrainedModel]]
    default_task: str
    sizes: Mapping[str, Mapping[str, Any]]
    from_hf: Callable[..., PreTrainedModel]
    to_hf: Callable[[PreTrainedModel], PreTrainedModel]
    hf_model_types: tuple[str, ...]
    flops_per_token: Callable[[PretrainedConfig, int], float]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def model_class(self, task: str | None = None) -> type[PreTrainedModel]:
        """The model class for ``task`` (default: the pre-training task); ``ValueError`` listing valid tasks."""
        task = task or self.default_task
        if task not in self.model_classes:
            raise ValueError(f"model {self.name!r} has no task {task!r}; choose one of {sorted(self.model_classes)}")
        return self.model_classes[task]


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(_FAMILIES)


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``; ``ValueError`` listing the registered names."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    return importlib.import_module(_FAMILIES[name]).MODEL_SPEC


def spec_for_config(config: PretrainedConfig) -> ModelSpec:
    """The spec whose config class is ``type(config)`` (matched by ``model_type``)."""
    for name in list_models():
        spec = get_model_spec(name)
        if spec.config_class.model_type == getattr(config, "model_type", None):
            return spec
    raise ValueError(
        f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) is not a bioscale config"
    )


def spec_for_hf_model_type(model_type: str) -> ModelSpec:
    """The spec that converts ``transformers`` models of ``model_type`` (e.g. ``"esm"``, ``"llama"``)."""
    for name in list_models():
        spec = get_model_spec(name)
        if model_type in spec.hf_model_types:
            return spec
    supported = sorted(t for n in list_models() for t in get_model_spec(n).hf_model_types)
    raise ValueError(f"transformers model_type {model_type!r} is not supported; bioscale converts {supported}")


def valid_config_keys(spec: ModelSpec) -> frozenset[str]:
    """Keyword arguments ``build_config`` accepts for ``spec``."""
    params = inspect.signature(spec.config_class.__init__).parameters
    own = {name for name, p in params.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(own) | _COMMON_CONFIG_KEYS


def build_config(name: str, size: str = "debug", **overrides: Any) -> PretrainedConfig:
    """The config of model ``name`` at size ``size``, with ``overrides`` applied on top.

    Raises:
        ValueError: unknown model, unknown size, or an override key the config does not have (each lists the valid
            choices).
    """
    spec = get_model_spec(name)
    if size not in spec.sizes:
        raise ValueError(f"model {name!r} has no size {size!r}; choose one of {list(spec.sizes)}")
    unknown = sorted(set(overrides) - valid_config_keys(spec))
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown} for model {name!r}; valid keys: {sorted(valid_config_keys(spec))}"
        )
    return spec.config_class(**{**spec.sizes[size], **overrides})


def build_model(
    config: PretrainedConfig, task: str | None = None, device: str | torch.device = "meta"
) -> PreTrainedModel:
    """The model for ``config`` and ``task`` (default: the family's pre-training task), built on ``device``.

    On ``meta`` (the default) nothing is allocated: apply converters and parallelism, then
    ``model.to_empty(device=...)`` and ``model.init_weights()``. On a real device the model comes back initialised.
    """
    cls = spec_for_config(config).model_class(task)
    with torch.device(device):
        return cls(config)
