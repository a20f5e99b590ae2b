"""ViT registry entry: named sizes (the reference recipe's ``vit_*_patch16_224`` shapes plus ``debug``), the FLOP
count, and the stock ``transformers`` classes a plain ViT converts to and from."""

from __future__ import annotations

from typing import Any

from bioscale.models.registry import ModelSpec
from bioscale.models.vit.config import VitConfig
from bioscale.models.vit.convert import flops_per_image, from_hf, hf_unsupported, to_hf
from bioscale.models.vit.modeling import VitForImageClassification, VitModel

# The reference recipe's ViT (bionemo-recipes' vit_base_patch16_224, adapted from timm): 224 x 224 RGB images in
# 16 x 16 patches, QKV bias, QK-norm, pre-norm blocks with MLP ratio 4, a class token, learned positions over every
# token, 8 register tokens, the final LayerNorm, and attention (MAP) pooling. timm's fc_norm rule (the final norm moves
# after the pooling only for average pooling) leaves the final norm before the MAP pool; pass fc_norm=true to move it.
RECIPE: dict[str, Any] = dict(
    image_size=224, patch_size=16, num_channels=3, qkv_bias=True, qk_norm=True, class_token=True,
    num_register_tokens=8, no_embed_class=False, final_norm=True, fc_norm=None, global_pool="map",
    layer_norm_eps=1e-6,
)  # fmt: skip


def _shape(layers: int, hidden: int, heads: int) -> dict[str, Any]:
    return dict(RECIPE, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                intermediate_size=4 * hidden)  # fmt: skip


# ViT-S/16, ViT-B/16, ViT-L/16 (Dosovitskiy et al., 2021, Table 1; DeiT's "small"): 22M, 86M, 304M encoder parameters.
# debug: the same recipe on 32 x 32 images in 8 x 8 patches (16 patches + class + 8 registers = 25 tokens), 2 blocks.
SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(RECIPE, image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  intermediate_size=256),
    "small": _shape(12, 384, 6),
    "base": _shape(12, 768, 12),
    "large": _shape(24, 1024, 16),
}  # fmt: skip


def flops_per_token(config: VitConfig, seq_len: int) -> float:
    """Training FLOPs per *image* (:func:`bioscale.models.vit.convert.flops_per_image`); ``seq_len`` is ignored.

    The training loop counts the "tokens" of an image batch as images (``bioscale.data.count_tokens``: one per image),
    because every image has the same number of patch tokens, fixed by the config, and images/s is what vision
    throughput is quoted in. So for this family ``tokens_per_sec_per_gpu`` in ``metrics.jsonl`` is images/s, and MFU
    is ``flops_per_image x images/s / peak``: the same number it would be with patch tokens on both sides.
    """
    return flops_per_image(config)


MODEL_SPEC = ModelSpec(
    name="vit",
    config_class=VitConfig,
    model_classes={"base": VitModel, "image_classification": VitForImageClassification},
    default_task="image_classification",
    sizes=SIZES,
    from_hf=from_hf,
    to_hf=to_hf,
    hf_model_types=("vit",),
    flops_per_token=flops_per_token,
    modality="image",
    # Images have no tokenizer: the image processor saved with a checkpoint (preprocessor_config.json), or one made
    # from the config, plays its part (bioscale.data.images.image_processor_for).
    tokenizer="",
    causal=False,
    hf_classes={
        "base": ("ViTModel", {"add_pooling_layer": False}),
        "image_classification": ("ViTForImageClassification", {}),
    },
    hf_unsupported=hf_unsupported,
    # PEFT registers no LoRA default for stock "vit"; query and value are its other tuners' ViT default, here under
    # transformers 5's names (the unfused layout's, VitBlock.adapter_layout).
    adapter_targets=("q_proj", "v_proj"),
    # The unfused classifier's paths are ViTForImageClassification's in transformers 5 (the pinned release).
    hf_module_names=tuple((f"vit.layers.{{i}}.{p}", f"vit.layers.{{i}}.{p}") for p in (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")),
)
