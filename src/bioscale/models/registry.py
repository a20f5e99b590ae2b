"""The model registry: one name maps to a :class:`ModelSpec`, the only place that knows a model family.

A spec says everything the rest of bioscale needs: config and model classes per task, named sizes, the modality and
default tokenizer, whether the model is causal, which tasks take packed batches and context parallelism, the stock
``transformers`` classes it converts to and from, and its FLOPs per token. Auto-class registration, loading,
embedding, fine-tuning, generation, evaluation, the pipeline and context parallelism all read the spec.

Adding a model family touches its own folder, which defines ``MODEL_SPEC``, and one registration: a line of
:data:`_FAMILIES` for a family shipped with bioscale (imported lazily, so importing the registry never imports every
model), or one call of :func:`register_model_family` for a family defined elsewhere.
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
    "amplify": "bioscale.models.amplify.spec",
    "codonfm": "bioscale.models.codonfm.spec",
    "esm2": "bioscale.models.esm2.spec",
    "geneformer": "bioscale.models.geneformer.spec",
    "llama3": "bioscale.models.llama3.spec",
    "vit": "bioscale.models.vit.spec",
}

# PretrainedConfig arguments every family accepts besides its own.
_COMMON_CONFIG_KEYS = frozenset({"num_labels", "id2label", "label2id", "problem_type", "tie_word_embeddings"})


# Modalities of the inputs a family reads (the pipeline and the input checks choose by it).
MODALITIES = ("protein", "dna", "codon", "cells", "image")

# Task name -> the ``transformers`` Auto class a model class of that task is registered with.
AUTO_CLASS_FOR_TASK: dict[str, str] = {
    "base": "AutoModel",
    "masked_lm": "AutoModelForMaskedLM",
    "causal_lm": "AutoModelForCausalLM",
    "token_classification": "AutoModelForTokenClassification",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}


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
        modality: what the inputs are, one of :data:`MODALITIES`.
        tokenizer: name of the default tokenizer (``bioscale.data.get_tokenizer(name)``) for checkpoints saved
            without one.
        causal: a decoder (next-token prediction, ``generate()``) rather than a bidirectional encoder.
        hf_classes: task → (stock ``transformers`` class name, ``from_pretrained`` keyword arguments) used to load
            a plain ``transformers`` checkpoint for that task before converting it exactly; a task without an entry
            loads the ``"base"`` class and gets a fresh bioscale head.
        packing_tasks: tasks whose models accept packed (THD) batches.
        cp_tasks: tasks whose models can run under context parallelism (token-local heads only: a pooled head would
            pool one rank's tokens).
        position_offset: positions the model reserves beyond its tokens (ESM-2's 1026 positions hold 1024 tokens).
        foreign_checkpoint: for a checkpoint format stock ``transformers`` has no class for (Hub remote code, e.g.
            chandar-lab's AMPLIFY) whose ``config.json`` ``model_type`` is one of ``hf_model_types``:
            ``(read_config, build_model)`` with ``read_config(config_json: dict, **overrides) -> config`` and
            ``build_model(state_dict, config, task) -> model``. ``bioscale.use.loading`` reads the files
            (safetensors only, never the checkpoint's code); ``None``: no such format.
        foreign_config_match: for a foreign format whose ``config.json`` has no ``model_type`` (CodonFM's EnCodon
            checkpoints hold their training wrapper's arguments): ``(config_json: dict) -> bool``, whether a
            ``config.json`` that ``AutoConfig`` cannot read is this family's; ``None``: matched by ``model_type``
            only.
        hf_unsupported: ``(config) -> str | None``: why a config of this family has no stock ``transformers``
            counterpart (``to_hf`` would refuse it; the final export then writes no ``final_model_hf``), ``None`` when
            it has one; the field ``None``: every config converts (ViT with registers or QK-norm has none).
        adapter_targets: PEFT's default LoRA targets for this family (what ``LoraConfig()`` without
            ``target_modules`` adapts), module names of the unfused adapter layout: the stock model's defaults
            (``("query", "value")`` for ESM). ``()``: no default registered.
        hf_module_names: ``(bioscale module path, stock module path)`` templates with ``{i}`` for the block index,
            paths in the adapter layout of the ``default_task`` model and in its ``to_hf`` counterpart: the name map
            that moves adapters between the two (``bioscale.integrations.peft``). ``()``: adapters do not convert.
        extra: anything a family's own code wants to keep beside its spec (read by nothing else).
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
    modality: str
    tokenizer: str
    causal: bool = False
    hf_classes: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    packing_tasks: frozenset[str] = frozenset()
    cp_tasks: frozenset[str] = frozenset()
    position_offset: int = 0
    foreign_checkpoint: tuple[Callable[..., PretrainedConfig], Callable[..., PreTrainedModel]] | None = None
    foreign_config_match: Callable[[Mapping[str, Any]], bool] | None = None
    hf_unsupported: Callable[[PretrainedConfig], str | None] | None = None
    adapter_targets: tuple[str, ...] = ()
    hf_module_names: tuple[tuple[str, str], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"model family {self.name!r}: modality {self.modality!r} is not one of {MODALITIES}")
        if "base" not in self.model_classes or self.default_task not in self.model_classes:
            raise ValueError(f"model family {self.name!r}: model_classes needs 'base' and {self.default_task!r}")
        for what, tasks in (("packing_tasks", self.packing_tasks), ("cp_tasks", self.cp_tasks),
                            ("hf_classes", set(self.hf_classes))):  # fmt: skip
            unknown = sorted(set(tasks) - set(self.model_classes))
            if unknown:
                raise ValueError(f"model family {self.name!r}: {what} names tasks it has no model for: {unknown}")
        unknown = sorted(set(self.model_classes) - set(AUTO_CLASS_FOR_TASK))
        if unknown:
            raise ValueError(f"model family {self.name!r}: unknown tasks {unknown}; known: {list(AUTO_CLASS_FOR_TASK)}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this family has a model class for."""
        return tuple(self.model_classes)

    def model_class(self, task: str | None = None) -> type[PreTrainedModel]:
        """The model class for ``task`` (default: the pre-training task); ``ValueError`` listing valid tasks."""
        task = task or self.default_task
        if task not in self.model_classes:
            raise ValueError(f"model {self.name!r} has no task {task!r}; choose one of {sorted(self.model_classes)}")
        return self.model_classes[task]

    def task_of(self, model_class: type) -> str | None:
        """The task ``model_class`` implements in this family (``None`` when it is not one of its classes)."""
        for task, cls in self.model_classes.items():
            if cls is model_class:
                return task
        return None


