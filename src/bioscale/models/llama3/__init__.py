"""Llama 3 (causal LM, here over DNA): config, models, label shifting, ``transformers`` conversion, sizes."""

from bioscale.models.llama3.config import Llama3Config
from bioscale.models.llama3.convert import config_from_hf, config_to_hf, from_hf, to_hf
from bioscale.models.llama3.modeling import (
    Llama3Block,
    Llama3ForCausalLM,
    Llama3Model,
    Llama3PreTrainedModel,
    shift_labels,
)

__all__ = [
    "Llama3Block",
    "Llama3Config",
    "Llama3ForCausalLM",
    "Llama3Model",
    "Llama3PreTrainedModel",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "shift_labels",
    "to_hf",
]
