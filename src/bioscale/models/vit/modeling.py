"""The Vision Transformer as ``transformers`` ``PreTrainedModel`` subclasses: a feature extractor (pooled and patch
embeddings) and an image classifier.

Computes the same function as ``timm``'s ``VisionTransformer`` of the same configuration (checked to 1e-4 in float32
by ``tests/models/test_vit.py``, and against ``transformers``' ``ViTForImageClassification`` for the plain subset):

    pixels [B, C, H, W] → Conv2d patch embedding (kernel = stride = patch) → [B, N, D]
    → [class token] + [register tokens] + patches, plus the learned position embedding (over all of them, or over
      the patches only with ``no_embed_class``) → dropout → optional pre-norm
    → pre-norm blocks: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x)))
    → final LayerNorm → pooling (class token, patch mean, or attention pooling with a learned latent query) → the
      fc-norm when it replaces the final one → dropout → classifier.

Attention runs behind :func:`bioscale.models.attention.attention_forward` (``sdpa``: flash or memory-efficient
kernels on GPU, no mask since every image has the same number of tokens). Where bioscale differs from timm
numerically, the code says so; the only difference is structural: the query / key / value weights are one fused
``qkv_proj`` (timm's ``qkv``; ``transformers``' separate ``query`` / ``key`` / ``value`` are concatenated by the
converter).

Transformer blocks are ``model.layers`` on every class; a block is called as
``block(hidden_states [B, S, D], attn_inputs) -> [B, S, D]``, with no host synchronisation and no Python branching on
tensor values, so each block can be wrapped by ``torch.compile``, activation checkpointing or ``fully_shard`` from
outside. Stochastic depth draws its per-image masks from the global torch generator, like dropout.

The ``transformers`` contract (:class:`~bioscale.models.hf_contract.HFContractMixin`) applies as far as an image
classifier has it: ``labels`` is the one label, the loss honours ``Trainer``'s ``num_items_in_batch``, activation
checkpointing keeps module names, ``get_input_embeddings`` is the patch convolution and ``resize_token_embeddings`` is
refused (there is no vocabulary), and the blocks unfuse into ``transformers`` 5's ViT module names for PEFT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from bioscale.constants import IGNORE_INDEX
from bioscale.models.attention import AttentionInputs, attention_forward, padded_attention_inputs
from bioscale.models.batch import input_validation_enabled
from bioscale.models.common import BioscalePreTrainedModel, keep_as_is, reject_unknown_kwargs
from bioscale.models.hf_contract import _WRAPPER_SEGMENT, ForwardOptions, HFContractMixin
from bioscale.models.loss import check_loss_reduction, token_cross_entropy
from bioscale.models.vit.config import VitConfig


@dataclass
class VitModelOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` + ``patch_embeddings``.

    Attributes:
        last_hidden_state: ``[B, S, D]`` every token after the blocks (and the final LayerNorm unless it moved after
            the pooling): class token, register tokens, then the patches in row-major order.
        pooler_output: ``[B, D]`` the pooled image embedding the classifier reads (after the fc-norm if any).
        patch_embeddings: ``[B, N, D]`` the patch tokens of ``last_hidden_state`` (prefix tokens dropped).
    """

    patch_embeddings: torch.Tensor | None = None


@dataclass
class ImageClassifierOutputWithCount(ImageClassifierOutput):
    """``ImageClassifierOutput`` + ``num_label_tokens`` (labelled images the loss summed over; ``None`` without
    labels), the count the training step normalises by."""

    num_label_tokens: torch.Tensor | None = None


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): zero a residual branch per sample with probability ``drop_prob`` and
    scale the kept ones by ``1 / (1 - drop_prob)`` (timm's ``drop_path`` with ``scale_by_keep=True``).

    ``drop_prob`` may be a 0-dim tensor (what :class:`VitBlock` passes): a compiled block then reads the rate as data,
    so blocks with different rates share one compiled graph. A Python float is a constant to Dynamo, and ViT-B's 12
    distinct rates recompiled the block past Dynamo's limit of 8, leaving the last blocks uncompiled."""
    if not training or (not torch.is_tensor(drop_prob) and drop_prob == 0.0):
        return x
    keep_prob = 1.0 - drop_prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=torch.float32)
    mask.bernoulli_(keep_prob)
    return x * (mask / keep_prob).to(x.dtype)


