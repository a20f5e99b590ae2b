"""PEFT (LoRA) on bioscale models with the stock module names, and adapters moved to and from the stock models.

The model side is in :mod:`bioscale.models.hf_contract` and :mod:`bioscale.models.adapters`:
``model.unfuse_projections()`` gives the blocks the stock names (``query`` / ``key`` / ``value`` on ESM-2, ``q_proj`` ... ``up_proj`` on Llama 3, the
published names on AMPLIFY and CodonFM), so every stock target list, and LoRA on Q and V alone, works; the fused
training layout stays the default. This module adds what needs PEFT itself:

- :func:`get_peft_model`: ``peft.get_peft_model`` after unfusing (the one-call form of the two steps).
- :func:`register_peft_targets`: PEFT's default LoRA targets for every bioscale ``model_type`` (building a model
  with PEFT imported does it for that family already).
- :func:`adapter_to_hf` / :func:`adapter_from_hf`: a LoRA adapter trained on a bioscale model as an adapter of its
  stock ``transformers`` counterpart (``bioscale.models.to_hf``), with equal outputs, and back. For the families
  without a stock class (AMPLIFY, CodonFM: ``to_hf`` gives the published checkpoint format),
  :func:`adapter_state_dict_to_hf` / :func:`adapter_state_dict_from_hf` and :func:`target_modules_to_hf` rename an
  adapter's tensors and targets to the published module paths.

The renaming is the family's ``hf_module_names`` (:class:`bioscale.models.registry.ModelSpec`). PEFT is an optional
extra (``pip install 'bioscale[lora]'``), imported inside the functions that need it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from bioscale.models import from_hf, list_models, spec_for_any_config, spec_for_config, to_hf
from bioscale.models.registry import ModelSpec, get_model_spec

# Prefix of the keys of a PEFT adapter state dict (get_peft_model_state_dict / adapter_model.safetensors).
PEFT_PREFIX = "base_model.model."


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"bioscale.integrations.peft needs PEFT: pip install 'bioscale[lora]' ({exc})") from exc
    return peft


def get_peft_model(model: PreTrainedModel, peft_config: Any, **kwargs: Any) -> Any:
    """``peft.get_peft_model(model.unfuse_projections(), peft_config, **kwargs)`` for a bioscale model (so stock
    target names adapt what they adapt on the stock model, and ``target_modules=None`` the family's default);
    ``ValueError`` for a model without the adapter layout."""
    if not hasattr(model, "unfuse_projections"):
        raise ValueError(f"{type(model).__name__} has no stock-named adapter layout (bioscale.models.hf_contract)")
    register_peft_targets()
    return _import_peft().get_peft_model(model.unfuse_projections(), peft_config, **kwargs)


def register_peft_targets() -> None:
    """PEFT's default LoRA targets (``LoraConfig()`` without ``target_modules``) for every bioscale family that
    declares ``adapter_targets``."""
    constants = _import_peft().utils.constants
    for name in list_models():
        try:
            spec = get_model_spec(name)
        except ImportError:  # a family registered by name whose code is not importable here
            continue
        if spec.adapter_targets:
            constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(
                spec.config_class.model_type, list(spec.adapter_targets)
            )


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _name_map(spec: ModelSpec, to_stock: bool) -> list[tuple[re.Pattern[str], str]]:
    if not spec.hf_module_names:
        raise ValueError(f"model family {spec.name!r} declares no hf_module_names: its adapters do not convert")
    pairs = spec.hf_module_names if to_stock else [(theirs, ours) for ours, theirs in spec.hf_module_names]
    return [(_template_regex(source), target) for source, target in pairs]


def _rename_module(name: str, mapping: list[tuple[re.Pattern[str], str]]) -> str | None:
    """``name`` (a module path, or a module path followed by ``.`` and more) renamed, ``None`` when nothing maps."""
    for pattern, target in mapping:
        match = pattern.match(name)
        if match and (match.end() == len(name) or name[match.end()] == "."):
            renamed = target.format(i=match.group("i")) if "i" in pattern.groupindex else target
            return renamed + name[match.end() :]
    return None


def _rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], spec: ModelSpec, to_stock: bool
) -> dict[str, torch.Tensor]:
    mapping = _name_map(spec, to_stock)
    renamed, unmapped = {}, []
    for key, value in state_dict.items():
        prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
        new = _rename_module(key[len(prefix) :], mapping)
        if new is None:
            unmapped.append(key)
        else:
            renamed[prefix + new] = value
    if unmapped:
        side = "bioscale" if to_stock else "stock"
        raise ValueError(
            f"adapter tensors on modules the {spec.name} name map does not cover (not the {side} adapter layout; "
            f"unfuse the model before attaching the adapter): {unmapped[:5]}{' ...' if len(unmapped) > 5 else ''}"
        )
    return renamed


def adapter_state_dict_to_hf(
    family: str | ModelSpec, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An adapter state dict of a bioscale model (keys as ``peft.get_peft_model_state_dict`` gives them) with the
    module paths of the family's ``to_hf`` counterpart; ``ValueError`` naming tensors on unmapped modules."""
    spec = family if isinstance(family, ModelSpec) else get_model_spec(family)
    return _rename_state_dict(state_dict, spec, to_stock=True)


def adapter_state_dict_from_hf(
    family: str | ModelSpec, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`adapter_state_dict_to_hf`: a stock model's adapter tensors named for the bioscale
    model's adapter layout."""
    spec = family if isinstance(family, ModelSpec) else get_model_spec(family)
    return _rename_state_dict(state_dict, spec, to_stock=False)


def target_modules_to_hf(family: str | ModelSpec, target_modules: Any, *, to_stock: bool = True) -> Any:
    """``target_modules`` of an adapter config for the other side: full module paths are renamed, leaf names
    (``"query"``) and regular expressions are kept (they already mean the same modules on both sides)."""
    spec = family if isinstance(family, ModelSpec) else get_model_spec(family)
    if not isinstance(target_modules, (list, set, tuple)):
        return target_modules
    mapping = _name_map(spec, to_stock)
    return {_rename_module(name, mapping) or name for name in target_modules}


def _peft_parts(peft_model: Any) -> tuple[str, Any, dict[str, torch.Tensor], PreTrainedModel]:
    """(adapter name, a copy of its config, its state dict, a copy of the base model without the adapter)."""
    peft = _import_peft()
    adapter = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[adapter])
    state = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)
    base = copy.deepcopy(peft_model).unload()
    return adapter, config, state, base


