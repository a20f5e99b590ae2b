"""Exact conversion between bioscale's ViT and ``timm``'s ``VisionTransformer`` (every configuration bioscale builds)
and ``transformers``' ``ViTModel`` / ``ViTForImageClassification`` (the plain subset), in both directions.

- :func:`from_timm` / :func:`to_timm`: a ``timm.models.vision_transformer.VisionTransformer`` (``timm`` is the
  ``bioscale[vit]`` extra, imported only here, only when called). Its settings are read from the module itself
  (:func:`config_from_timm`); a timm model that uses something bioscale does not implement (LayerScale, patch dropout,
  rotary / no position embedding, dynamic image size, another norm, activation or block class, a prefix-including or
  multi-query attention pool) is refused with ``ValueError`` naming the setting.
- :func:`from_hf` / :func:`to_hf`: ``transformers``' ViT, which has one class token, no registers, no QK-norm, the
  final LayerNorm before the head and class-token pooling. :func:`hf_unsupported` says which fields of a bioscale
  config stop it from being expressed there (the exporter writes no ``final_model_hf`` for those); ``to_hf`` of such a
  model raises ``ValueError`` with the same reasons.

One name map per format (timm → bioscale, ``transformers`` → bioscale); the reverse maps are the inversions. The
only layout difference is the attention input projection: timm's ``qkv`` *is* bioscale's ``qkv_proj``, ``transformers``'
separate query / key / value projections are concatenated in that order and split back (under either of the two
names ``transformers`` has used: 4.x's ``encoder.layer.N.attention.attention.query``, 5.x's
``layers.N.attention.q_proj``; :class:`_HFLayout`). Every tensor survives
``timm → bioscale → timm`` and ``transformers → bioscale → transformers`` bit for bit.

Dropout settings travel where the other side has them. ``transformers``' ViT has no stochastic depth and no
classifier dropout (``to_hf`` drops ``drop_path_rate`` / ``head_dropout_prob`` with a warning: inference is
unchanged), and applies ``hidden_dropout_prob`` to the embeddings as well (read back as ``pos_dropout_prob``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTForImageClassification, ViTModel

from bioscale.models.hf_utils import build_bioscale_from_state_dict, build_hf_from_state_dict, require
from bioscale.models.vit.config import VitConfig
from bioscale.models.vit.modeling import VitForImageClassification, VitModel, VitPreTrainedModel

_CLASSIFICATION_FIELDS = ("id2label", "label2id")

# ---- timm ----------------------------------------------------------------------------------------------------------
# timm name -> bioscale name, for tensors outside the blocks (base-model names; heads add "vit." / "classifier.").
_TIMM_TOP: dict[str, str] = {
    "patch_embed.proj": "embeddings.patch_embed",
    "cls_token": "embeddings.cls_token",
    "reg_token": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "norm_pre": "pre_norm",
    "norm": "norm",
    "fc_norm": "fc_norm",
    "attn_pool.latent": "attn_pool.latent",
    "attn_pool.q": "attn_pool.q_proj",
    "attn_pool.kv": "attn_pool.kv_proj",
    "attn_pool.proj": "attn_pool.out_proj",
    "attn_pool.norm": "attn_pool.mlp_norm",
    "attn_pool.mlp.fc1": "attn_pool.mlp.up_proj",
    "attn_pool.mlp.fc2": "attn_pool.mlp.down_proj",
}
# timm module inside ``blocks.N`` -> bioscale module inside ``layers.N``.
_TIMM_BLOCK: dict[str, str] = {
    "norm1": "attention_norm",
    "attn.qkv": "attention.qkv_proj",
    "attn.q_norm": "attention.q_norm",
    "attn.k_norm": "attention.k_norm",
    "attn.proj": "attention.out_proj",
    "norm2": "mlp_norm",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
}
_TIMM_HEAD = ("head", "classifier")


def _rename(name: str, top: Mapping[str, str], block: Mapping[str, str], block_from: str, block_to: str) -> str | None:
    """``name`` under the maps (``None`` if it is not covered): whole names or ``<module>.<weight|bias>``."""
    if name in top:
        return top[name]
    module, _, leaf = name.rpartition(".")
    if module in top:
        return f"{top[module]}.{leaf}"
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == block_from and parts[1].isdigit():
        inner = ".".join(parts[2:-1])
        if inner in block:
            return f"{block_to}.{parts[1]}.{block[inner]}.{parts[-1]}"
    return None


def _inverted(mapping: Mapping[str, str]) -> dict[str, str]:
    inverse = {value: key for key, value in mapping.items()}
    assert len(inverse) == len(mapping), "a name map must be one to one"
    return inverse


def _map_state(
    state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        new = rename(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(f"{what}: tensors bioscale has no place for: {sorted(unknown)[:8]}")
    return out


def _timm_to_bioscale_name(name: str, *, with_head: bool) -> str | None:
    if name.startswith(f"{_TIMM_HEAD[0]}."):
        return f"{_TIMM_HEAD[1]}.{name.split('.', 1)[1]}" if with_head else None
    base = _rename(name, _TIMM_TOP, _TIMM_BLOCK, "blocks", "layers")
    if base is None:
        return None
    return f"vit.{base}" if with_head else base


def _bioscale_to_timm_name(name: str, *, with_head: bool) -> str | None:
    if with_head:
        if name.startswith(f"{_TIMM_HEAD[1]}."):
            return f"{_TIMM_HEAD[0]}.{name.split('.', 1)[1]}"
        if not name.startswith("vit."):
            return None
        name = name[len("vit.") :]
    return _rename(name, _inverted(_TIMM_TOP), _inverted(_TIMM_BLOCK), "layers", "blocks")


def _import_timm() -> Any:
    try:
        import timm.models.vision_transformer as vision_transformer
    except ImportError as err:
        raise ImportError(
            f"converting to or from timm needs the timm package: pip install 'bioscale[vit]' ({err})"
        ) from err
    return vision_transformer


def _square(value: Any, what: str) -> int:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    require(len(pair) == 2 and pair[0] == pair[1], f"timm {what}={pair}: bioscale's ViT takes square {what}s")
    return int(pair[0])


def config_from_timm(timm_model: nn.Module, **overrides: Any) -> VitConfig:
    """The :class:`VitConfig` of a timm ``VisionTransformer``, read from its modules (``ValueError`` naming any setting
    bioscale does not implement). ``overrides`` set bioscale-only fields (``attn_backend``) or class names
    (``id2label``)."""
    vt = _import_timm()
    require(isinstance(timm_model, vt.VisionTransformer),
            f"{type(timm_model).__name__} is not a timm VisionTransformer")  # fmt: skip
    from timm.layers import Attention, AttentionPoolLatent, Mlp
    from timm.layers import LayerNorm as TimmLayerNorm

    blocks = list(timm_model.blocks)
    require(len(blocks) > 0, "timm VisionTransformer without blocks")
    first = blocks[0]
    identity = nn.Identity

    def is_layer_norm(module: nn.Module) -> bool:
        return type(module) in (nn.LayerNorm, TimmLayerNorm) and module.elementwise_affine and module.bias is not None

    pool = timm_model.attn_pool
    norms = [m for b in blocks for m in (b.norm1, b.norm2, b.attn.q_norm, b.attn.k_norm)]
    norms += [timm_model.norm_pre, timm_model.norm, timm_model.fc_norm, getattr(pool, "norm", None)]
    norms = [m for m in norms if m is not None and not isinstance(m, nn.Identity)]

    checks = {
        "block class (only timm's Block)": all(type(b) is vt.Block for b in blocks),
        "attention class (only timm's Attention)": all(type(b.attn) is Attention for b in blocks),
        "LayerScale (init_values)": all(isinstance(b.ls1, identity) and isinstance(b.ls2, identity) for b in blocks),
        "attention output norm (scale_attn_norm)": isinstance(getattr(first.attn, "norm", identity()), identity),
        "MLP norm (scale_mlp_norm)": isinstance(getattr(first.mlp, "norm", identity()), identity),
        "gated attention": getattr(first.attn, "gate", None) is None,
        "MLP class (only timm's Mlp with exact GELU)": all(
            type(b.mlp) is Mlp and type(b.mlp.act) is nn.GELU and b.mlp.act.approximate == "none"
            for b in blocks
        ),
        "norm layers (only LayerNorm with a bias, one epsilon)": all(map(is_layer_norm, norms))
        and len({m.eps for m in norms}) == 1,
        "projection biases (proj_bias=False)": first.attn.proj.bias is not None and first.mlp.fc1.bias is not None,
        "patch dropout (patch_drop_rate)": isinstance(timm_model.patch_drop, identity),
        "dynamic image size (dynamic_img_size)": not timm_model.dynamic_img_size,
        "position embedding other than 'learn'": timm_model.pos_embed is not None,
        "patch-embedding norm (embed_norm_layer)": isinstance(timm_model.patch_embed.norm, identity),
        "pooling that includes the prefix tokens (pool_include_prefix)": not getattr(
            timm_model, "pool_include_prefix", False
        ),
        f"global_pool={timm_model.global_pool!r} (bioscale: token, avg, map)": timm_model.global_pool
        in ("token", "avg", "map"),
    }
    refused = [what for what, ok in checks.items() if not ok]
    require(not refused, f"timm VisionTransformer uses settings bioscale does not implement: {refused}")
    if pool is not None:
        require(isinstance(pool, AttentionPoolLatent) and pool.latent_len == 1 and pool.pos_embed is None
                and isinstance(pool.q_norm, identity) and pool.pool == "token" and pool.mlp is not None,
                "timm attention pool: bioscale implements one latent query, no position embedding, no QK-norm, "
                "token pooling")  # fmt: skip
        require(pool.mlp.fc1.out_features == first.mlp.fc1.out_features,
                "timm attention pool MLP width differs from the blocks' (mlp_ratio)")  # fmt: skip
    has_norm = not isinstance(timm_model.norm, identity)
    has_fc_norm = not isinstance(timm_model.fc_norm, identity)
    pre_norm = not isinstance(timm_model.norm_pre, identity)
    drop_path = blocks[-1].drop_path1
    values: dict[str, Any] = dict(
        image_size=_square(timm_model.patch_embed.img_size, "image size"),
        patch_size=_square(timm_model.patch_embed.patch_size, "patch size"),
        num_channels=timm_model.patch_embed.proj.in_channels,
        hidden_size=timm_model.embed_dim,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        intermediate_size=first.mlp.fc1.out_features,
        qkv_bias=first.attn.qkv.bias is not None,
        qk_norm=not isinstance(first.attn.q_norm, identity),
        layer_norm_eps=first.norm1.eps,
        class_token=timm_model.cls_token is not None,
        num_register_tokens=timm_model.num_reg_tokens,
        no_embed_class=timm_model.no_embed_class,
        pre_norm=pre_norm,
        final_norm=has_norm or has_fc_norm,
        fc_norm=True if has_fc_norm else (False if has_norm else None),
        global_pool=timm_model.global_pool,
        hidden_dropout_prob=first.attn.proj_drop.p,
        attention_probs_dropout_prob=first.attn.attn_drop.p,
        drop_path_rate=0.0 if isinstance(drop_path, identity) else float(drop_path.drop_prob),
        pos_dropout_prob=timm_model.pos_drop.p,
        head_dropout_prob=timm_model.head_drop.p,
    )
    if timm_model.num_classes > 0:
        values["num_labels"] = timm_model.num_classes
    return VitConfig(**{**values, **overrides})


def to_timm(model: VitPreTrainedModel) -> nn.Module:
    """The timm ``VisionTransformer`` with exactly ``model``'s weights: :class:`VitForImageClassification` → a model
    with ``head``, :class:`VitModel` → ``num_classes=0`` (no head). In eval mode, on ``model``'s device and dtype."""
    vt = _import_timm()
    config: VitConfig = model.config
    with_head = isinstance(model, VitForImageClassification)
    require(with_head or isinstance(model, VitModel), f"{type(model).__name__} is not a bioscale ViT")
    mlp_ratio = config.intermediate_size / config.hidden_size
    require(int(config.hidden_size * mlp_ratio) == config.intermediate_size,
            f"intermediate_size={config.intermediate_size} is not int(hidden_size * mlp_ratio) for any float "
            "mlp_ratio timm could be given")  # fmt: skip
    from timm.layers import LayerNorm as TimmLayerNorm

    kwargs: dict[str, Any] = dict(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=config.num_channels,
        num_classes=config.num_labels if with_head else 0, global_pool=config.global_pool,
        embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=mlp_ratio, qkv_bias=config.qkv_bias, qk_norm=config.qk_norm, class_token=config.class_token,
        no_embed_class=config.no_embed_class, reg_tokens=config.num_register_tokens, pre_norm=config.pre_norm,
        final_norm=config.final_norm, fc_norm=config.fc_norm, drop_rate=config.head_dropout_prob,
        pos_drop_rate=config.pos_dropout_prob, proj_drop_rate=config.hidden_dropout_prob,
        attn_drop_rate=config.attention_probs_dropout_prob, drop_path_rate=config.drop_path_rate,
        norm_layer=partial(TimmLayerNorm, eps=config.layer_norm_eps), weight_init="skip",
    )  # fmt: skip
    param = next(model.parameters())
    with torch.device("meta"):
        timm_model = vt.VisionTransformer(**kwargs)
    state = _map_state(model.state_dict(), partial(_bioscale_to_timm_name, with_head=with_head), "bioscale ViT")
    expected = set(timm_model.state_dict())
    require(set(state) == expected, f"timm model does not fit: missing {sorted(expected - set(state))[:5]}, "
                                    f"unexpected {sorted(set(state) - expected)[:5]}")  # fmt: skip
    timm_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    return timm_model.to(device=param.device, dtype=param.dtype).eval()


