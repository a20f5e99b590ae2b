"""Vision Transformer (timm's ``VisionTransformer``, the reference recipe's ViT): config, models, exact conversion to
and from timm and ``transformers``, sizes."""

from bioscale.models.vit.config import GLOBAL_POOLS, VitConfig
from bioscale.models.vit.convert import (
    config_from_hf,
    config_from_timm,
    config_to_hf,
    flops_per_image,
    from_hf,
    from_timm,
    hf_unsupported,
    to_hf,
    to_timm,
)
from bioscale.models.vit.modeling import (
    ImageClassifierOutputWithCount,
    VitBlock,
    VitForImageClassification,
    VitModel,
    VitModelOutput,
    VitPreTrainedModel,
)

__all__ = [
    "GLOBAL_POOLS",
    "ImageClassifierOutputWithCount",
    "VitBlock",
    "VitConfig",
    "VitForImageClassification",
    "VitModel",
    "VitModelOutput",
    "VitPreTrainedModel",
    "config_from_hf",
    "config_from_timm",
    "config_to_hf",
    "flops_per_image",
    "from_hf",
    "from_timm",
    "hf_unsupported",
    "to_hf",
    "to_timm",
]
