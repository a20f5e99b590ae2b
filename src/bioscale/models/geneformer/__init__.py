"""Geneformer (single-cell masked language model over rank-value-encoded genes): config, models, exact conversion to
and from ``transformers`` BERT, sizes."""

from bioscale.models.geneformer.config import GeneformerConfig
from bioscale.models.geneformer.convert import config_from_hf, config_to_hf, from_hf, to_hf
from bioscale.models.geneformer.modeling import (
    GeneformerBlock,
    GeneformerForMaskedLM,
    GeneformerForSequenceClassification,
    GeneformerForTokenClassification,
    GeneformerModel,
    GeneformerPreTrainedModel,
)

__all__ = [
    "GeneformerBlock",
    "GeneformerConfig",
    "GeneformerForMaskedLM",
    "GeneformerForSequenceClassification",
    "GeneformerForTokenClassification",
    "GeneformerModel",
    "GeneformerPreTrainedModel",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "to_hf",
]