def from_timm(timm_model: nn.Module, **config_overrides: Any) -> VitPreTrainedModel:
    """bioscale ViT with the weights of a timm ``VisionTransformer`` (copied): a model with a classifier head
    (``num_classes > 0``) → :class:`VitForImageClassification`, one without (``num_classes=0``) → :class:`VitModel`.
    ``config_overrides``: bioscale-only fields (``attn_backend``) and class names (``id2label``)."""
    config = config_from_timm(timm_model, **config_overrides)
    with_head = timm_model.num_classes > 0
    state = _map_state(timm_model.state_dict(), partial(_timm_to_bioscale_name, with_head=with_head),
                       "timm VisionTransformer")  # fmt: skip
    cls = VitForImageClassification if with_head else VitModel
    return build_bioscale_from_state_dict(cls, config, state)


# ---- transformers --------------------------------------------------------------------------------------------------
# transformers name (inside ViTModel) -> bioscale name (inside VitModel), outside the blocks.
_HF_TOP: dict[str, str] = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection": "embeddings.patch_embed",
    "layernorm": "norm",
}


@dataclass(frozen=True)
class _HFLayout:
    """Where ``transformers`` keeps a ViT block's tensors: 5.x renamed them (``layers.N.attention.q_proj``, ``mlp.fc1``)
    from 4.x's BERT-style names (``encoder.layer.N.attention.attention.query``, ``intermediate.dense``); checkpoints on
    disk keep the 4.x names either way (5.x maps them while loading), so only in-memory models differ."""

    blocks: str  # prefix of block N: f"{blocks}.{N}."
    qkv: tuple[str, str, str]  # modules whose rows are qkv_proj's, in order
    block: dict[str, str]  # other modules of a block -> bioscale module