class VitEmbeddings(nn.Module):
    """Patch embedding, class / register tokens and the learned position embedding.

    ``patch_embed`` is timm's ``patch_embed.proj`` (``transformers``: ``patch_embeddings.projection``); with
    ``no_embed_class`` the position embedding has one row per patch and is added before the prefix tokens are
    prepended (DeiT-III / big_vision), otherwise one row per token, added after (original ViT).
    """

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.no_embed_class = config.no_embed_class
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
            bias=not config.pre_norm,  # timm: a pre-norm (CLIP) model has no patch bias
        )  # fmt: skip
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size)) if config.class_token else None
        self.register_tokens = (
            nn.Parameter(torch.empty(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens
            else None
        )
        positions = config.num_patches if config.no_embed_class else config.seq_length
        self.position_embeddings = nn.Parameter(torch.empty(1, positions, config.hidden_size))
        self.dropout = nn.Dropout(config.pos_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Cast like transformers' ViT does, so a model whose weights were cast to bf16 takes float32 pixels.
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [B, D, H/p, W/p]
        hidden_states = patches.flatten(2).transpose(1, 2)  # [B, N, D], row-major patch order
        batch = hidden_states.shape[0]
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.register_tokens) if t is not None]
        if self.no_embed_class:
            hidden_states = hidden_states + self.position_embeddings
            hidden_states = torch.cat([*prefix, hidden_states], dim=1) if prefix else hidden_states
        else:
            hidden_states = torch.cat([*prefix, hidden_states], dim=1) if prefix else hidden_states
            hidden_states = hidden_states + self.position_embeddings
        return self.dropout(hidden_states)


class VitAttention(nn.Module):
    """Self-attention with a fused ``qkv_proj`` (timm's ``qkv``: query, key, value stacked along the output dim),
    optional per-head LayerNorm of queries and keys (``qk_norm``), and ``out_proj`` (timm's ``proj``)."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attn_inputs: AttentionInputs) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        # [B, S, 3, H, Dh] -> q, k, v [B, S, H, Dh] (attention_forward's layout; timm transposes to [B, H, S, Dh]
        # first, the norms over Dh are the same either way).
        q, k, v = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(dim=2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attention_forward(q, k, v, attn_inputs, scale=self.head_dim**-0.5)
        return self.dropout(self.out_proj(out.reshape(batch, seq_len, -1)))


class VitMLP(nn.Module):
    """``down_proj(dropout(gelu(up_proj(x))))`` then dropout: timm's ``Mlp`` (``fc1`` / ``fc2``), which drops out
    after the activation as well as after the output projection (``transformers``' ViT only after the output)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout_prob: float = 0.0) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU through F.gelu, as timm's nn.GELU: the same rounding eager and compiled.
        return self.dropout(self.down_proj(self.dropout(F.gelu(self.up_proj(hidden_states)))))


class VitBlock(nn.Module):
    """Pre-norm block: ``x + drop_path(attn(LN(x)))``, then ``x + drop_path(mlp(LN(x)))`` (timm's ``Block`` without
    LayerScale)."""

    # Adapter (PEFT) layout, bioscale.models.adapters: transformers 5's ViTLayer names (the pinned transformers; 4.x
    # called them query / key / value / attention.output.dense / intermediate.dense / output.dense, and stock 5.x finds
    # none of those either), so ["q_proj", "v_proj"] and ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"] adapt
    # the same linears as on ViTForImageClassification. fc1 / fc2 are timm's names too; timm's fused qkv (one LoRA
    # over all three rows) is the fused layout's qkv_proj, see VitPreTrainedModel._check_peft_configs.
    adapter_layout = {
        "attention.qkv_proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attention.out_proj": ("attention.o_proj",),
        "mlp.up_proj": ("mlp.fc1",),
        "mlp.down_proj": ("mlp.fc2",),
    }

    def __init__(self, config: VitConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VitAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VitMLP(config.hidden_size, config.intermediate_size, config.hidden_dropout_prob)
        self.drop_path_rate = float(drop_path_rate)
        # The rate as data (see drop_path), float32 whatever the model dtype, filled by _init_module; forward reads
        # only the bool, so Dynamo guards on whether the block drops, not on its rate.
        self.use_drop_path = self.drop_path_rate > 0.0
        self.register_buffer("drop_path_prob", torch.empty((), dtype=torch.float32), persistent=False)
        self.reset_drop_path_prob()

    @torch.no_grad()
    def reset_drop_path_prob(self) -> None:
        if self.drop_path_prob.device.type != "meta":
            self.drop_path_prob.fill_(self.drop_path_rate)

    def materialize_buffers(self, device: torch.device) -> None:
        """Allocate and fill ``drop_path_prob`` on ``device`` (as ``RotaryEmbedding.materialize_buffers``)."""
        self.drop_path_prob = torch.empty((), dtype=torch.float32, device=device)
        self.reset_drop_path_prob()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        before = self.drop_path_prob
        super()._apply(fn, recurse)
        if self.drop_path_prob.dtype != torch.float32:  # model.to(bf16): 0.1 would become 0.10009765625
            if before.dtype == torch.float32 and before.device == self.drop_path_prob.device:
                self.drop_path_prob = before  # same device: keep the tensor (as RotaryEmbedding._apply, which says why)
            else:
                self.drop_path_prob = torch.empty((), dtype=torch.float32, device=self.drop_path_prob.device)
                self.reset_drop_path_prob()
        return self

    def forward(self, hidden_states: torch.Tensor, attn_inputs: AttentionInputs) -> torch.Tensor:
        rate = self.drop_path_prob if self.use_drop_path else 0.0
        attn_out = self.attention(self.attention_norm(hidden_states), attn_inputs)
        hidden_states = hidden_states + drop_path(attn_out, rate, self.training)
        mlp_out = self.mlp(self.mlp_norm(hidden_states))
        return hidden_states + drop_path(mlp_out, rate, self.training)

    def extra_repr(self) -> str:
        return f"drop_path_rate={self.drop_path_rate}"


class VitAttentionPool(nn.Module):
    """Multi-head attention pooling with one learned latent query (timm's ``AttentionPoolLatent``; SigLIP's "MAP"
    head): ``h = proj(attn(q(latent), kv(patches)))``, then ``h + mlp(LN(h))``; returns ``[B, D]``.

    It pools the patch tokens only (timm's ``pool_include_prefix=False``): neither the class token nor the registers
    are keys. No mask, so attention is SDPA whatever the blocks' backend.
    """

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.latent = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VitMLP(config.hidden_size, config.intermediate_size)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        batch, num_patches, _ = patch_tokens.shape
        q = self.q_proj(self.latent.expand(batch, -1, -1)).view(batch, 1, self.num_heads, self.head_dim)
        k, v = self.kv_proj(patch_tokens).view(batch, num_patches, 2, self.num_heads, self.head_dim).unbind(dim=2)
        out = attention_forward(q, k, v, AttentionInputs(backend="sdpa", causal=False), scale=self.head_dim**-0.5)
        pooled = self.out_proj(out.reshape(batch, 1, -1))
        pooled = pooled + self.mlp(self.mlp_norm(pooled))
        return pooled[:, 0]


# timm's names for a block's linears that the unfused layout cannot carry, with what targets the same modules here.
_TIMM_ONLY_TARGETS = {
    "qkv": "qkv_proj on the fused model (one LoRA over the query, key and value rows, as timm's qkv)",
    "proj": "out_proj on the fused model, or o_proj on the unfused one",
}


class VitPreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = VitConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    _no_split_modules = ["VitBlock"]
    # Trainer's num_items_in_batch (the labelled images of the accumulated step) normalises the summed loss, as
    # ViTForImageClassification's loss (fixed_cross_entropy) does: the same numbers also when micro-batches hold
    # different numbers of labelled images (-100 labels, a short last batch), where a mean of micro-batch means
    # differs. bioscale's own loop normalises with loss_reduction="sum" and num_label_tokens instead.
    accepts_loss_kwargs = True
    # An image forward has no packing (seq_idx) and no token-level head (logits_on_labels_only): both are refused.
    forward_options = ("num_items_in_batch",)

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        """timm's default (``weight_init=''``) initialisation: linear weights and the position embedding
        ~ truncated normal(0, ``initializer_range``), biases zero, class and register tokens ~ normal(0, 1e-6), the
        pooling latent ~ truncated normal(0, D^-0.5), the patch convolution PyTorch's default (timm leaves it),
        LayerNorms one / zero."""
        std = self.initializer_range
        if isinstance(module, nn.Linear):
            if not keep_as_is(module.weight, only_missing):
                nn.init.trunc_normal_(module.weight, std=std)
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            if not keep_as_is(module.weight, only_missing):
                module.reset_parameters()  # fills weight and bias
        elif isinstance(module, VitEmbeddings):
            if not keep_as_is(module.position_embeddings, only_missing):
                nn.init.trunc_normal_(module.position_embeddings, std=std)
            for token in (module.cls_token, module.register_tokens):
                if not keep_as_is(token, only_missing):
                    nn.init.normal_(token, std=1e-6)
        elif isinstance(module, VitBlock):
            module.reset_drop_path_prob()  # a non-persistent buffer: derived from the config, never loaded
        elif isinstance(module, VitAttentionPool):
            if not keep_as_is(module.latent, only_missing):
                nn.init.trunc_normal_(module.latent, std=module.latent.shape[-1] ** -0.5)
        else:
            super()._init_module(module, only_missing)  # LayerNorm

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Refused: a ViT reads pixels through a patch convolution and has no vocabulary to resize."""
        raise ValueError(
            f"{type(self).__name__} has no vocabulary to resize: its input embedding is the patch convolution "
            "(get_input_embeddings()); change num_labels for a new classifier instead"
        )

    def _check_peft_configs(self, configs: Mapping[str, Any]) -> None:
        """The mixin's check, then a ``ValueError`` for a target name that matches no module while others did.

        PEFT refuses a list that matches nothing, but adapts the rest of one that matches in part: timm's
        ``["qkv", "fc1", "fc2"]`` on the unfused layout would adapt the MLP alone (as it does on
        ``ViTForImageClassification``, which has no ``qkv`` either).
        """
        requested = {adapter: getattr(config, "target_modules", None) for adapter, config in configs.items()}
        super()._check_peft_configs(configs)  # first: on a fused model its "unfuse first" is the better message
        # Pinned full paths (the mixin's) leave out the segment a checkpoint-wrapped block adds.
        names = {form for name, _ in self.named_modules() for form in (name, name.replace(_WRAPPER_SEGMENT, ""))}
        for adapter, targets in requested.items():
            if not isinstance(targets, (list, set, tuple)):
                continue  # None (the registered default) or a regular expression
            missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
            if missing:
                hints = "; ".join(f"timm's {t!r} is {_TIMM_ONLY_TARGETS[t]}" for t in missing
                                  if t in _TIMM_ONLY_TARGETS)  # fmt: skip
                raise ValueError(
                    f"adapter {adapter!r} targets {missing}, which name no module of this {type(self).__name__}, so "
                    f"only the rest of its list was adapted{': ' + hints if hints else ''}. The model now carries a "
                    "partial adapter: rebuild it."
                )

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """``ValueError`` unless ``pixel_values`` is a float ``[B, num_channels, image_size, image_size]`` tensor
        (shape checks only: no host sync)."""
        config: VitConfig = self.config
        if pixel_values is None:
            raise ValueError(f"{type(self).__name__} needs pixel_values")
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [batch, {expected[0]}, {expected[1]}, {expected[2]}] (channels first, the "
                f"model's image_size); got {tuple(pixel_values.shape)}: resize the images with the model's image "
                "processor"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (normalised pixels), got {pixel_values.dtype}")
        return pixel_values


class VitModel(VitPreTrainedModel):
    """The ViT feature extractor: ``forward`` returns :class:`VitModelOutput` (all tokens, the pooled embedding the
    classifier reads, and the patch tokens)."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__(config)
        self.embeddings = VitEmbeddings(config)
        self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else None
        # Stochastic depth rises linearly from 0 at the first block (timm's calculate_drop_path_rates).
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList([VitBlock(config, rate) for rate in rates])
        use_final = config.final_norm and not config.use_fc_norm
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final else None
        self.attn_pool = VitAttentionPool(config) if config.global_pool == "map" else None
        use_fc = config.final_norm and config.use_fc_norm
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_fc else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Conv2d:
        # The patch convolution, the module ViTModel.get_input_embeddings() wraps (ViTPatchEmbeddings.projection).
        return self.embeddings.patch_embed

    def set_input_embeddings(self, value: nn.Conv2d) -> None:
        self.embeddings.patch_embed = value

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every token after the blocks and the final LayerNorm (if it sits there): ``[B, S, D]``."""
        hidden_states = self.embeddings(pixel_values)
        if self.pre_norm is not None:
            hidden_states = self.pre_norm(hidden_states)
        attn_inputs = padded_attention_inputs(
            backend=self.config.attn_backend, causal=False, attention_mask=None, query_length=hidden_states.shape[1],
            batch_size=hidden_states.shape[0], device=hidden_states.device,
            dropout_p=self.config.attention_probs_dropout_prob if self.training else 0.0,
        )  # fmt: skip
        for block in self.layers:
            hidden_states = block(hidden_states, attn_inputs)
        return self.norm(hidden_states) if self.norm is not None else hidden_states

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The pooled embedding ``[B, D]`` of ``encode``'s output (then the fc-norm, when it replaces the final)."""
        patches = hidden_states[:, self.config.num_prefix_tokens :]
        if self.attn_pool is not None:
            pooled = self.attn_pool(patches)
        elif self.config.global_pool == "avg":
            pooled = patches.mean(dim=1)
        else:
            pooled = hidden_states[:, 0]  # the class token
        return self.fc_norm(pooled) if self.fc_norm is not None else pooled

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> VitModelOutput:
        reject_unknown_kwargs(type(self).__name__, kwargs)
        hidden_states = self.encode(self._check_pixel_values(pixel_values))
        return VitModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=self.pool(hidden_states),
            patch_embeddings=hidden_states[:, self.config.num_prefix_tokens :],
        )


class VitForImageClassification(VitPreTrainedModel):
    """ViT with a linear classifier on the pooled embedding (timm's ``head``, after ``head_drop``).

    ``labels`` are class ids ``[B]`` (``-100``: not scored); the loss is cross-entropy, the mean over labelled
    images or their sum (``loss_reduction="sum"``, with ``num_label_tokens`` for the global normalisation of the
    training step). Single-label classification only: another ``problem_type`` is refused.
    """

    def __init__(self, config: VitConfig) -> None:
        super().__init__(config)
        if config.problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"problem_type={config.problem_type!r}: VitForImageClassification trains single-label classification"
            )
        self.num_labels = config.num_labels
        self.vit = VitModel(config)
        self.dropout = nn.Dropout(config.head_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks of the base model (for FSDP / activation checkpointing / compile / FP8)."""
        return self.vit.layers

    def get_input_embeddings(self) -> nn.Conv2d:
        return self.vit.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Conv2d) -> None:
        self.vit.set_input_embeddings(value)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> ImageClassifierOutputWithCount:
        """Image classification; ``num_items_in_batch`` (keyword, in ``kwargs``): ``Trainer``'s count of labelled
        images over the accumulated step, the loss is then the sum of image losses divided by it."""
        options = ForwardOptions(num_items_in_batch=kwargs.pop("num_items_in_batch", None))
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        hidden_states = self.vit.encode(self._check_pixel_values(pixel_values))
        logits = self.classifier(self.dropout(self.vit.pool(hidden_states)))
        loss = count = None
        if labels is not None:
            labels = self._check_labels(labels, logits.shape[0])
            loss_sum, count = token_cross_entropy(logits, labels.to(logits.device), reduction="sum")
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return ImageClassifierOutputWithCount(loss=loss, logits=logits, num_label_tokens=count)

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(f"labels must be integer class ids of shape [{batch}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")  # fmt: skip
        if input_validation_enabled():  # a host sync: the trainer checks its first step's batches only
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_labels))
            if bool(bad.any()):
                raise ValueError(
                    f"labels hold class ids outside [0, {self.num_labels}) (and not {IGNORE_INDEX}): "
                    f"{sorted(set(labels[bad].tolist()))[:5]}"
                )
        return labels