def _attach(model: PreTrainedModel, adapter: str, config: Any, state: dict[str, torch.Tensor]) -> Any:
    peft = _import_peft()
    config.base_model_name_or_path = None
    wrapped = peft.get_peft_model(model, config, adapter_name=adapter)
    expected = set(peft.get_peft_model_state_dict(wrapped, adapter_name=adapter))
    if expected != set(state):
        raise ValueError(
            f"the converted adapter does not fit the model: missing {sorted(expected - set(state))[:5]}, unexpected "
            f"{sorted(set(state) - expected)[:5]}"
        )
    peft.set_peft_model_state_dict(wrapped, state, adapter_name=adapter)
    return wrapped


def adapter_to_hf(peft_model: Any) -> Any:
    """The stock ``transformers`` model of a PEFT-wrapped bioscale model (``bioscale.models.to_hf`` of its base)
    carrying the same adapter: equal outputs, adapter unmerged. The input is left as it is.

    Raises ``ValueError`` for a family without a stock class (use :func:`adapter_state_dict_to_hf`) or an adapter on
    modules outside the family's name map (an adapter attached to the fused layout).
    """
    adapter, config, state, base = _peft_parts(peft_model)
    spec = spec_for_config(base.config)
    stock = to_hf(base)
    if not isinstance(stock, PreTrainedModel):
        raise ValueError(
            f"{spec.name} has no stock transformers class (to_hf gives {type(stock).__name__}); move the adapter "
            "with adapter_state_dict_to_hf and target_modules_to_hf"
        )
    config.target_modules = target_modules_to_hf(spec, config.target_modules)
    return _attach(stock, adapter, config, adapter_state_dict_to_hf(spec, state))


def adapter_from_hf(peft_model: Any, **config_overrides: Any) -> Any:
    """The bioscale model (``bioscale.models.from_hf`` of the stock base, in the adapter layout) carrying the
    adapter of a PEFT-wrapped stock ``transformers`` model: equal outputs. ``config_overrides`` go to ``from_hf``."""
    adapter, config, state, base = _peft_parts(peft_model)
    spec = spec_for_any_config(base.config)
    model = from_hf(base, **config_overrides).unfuse_projections()
    config.target_modules = target_modules_to_hf(spec, config.target_modules, to_stock=False)
    return _attach(model, adapter, config, adapter_state_dict_from_hf(spec, state))