_HF_LAYOUTS = (
    _HFLayout("layers", ("attention.q_proj", "attention.k_proj", "attention.v_proj"), {
        "layernorm_before": "attention_norm", "attention.o_proj": "attention.out_proj",
        "layernorm_after": "mlp_norm", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
    }),
    _HFLayout("encoder.layer", ("attention.attention.query", "attention.attention.key", "attention.attention.value"), {
        "layernorm_before": "attention_norm", "attention.output.dense": "attention.out_proj",
        "layernorm_after": "mlp_norm", "intermediate.dense": "mlp.up_proj", "output.dense": "mlp.down_proj",
    }),
)  # fmt: skip


def _layout_of(names: Iterable[str], prefix: str) -> _HFLayout:
    """The layout whose first block's query projection is among ``names`` (a state dict's keys)."""
    names = set(names)
    for layout in _HF_LAYOUTS:
        if f"{prefix}{layout.blocks}.0.{layout.qkv[0]}.weight" in names:
            return layout
    raise ValueError(f"unrecognised transformers ViT layout (no query projection among {sorted(names)[:6]} ...)")


@functools.cache
def _installed_hf_layout() -> _HFLayout:
    """The layout of the installed ``transformers`` (read off a tiny ``ViTModel`` built on meta)."""
    tiny = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, image_size=4,
                     patch_size=2)  # fmt: skip
    with torch.device("meta"):
        return _layout_of(ViTModel(tiny, add_pooling_layer=False).state_dict(), "")


