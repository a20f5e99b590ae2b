"""``VitConfig``: the Vision Transformer configuration, with ``transformers``' ``ViTConfig`` names where it has the
field and ``timm``'s ``VisionTransformer`` switches (QK-norm, register tokens, pooling, norm placement) otherwise.

The architecture is timm's ``VisionTransformer`` (Dosovitskiy et al., 2021; the 2023 additions of register tokens,
Darcet et al., and QK-norm, Dehghani et al.), restricted to what bioscale implements: a learned absolute position
embedding, pre-norm blocks with a GELU MLP, and one of three poolings. Switches that timm has and bioscale does not
(LayerScale, patch dropout, rotary or no position embedding, dynamic image sizes) are not fields; the converter refuses
a timm model that uses them, naming the setting. The norm rule is timm's: ``final_norm`` puts a LayerNorm after the
blocks, and ``fc_norm`` moves it *after* the pooling instead (timm's default ``fc_norm=None`` does that only for
``global_pool="avg"``); the two are never both applied.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from bioscale.models.attention import check_backend_name

GLOBAL_POOLS = ("token", "avg", "map")


class VitConfig(PretrainedConfig):
    r"""Configuration of a bioscale Vision Transformer (``model_type="bioscale_vit"``).

    Args:
        image_size, patch_size, num_channels: square input images of ``image_size`` pixels cut into
            ``patch_size``-pixel patches (``image_size`` must be a multiple of it), ``num_channels`` colour channels.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the encoder shape (timm's
            ``embed_dim``, ``depth``, ``num_heads`` and ``embed_dim * mlp_ratio``).
        qkv_bias: biases on the query / key / value projection.
        qk_norm: a LayerNorm over each head's queries and keys before the dot product (timm's ``qk_norm``).
        layer_norm_eps: epsilon of every LayerNorm (timm: 1e-6; ``transformers``' ViT checkpoints: 1e-12).
        class_token: prepend a learned class token.
        num_register_tokens: learned register tokens after the class token (timm's ``reg_tokens``); never pooled.
        no_embed_class: the position embedding covers the patches only (timm's ``no_embed_class``); ``False`` gives
            the class and register tokens positions too (original ViT, and ``transformers``' layout).
        pre_norm: a LayerNorm after the embeddings, before the blocks (CLIP; the patch projection then has no bias).
        final_norm, fc_norm: see the module docstring; ``fc_norm=None`` is timm's rule (on for ``"avg"`` pooling).
        global_pool: ``"token"`` (the class token), ``"avg"`` (mean of the patch tokens) or ``"map"`` (multi-head
            attention pooling with one learned latent query, timm's ``AttentionPoolLatent``, SigLIP's head).
        hidden_dropout_prob: dropout after the attention and MLP output projections (timm's ``proj_drop_rate``).
        attention_probs_dropout_prob: dropout on the attention probabilities (``attn_drop_rate``).
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last (timm's rule).
        pos_dropout_prob: dropout after adding the position embedding (``pos_drop_rate``).
        head_dropout_prob: dropout before the classifier (``drop_rate``).
        initializer_range: std of the truncated-normal init of linear weights and position embeddings.
        hidden_act: the MLP activation; only exact ``"gelu"`` (timm's ``nn.GELU``, ``transformers``' ``"gelu"``).
        attn_backend: ``"sdpa"`` (flash / memory-efficient kernels on GPU) or ``"flex"``; images are never packed.
    """

    model_type = "bioscale_vit"
    # Output fields Trainer.evaluate must not treat as predictions (num_label_tokens is a 0-d count).
    keys_to_ignore_at_inference = ["num_label_tokens"]

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        layer_norm_eps: float = 1e-6,
        class_token: bool = True,
        num_register_tokens: int = 0,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        global_pool: str = "token",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_dropout_prob: float = 0.0,
        head_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        hidden_act: str = "gelu",
        attn_backend: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        if hidden_act != "gelu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported: the ViT MLP uses exact GELU ('gelu')")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r}: expected one of {GLOBAL_POOLS}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs the class token (class_token=True)")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens ({num_register_tokens}) must be >= 0")
        if attn_backend == "varlen":
            raise ValueError("attn_backend='varlen' is for packed sequences; a ViT batch is [B, S]: use 'sdpa' or "
                             "'flex'")
        for name, value in (("hidden_dropout_prob", hidden_dropout_prob),
                            ("attention_probs_dropout_prob", attention_probs_dropout_prob),
                            ("drop_path_rate", drop_path_rate), ("pos_dropout_prob", pos_dropout_prob),
                            ("head_dropout_prob", head_dropout_prob)):  # fmt: skip
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} ({value}) must be in [0, 1)")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.layer_norm_eps = layer_norm_eps
        self.class_token = class_token
        self.num_register_tokens = num_register_tokens
        self.no_embed_class = no_embed_class
        self.pre_norm = pre_norm
        self.final_norm = final_norm
        self.fc_norm = fc_norm
        self.global_pool = global_pool
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.pos_dropout_prob = pos_dropout_prob
        self.head_dropout_prob = head_dropout_prob
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.attn_backend = check_backend_name(attn_backend)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (if any), then the register tokens."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def seq_length(self) -> int:
        """Tokens per image through the blocks: prefix tokens + patches."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final LayerNorm comes after the pooling (timm's ``fc_norm`` rule)."""
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)