# Families registered at run time (register_model_family), by name.
_REGISTERED: dict[str, ModelSpec] = {}


def register_model_family(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` a bioscale model family: the registry, the Auto classes and every tool that takes a model.

    Idempotent for the same spec; ``ValueError`` when another family already uses the name or the config's
    ``model_type``.
    """
    if spec.name in _FAMILIES or (spec.name in _REGISTERED and _REGISTERED[spec.name] is not spec):
        raise ValueError(f"a model family named {spec.name!r} is already registered")
    for other in (get_model_spec(n) for n in list_models() if n != spec.name):
        if other.config_class.model_type == spec.config_class.model_type:
            raise ValueError(f"model_type {spec.config_class.model_type!r} already belongs to family {other.name!r}")
    _REGISTERED[spec.name] = spec
    register_auto_classes(spec)
    return spec


def register_auto_classes(spec: ModelSpec) -> None:
    """Register ``spec``'s config and model classes with the ``transformers`` Auto API (no ``trust_remote_code``)."""
    import transformers

    transformers.AutoConfig.register(spec.config_class.model_type, spec.config_class, exist_ok=True)
    for task, cls in spec.model_classes.items():
        auto = getattr(transformers, AUTO_CLASS_FOR_TASK[task], None)
        if auto is not None:
            auto.register(spec.config_class, cls, exist_ok=True)


def list_models() -> list[str]:
    """Registered model names."""
    return sorted({*_FAMILIES, *_REGISTERED})


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``; ``ValueError`` listing the registered names."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}")
    return importlib.import_module(_FAMILIES[name]).MODEL_SPEC


def spec_for_model(model: Any) -> ModelSpec:
    """The spec of a bioscale model (or of a plain ``transformers`` model bioscale converts), by its config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a transformers model (it has no config)")
    return spec_for_any_config(config)


def spec_for_any_config(config: PretrainedConfig) -> ModelSpec:
    """The spec of a bioscale config, or of a stock ``transformers`` config of a type a family converts."""
    model_type = getattr(config, "model_type", None)
    for name in list_models():
        spec = get_model_spec(name)
        if model_type == spec.config_class.model_type or model_type in spec.hf_model_types:
            return spec
    known = sorted(t for n in list_models() for t in (get_model_spec(n).config_class.model_type,
                                                       *get_model_spec(n).hf_model_types))  # fmt: skip
    raise ValueError(f"unsupported model type {model_type!r}: bioscale reads {known}")


def is_bioscale_config(config: PretrainedConfig) -> bool:
    """Whether ``config`` is a bioscale family's own config (rather than a stock ``transformers`` one)."""
    return any(getattr(config, "model_type", None) == get_model_spec(n).config_class.model_type for n in list_models())


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