def hf_unsupported(config: VitConfig) -> str | None:
    """Why ``config`` has no ``transformers`` ``ViT`` counterpart (the fields and values, joined), or ``None``."""
    required = {
        "class_token": True, "num_register_tokens": 0, "qk_norm": False, "no_embed_class": False, "pre_norm": False,
        "final_norm": True, "use_fc_norm": False, "global_pool": "token",
    }  # fmt: skip
    reasons = [f"{key}={getattr(config, key)!r}" for key, value in required.items() if getattr(config, key) != value]
    if not reasons:
        return None
    return ("transformers' ViT has one class token, no registers, no QK-norm, position embeddings over every token, "
            f"the final LayerNorm before the head and class-token pooling; this config has {', '.join(reasons)}")


def config_to_hf(config: VitConfig) -> ViTConfig:
    """The ``transformers`` ``ViTConfig`` of ``config`` (``ValueError`` with :func:`hf_unsupported`'s reasons)."""
    reason = hf_unsupported(config)
    require(reason is None, f"cannot convert to transformers: {reason}")
    dropped = {k: getattr(config, k) for k in ("drop_path_rate", "head_dropout_prob") if getattr(config, k)}
    if config.pos_dropout_prob != config.hidden_dropout_prob:
        dropped["pos_dropout_prob"] = config.pos_dropout_prob
    if dropped:
        warnings.warn(f"transformers' ViT has no setting for {dropped} (training-time only; inference is unchanged): "
                      "dropped", stacklevel=3)  # fmt: skip
    extra = {k: getattr(config, k) for k in _CLASSIFICATION_FIELDS if getattr(config, k, None) is not None}
    return ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps, image_size=config.image_size,
        patch_size=config.patch_size, num_channels=config.num_channels, qkv_bias=config.qkv_bias,
        num_labels=config.num_labels, **extra,
    )  # fmt: skip


