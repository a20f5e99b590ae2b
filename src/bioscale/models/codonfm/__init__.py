"""CodonFM EnCodon (codon-level masked language model over coding sequences, NVIDIA): config, models, conversion of
the released format, sizes."""

from bioscale.models.codonfm.config import REFERENCE_ROTARY_THETA, EnCodonConfig
from bioscale.models.codonfm.convert import (
    EnCodonReferenceCheckpoint,
    config_from_reference,
    from_hf,
    from_reference_state_dict,
    is_reference_config,
    reference_config_dict,
    save_reference_checkpoint,
    to_hf,
    to_reference_state_dict,
)
from bioscale.models.codonfm.modeling import (
    EnCodonBlock,
    EnCodonForMaskedLM,
    EnCodonForSequenceClassification,
    EnCodonModel,
    EnCodonPreTrainedModel,
)

__all__ = [
    "REFERENCE_ROTARY_THETA",
    "EnCodonBlock",
    "EnCodonConfig",
    "EnCodonForMaskedLM",
    "EnCodonForSequenceClassification",
    "EnCodonModel",
    "EnCodonPreTrainedModel",
    "EnCodonReferenceCheckpoint",
    "config_from_reference",
    "from_hf",
    "from_reference_state_dict",
    "is_reference_config",
    "reference_config_dict",
    "save_reference_checkpoint",
    "to_hf",
    "to_reference_state_dict",
]
