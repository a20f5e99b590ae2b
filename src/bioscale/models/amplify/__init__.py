"""AMPLIFY (protein masked language model, chandar-lab): config, models, conversion of the published format, sizes."""

from bioscale.models.amplify.config import AmplifyConfig, swiglu_hidden_size
from bioscale.models.amplify.convert import (
    AmplifyReferenceCheckpoint,
    config_from_reference,
    from_hf,
    from_reference_state_dict,
    reference_config_dict,
    save_reference_checkpoint,
    to_hf,
    to_reference_state_dict,
)
from bioscale.models.amplify.modeling import (
    AmplifyBlock,
    AmplifyForMaskedLM,
    AmplifyForSequenceClassification,
    AmplifyForTokenClassification,
    AmplifyModel,
    AmplifyPreTrainedModel,
    mean_pool,
)

__all__ = [
    "AmplifyBlock",
    "AmplifyConfig",
    "AmplifyForMaskedLM",
    "AmplifyForSequenceClassification",
    "AmplifyForTokenClassification",
    "AmplifyModel",
    "AmplifyPreTrainedModel",
    "AmplifyReferenceCheckpoint",
    "config_from_reference",
    "from_hf",
    "from_reference_state_dict",
    "mean_pool",
    "reference_config_dict",
    "save_reference_checkpoint",
    "swiglu_hidden_size",
    "to_hf",
    "to_reference_state_dict",
]