def config_from_hf(hf_config: PretrainedConfig, **overrides: Any) -> VitConfig:
    """The :class:`VitConfig` of a ``transformers`` ``ViTConfig`` (``ValueError`` for an activation other than exact
    GELU, or a non-square image / patch size)."""
    require(getattr(hf_config, "model_type", None) == "vit", f"not a transformers ViT config: {type(hf_config)}")
    require(hf_config.hidden_act == "gelu", f"hidden_act={hf_config.hidden_act!r}: bioscale's ViT uses exact GELU")
    values: dict[str, Any] = dict(
        image_size=_square(hf_config.image_size, "image size"), patch_size=_square(hf_config.patch_size, "patch size"),
        num_channels=hf_config.num_channels, hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size, qkv_bias=hf_config.qkv_bias,
        layer_norm_eps=hf_config.layer_norm_eps, class_token=True, num_register_tokens=0, global_pool="token",
        final_norm=True, fc_norm=False, hidden_dropout_prob=hf_config.hidden_dropout_prob,
        attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
        pos_dropout_prob=hf_config.hidden_dropout_prob, initializer_range=hf_config.initializer_range,
        num_labels=hf_config.num_labels,
    )  # fmt: skip
    for key in _CLASSIFICATION_FIELDS:
        if getattr(hf_config, key, None) is not None:
            values[key] = getattr(hf_config, key)
    return VitConfig(**{**values, **overrides})


