"""ESM-2 (protein masked language model): config, models, ``transformers`` conversion and sizes."""

from bioscale.models.esm2.config import Esm2Config
from bioscale.models.esm2.convert import config_from_hf, config_to_hf, from_hf, to_hf
from bioscale.models.esm2.modeling import (
    Esm2Block,
    Esm2ForMaskedLM,
    Esm2ForSequenceClassification,
    Esm2ForTokenClassification,
    Esm2Model,
    Esm2PreTrainedModel,
    mean_pool,
)

__all__ = [
    "Esm2Block",
    "Esm2Config",
    "Esm2ForMaskedLM",
    "Esm2ForSequenceClassification",
    "Esm2ForTokenClassification",
    "Esm2Model",
    "Esm2PreTrainedModel",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "mean_pool",
    "to_hf",
]
