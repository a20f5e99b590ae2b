"""bioscale models: ESM-2 and Llama 3 as ``transformers`` models, the registry, and exact conversion.

Importing this package registers the bioscale configs and models with the ``transformers`` Auto API, so
``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` /
``AutoModelForTokenClassification`` / ``AutoModelForSequenceClassification`` load a bioscale ``save_pretrained``
directory without ``trust_remote_code``. :func:`from_hf` / :func:`to_hf` convert to and from the stock
``transformers`` classes, both families, tensor for tensor.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from bioscale.models.attention import ATTENTION_BACKENDS, AttentionInputs, attention_forward
from bioscale.models.batch import input_validation, set_input_validation
from bioscale.models.esm2 import (
    Esm2Config,
    Esm2ForMaskedLM,
    Esm2ForSequenceClassification,
    Esm2ForTokenClassification,
    Esm2Model,
)
from bioscale.models.llama3 import Llama3Config, Llama3ForCausalLM, Llama3Model, shift_labels
from bioscale.models.registry import (
    MODALITIES,
    ModelSpec,
    build_config,
    build_model,
    get_model_spec,
    is_bioscale_config,
    list_models,
    register_auto_classes,
    register_model_family,
    spec_for_any_config,
    spec_for_config,
    spec_for_hf_model_type,
    spec_for_model,
)


def from_hf(hf_model: PreTrainedModel, **config_overrides: Any) -> PreTrainedModel:
    """The bioscale model with exactly the weights of a ``transformers`` model (``EsmForMaskedLM``,
    ``EsmForTokenClassification``, ``EsmModel``, ``LlamaForCausalLM``, ``LlamaModel``).

    ``config_overrides`` set bioscale-only config fields, e.g. ``padded_vocab_size=64`` or ``attn_backend="varlen"``.
    Raises ``ValueError`` for unsupported models or configs, naming the field.
    """
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{type(hf_model).__name__} is not a transformers PreTrainedModel")
    return spec_for_hf_model_type(model_type).from_hf(hf_model, **config_overrides)


def to_hf(model: PreTrainedModel) -> PreTrainedModel:
    """The stock ``transformers`` model (``EsmForMaskedLM``, ``LlamaForCausalLM``, ...) with exactly ``model``'s
    weights; its ``save_pretrained`` directory loads with plain ``transformers``, no bioscale needed."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a bioscale model (it has no config)")
    return spec_for_config(config).to_hf(model)


def _register_shipped_families() -> None:
    for name in list_models():
        register_auto_classes(get_model_spec(name))


_register_shipped_families()

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionInputs",
    "Esm2Config",
    "Esm2ForMaskedLM",
    "Esm2ForSequenceClassification",
    "Esm2ForTokenClassification",
    "Esm2Model",
    "Llama3Config",
    "Llama3ForCausalLM",
    "Llama3Model",
    "MODALITIES",
    "ModelSpec",
    "attention_forward",
    "build_config",
    "build_model",
    "from_hf",
    "get_model_spec",
    "input_validation",
    "is_bioscale_config",
    "list_models",
    "register_model_family",
    "set_input_validation",
    "shift_labels",
    "spec_for_any_config",
    "spec_for_config",
    "spec_for_model",
    "to_hf",
]