def _hf_base_to_bioscale(
    hf_state: Mapping[str, torch.Tensor], prefix: str, config: VitConfig
) -> dict[str, torch.Tensor]:
    layout = _layout_of(hf_state, prefix)
    qkv_modules = {f"{layout.blocks}.{i}.{m}" for i in range(config.num_hidden_layers) for m in layout.qkv}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        skipped = name.startswith(f"{prefix}pooler.") or name == f"{prefix}embeddings.mask_token"
        if not name.startswith(prefix) or skipped:
            continue
        inner = name[len(prefix) :]
        if inner.rpartition(".")[0] in qkv_modules:
            continue  # query / key / value: fused below
        new = _rename(inner, _HF_TOP, {}, "", "")
        if new is None and inner.startswith(f"{layout.blocks}."):
            index, _, rest = inner[len(layout.blocks) + 1 :].partition(".")
            new = _rename(f"blocks.{index}.{rest}", {}, layout.block, "blocks", "layers")
        if new is None:
            raise ValueError(f"transformers ViT tensor {name} has no place in bioscale's ViT")
        state[new] = tensor
    for index in range(config.num_hidden_layers):
        for leaf in ("weight", "bias") if config.qkv_bias else ("weight",):
            state[f"layers.{index}.attention.qkv_proj.{leaf}"] = torch.cat(
                [hf_state[f"{prefix}{layout.blocks}.{index}.{module}.{leaf}"] for module in layout.qkv], dim=0
            )
    return state


def _bioscale_base_to_hf(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    layout = _installed_hf_layout()
    top, block = _inverted(_HF_TOP), _inverted(layout.block)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "layers" and ".attention.qkv_proj." in name:
            for module, piece in zip(layout.qkv, tensor.chunk(3, dim=0)):
                out[f"{prefix}{layout.blocks}.{parts[1]}.{module}.{parts[-1]}"] = piece
            continue
        if parts[0] == "layers":
            new = _rename(name, {}, block, "layers", layout.blocks)
        else:
            new = _rename(name, top, {}, "", "")
        if new is None:
            raise ValueError(f"bioscale ViT tensor {name} has no place in transformers' ViT")
        out[f"{prefix}{new}"] = tensor
    return out


def from_hf(hf_model: PreTrainedModel, **config_overrides: Any) -> VitPreTrainedModel:
    """bioscale ViT with the weights of ``hf_model`` (copied): ``ViTForImageClassification`` →
    :class:`VitForImageClassification`, ``ViTModel`` → :class:`VitModel` (its pooler, which bioscale has no
    counterpart for, is dropped with a warning). ``config_overrides`` set bioscale-only fields (``attn_backend``)."""
    config = config_from_hf(hf_model.config, **config_overrides)
    hf_state = hf_model.state_dict()
    if isinstance(hf_model, ViTForImageClassification):
        require(isinstance(hf_model.classifier, nn.Linear),
                "ViTForImageClassification without a classifier (num_labels=0): convert its ViTModel (hf_model.vit)")
        state = {f"vit.{k}": v for k, v in _hf_base_to_bioscale(hf_state, "vit.", config).items()}
        state["classifier.weight"] = hf_state["classifier.weight"]
        state["classifier.bias"] = hf_state["classifier.bias"]
        return build_bioscale_from_state_dict(VitForImageClassification, config, state)
    if isinstance(hf_model, ViTModel):
        if getattr(hf_model, "pooler", None) is not None:
            warnings.warn(
                "ViTModel's pooler (dense + tanh) is dropped: bioscale's VitModel pools without one (build the "
                "transformers model with add_pooling_layer=False for an exact round trip)",
                stacklevel=2,
            )
        return build_bioscale_from_state_dict(VitModel, config, _hf_base_to_bioscale(hf_state, "", config))
    raise ValueError(f"{type(hf_model).__name__} is not supported; convert ViTForImageClassification or ViTModel")


def to_hf(model: VitPreTrainedModel) -> PreTrainedModel:
    """The ``transformers`` model with exactly ``model``'s weights: :class:`VitForImageClassification` →
    ``ViTForImageClassification``, :class:`VitModel` → ``ViTModel(add_pooling_layer=False)``; ``ValueError`` for a
    configuration ``transformers`` cannot express (:func:`hf_unsupported`)."""
    config: VitConfig = model.config
    hf_config = config_to_hf(config)
    state = model.state_dict()
    if isinstance(model, VitForImageClassification):
        base = {k[len("vit.") :]: v for k, v in state.items() if k.startswith("vit.")}
        hf_state = _bioscale_base_to_hf(base, "vit.")
        hf_state["classifier.weight"] = state["classifier.weight"]
        hf_state["classifier.bias"] = state["classifier.bias"]
        return build_hf_from_state_dict(ViTForImageClassification, hf_config, hf_state).eval()
    if isinstance(model, VitModel):
        factory = partial(ViTModel, add_pooling_layer=False)
        return build_hf_from_state_dict(factory, hf_config, _bioscale_base_to_hf(state, "")).eval()
    raise ValueError(f"{type(model).__name__} is not a bioscale ViT")


def flops_per_image(config: VitConfig) -> float:
    """Training FLOPs of one image (forward + backward = 3x forward, every matmul counted at 2 FLOPs per MAC):

    ``6 * (S * N_blocks + N_patch_embed * P + N_pool + N_head) + 12 * L * D * S^2``, with ``S`` tokens per image
    (:attr:`VitConfig.seq_length`), ``N_blocks`` the q/k/v/out and MLP weights of the blocks, ``N_patch_embed * P``
    the patch projection over the ``P`` patches, ``N_pool`` the attention pool's matrices (its latent query is one
    token; its key/value projection runs over the ``P`` patches), and the attention term PaLM's (q k^T and attn v,
    bidirectional). Norms, softmax and the GELU are not counted (as for the sequence families).
    """
    hidden, inter, seq = config.hidden_size, config.intermediate_size, config.seq_length
    patches = config.num_patches
    per_block = 4 * hidden * hidden + 2 * hidden * inter
    blocks = config.num_hidden_layers * per_block * seq
    patch_embed = config.num_channels * config.patch_size**2 * hidden * patches
    pool = 0
    if config.global_pool == "map":
        # q (1 token), kv (P tokens), out (1 token), the pool MLP (1 token); attention of 1 query over P keys.
        pool = hidden * hidden + 2 * hidden * hidden * patches + hidden * hidden + 2 * hidden * inter
        pool += 2 * hidden * patches  # q k^T and attn v for the one query, per MAC
    head = hidden * max(config.num_labels, 0)
    attention = 2 * config.num_hidden_layers * hidden * seq * seq  # MACs of q k^T and attn v
    return 6.0 * (blocks + patch_embed + pool + head + attention)


__all__ = [
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
