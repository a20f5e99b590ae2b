"""Exact conversion between ``transformers`` BERT (``BertForMaskedLM``, ``BertModel``, ``BertForTokenClassification``,
``BertForSequenceClassification``) and bioscale Geneformer, in both directions.

The published Geneformer checkpoints (``ctheodoris/Geneformer``) are stock ``BertForMaskedLM`` directories, so the
"``transformers`` side" is plain BERT. One name map, :data:`_BLOCK_FROM_HF` (per block) and :data:`_EMBEDDINGS_FROM_HF`,
goes from BERT to bioscale; the reverse direction inverts it. The one layout difference is BERT's separate query /
key / value, concatenated into ``qkv_proj`` and split back (:func:`_fuse_qkv`, :func:`_split_qkv`). Every tensor
survives ``transformers → bioscale → transformers`` bit for bit: vocabulary padding is added and removed, and the tied
decoder (``cls.predictions.decoder.weight`` *is* the word embedding, ``decoder.bias`` *is* ``cls.predictions.bias``)
is checked on the way in and re-tied on the way out. ``BertModel``'s pooler is dropped with a warning (Geneformer's
masked LM never trains it); ``BertForSequenceClassification``'s pooler becomes the cell head's ``pooler``, with
``classifier_pooling="cls"``.

Refused with ``ValueError`` naming the field: ``is_decoder``, ``add_cross_attention``, relative position embeddings
(``position_embedding_type`` other than ``"absolute"``, transformers 4.x), an activation other than ReLU or GELU, a
decoder not tied to the word embeddings.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PreTrainedModel,
)

from bioscale.models.geneformer.config import SUPPORTED_ACTIVATIONS, GeneformerConfig
from bioscale.models.geneformer.modeling import (
    GeneformerForMaskedLM,
    GeneformerForSequenceClassification,
    GeneformerForTokenClassification,
    GeneformerModel,
    GeneformerPreTrainedModel,
)
from bioscale.models.hf_utils import build_bioscale_from_state_dict, build_hf_from_state_dict, pad_rows, require

# BertConfig field -> GeneformerConfig field, copied as they are.
_COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "num_labels",
)
_OPTIONAL_FIELDS = ("classifier_dropout", "id2label", "label2id", "problem_type")
# Special tokens of the gene vocabulary: BertConfig has no fields for them, so they ride along as extra attributes
# (a BertConfig keeps unknown keyword arguments and writes them to config.json); Geneformer's V1 layout by default.
_TOKEN_FIELDS: dict[str, int | None] = {"mask_token_id": 1, "cls_token_id": None, "eos_token_id": None}

# Per-block tensor names: BERT (under encoder.layer.N.) -> bioscale (under layers.N.). q/k/v are handled apart.
_BLOCK_FROM_HF: dict[str, str] = {
    "attention.output.dense": "attention.out_proj",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj",
    "output.LayerNorm": "mlp_norm",
}
_EMBEDDINGS_FROM_HF: dict[str, str] = {
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings.layer_norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.layer_norm.bias",
}
_LM_HEAD_FROM_HF: dict[str, str] = {
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.layer_norm.bias",
}
_QKV = ("query", "key", "value")


def config_from_hf(hf_config: BertConfig, **overrides: Any) -> GeneformerConfig:
    """``GeneformerConfig`` equivalent to ``hf_config``; ``overrides`` set bioscale-only fields.

    Raises:
        ValueError: naming the field, for a BERT variant Geneformer does not use (see the module docstring).
    """
    require(getattr(hf_config, "model_type", "bert") == "bert", f"model_type={hf_config.model_type!r} is not 'bert'")
    require(not getattr(hf_config, "is_decoder", False), "is_decoder=True is not supported: Geneformer is an encoder")
    require(not getattr(hf_config, "add_cross_attention", False), "add_cross_attention=True is not supported")
    position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    require(
        position_type == "absolute",
        f"position_embedding_type={position_type!r} is not supported: Geneformer learns absolute positions",
    )
    require(
        hf_config.hidden_act in SUPPORTED_ACTIVATIONS,
        f"hidden_act={hf_config.hidden_act!r} is not supported: choose one of {SUPPORTED_ACTIVATIONS}",
    )
    kwargs: dict[str, Any] = {name: getattr(hf_config, name) for name in _COPIED_FIELDS}
    for name in _OPTIONAL_FIELDS:
        if getattr(hf_config, name, None) is not None:
            kwargs[name] = getattr(hf_config, name)
    for name, default in _TOKEN_FIELDS.items():
        value = getattr(hf_config, name, None)
        kwargs[name] = value if value is not None else default
    kwargs.update(overrides)
    return GeneformerConfig(**kwargs)


def config_to_hf(config: GeneformerConfig, **extra: Any) -> BertConfig:
    """The stock ``BertConfig`` of ``config`` (bioscale-only fields are dropped: they do not change outputs); the
    vocabulary's special-token ids ride along."""
    kwargs: dict[str, Any] = {name: getattr(config, name) for name in _COPIED_FIELDS}
    for name in _OPTIONAL_FIELDS:
        if getattr(config, name, None) is not None:
            kwargs[name] = getattr(config, name)
    for name in _TOKEN_FIELDS:
        if getattr(config, name, None) is not None:
            kwargs[name] = getattr(config, name)
    kwargs.update(extra)
    return BertConfig(**kwargs)


def _fuse_qkv(hf_state: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    return {
        f"qkv_proj.{p}": torch.cat([hf_state[f"{src}attention.self.{name}.{p}"] for name in _QKV], dim=0)
        for p in ("weight", "bias")
    }


def _split_qkv(state: dict[str, torch.Tensor], src: str, hidden: int) -> dict[str, torch.Tensor]:
    out = {}
    for p in ("weight", "bias"):
        for name, part in zip(_QKV, state[f"{src}attention.qkv_proj.{p}"].split(hidden, dim=0), strict=True):
            out[f"attention.self.{name}.{p}"] = part
    return out


def _base_from_hf(hf_state: dict[str, torch.Tensor], prefix: str, config: GeneformerConfig) -> dict[str, torch.Tensor]:
    """bioscale ``GeneformerModel`` tensors from a BERT state dict whose base model sits under ``prefix``."""
    out = {
        "embeddings.word_embeddings.weight": pad_rows(
            hf_state[f"{prefix}embeddings.word_embeddings.weight"], config.embedding_rows
        )
    }
    out.update({ours: hf_state[f"{prefix}{theirs}"] for theirs, ours in _EMBEDDINGS_FROM_HF.items()})
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
        out.update({f"{dst}attention.{k}": v for k, v in _fuse_qkv(hf_state, src).items()})
        for theirs, ours in _BLOCK_FROM_HF.items():
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = hf_state[f"{src}{theirs}.{p}"]
    return out


def _base_to_hf(state: dict[str, torch.Tensor], prefix: str, config: GeneformerConfig) -> dict[str, torch.Tensor]:
    """BERT base-model tensors (under ``prefix``) from a bioscale ``GeneformerModel`` state dict (the inverse map)."""
    out = {f"{prefix}embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"][: config.vocab_size]}
    out.update({f"{prefix}{theirs}": state[ours] for theirs, ours in _EMBEDDINGS_FROM_HF.items()})
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
        out.update({f"{dst}{k}": v for k, v in _split_qkv(state, src, config.hidden_size).items()})
        for theirs, ours in _BLOCK_FROM_HF.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
    return out


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _is_tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() or (a.shape == b.shape and torch.equal(a, b))


def from_hf(hf_model: PreTrainedModel, **config_overrides: Any) -> GeneformerPreTrainedModel:
    """bioscale Geneformer with the weights of ``hf_model`` (copied).

    ``BertForMaskedLM`` → :class:`GeneformerForMaskedLM`, ``BertForTokenClassification`` →
    :class:`GeneformerForTokenClassification`, ``BertForSequenceClassification`` →
    :class:`GeneformerForSequenceClassification` (``classifier_pooling="cls"``), ``BertModel`` →
    :class:`GeneformerModel` (its pooler dropped with a warning).
    """
    hf_state = hf_model.state_dict()
    if isinstance(hf_model, BertForSequenceClassification):
        config_overrides = {"classifier_pooling": "cls", **config_overrides}
    config = config_from_hf(hf_model.config, **config_overrides)
    if isinstance(hf_model, BertForMaskedLM):
        state = {f"bert.{k}": v for k, v in _base_from_hf(hf_state, "bert.", config).items()}
        embedding = hf_state["bert.embeddings.word_embeddings.weight"]
        require(
            _is_tied(hf_state["cls.predictions.decoder.weight"], embedding),
            "BertForMaskedLM with a decoder not tied to the word embeddings is not supported "
            "(cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight)",
        )
        require(
            _is_tied(hf_state["cls.predictions.decoder.bias"], hf_state["cls.predictions.bias"]),
            "BertForMaskedLM whose cls.predictions.decoder.bias differs from cls.predictions.bias is not supported",
        )
        state.update({ours: hf_state[theirs] for theirs, ours in _LM_HEAD_FROM_HF.items()})
        state["lm_head.bias"] = pad_rows(hf_state["cls.predictions.bias"], config.embedding_rows)
        return build_bioscale_from_state_dict(GeneformerForMaskedLM, config, state)
    if isinstance(hf_model, BertForTokenClassification):
        state = {f"bert.{k}": v for k, v in _base_from_hf(hf_state, "bert.", config).items()}
        state.update({f"classifier.{p}": hf_state[f"classifier.{p}"] for p in ("weight", "bias")})
        return build_bioscale_from_state_dict(GeneformerForTokenClassification, config, state)
    if isinstance(hf_model, BertForSequenceClassification):
        state = {f"bert.{k}": v for k, v in _base_from_hf(hf_state, "bert.", config).items()}
        state.update({f"pooler.dense.{p}": hf_state[f"bert.pooler.dense.{p}"] for p in ("weight", "bias")})
        state.update({f"classifier.{p}": hf_state[f"classifier.{p}"] for p in ("weight", "bias")})
        return build_bioscale_from_state_dict(GeneformerForSequenceClassification, config, state)
    if isinstance(hf_model, BertModel):
        if getattr(hf_model, "pooler", None) is not None:
            warnings.warn(
                "BertModel's pooler is dropped: Geneformer's masked LM never trains it and GeneformerModel has none "
                "(build the transformers model with add_pooling_layer=False for an exact round trip)",
                stacklevel=2,
            )
        return build_bioscale_from_state_dict(GeneformerModel, config, _base_from_hf(hf_state, "", config))
    raise ValueError(
        f"{type(hf_model).__name__} is not supported; convert BertForMaskedLM, BertForTokenClassification, "
        "BertForSequenceClassification or BertModel"
    )


def to_hf(model: GeneformerPreTrainedModel) -> PreTrainedModel:
    """The stock ``transformers`` BERT model with ``model``'s weights (copied); loads with no bioscale installed."""
    config: GeneformerConfig = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, GeneformerForMaskedLM):
        hf_state = _base_to_hf(_prefixed(state, "bert."), "bert.", config)
        hf_state.update({theirs: state[ours] for theirs, ours in _LM_HEAD_FROM_HF.items()})
        hf_state["cls.predictions.bias"] = state["lm_head.bias"][: config.vocab_size]
        # The tied pair: the same tensors, re-tied by build_hf_from_state_dict (model.tie_weights()).
        hf_state["cls.predictions.decoder.weight"] = hf_state["bert.embeddings.word_embeddings.weight"]
        hf_state["cls.predictions.decoder.bias"] = hf_state["cls.predictions.bias"]
        return build_hf_from_state_dict(BertForMaskedLM, config_to_hf(config), hf_state)
    if isinstance(model, GeneformerForTokenClassification):
        hf_state = _base_to_hf(_prefixed(state, "bert."), "bert.", config)
        hf_state.update({f"classifier.{p}": state[f"classifier.{p}"] for p in ("weight", "bias")})
        return build_hf_from_state_dict(BertForTokenClassification, config_to_hf(config), hf_state)
    if isinstance(model, GeneformerForSequenceClassification):
        if config.classifier_pooling != "cls":
            raise ValueError(
                "GeneformerForSequenceClassification with classifier_pooling='mean' has no exact transformers "
                "counterpart (BertForSequenceClassification pools the first token); export model.bert instead"
            )
        hf_state = _base_to_hf(_prefixed(state, "bert."), "bert.", config)
        hf_state.update({f"bert.pooler.dense.{p}": state[f"pooler.dense.{p}"] for p in ("weight", "bias")})
        hf_state.update({f"classifier.{p}": state[f"classifier.{p}"] for p in ("weight", "bias")})
        return build_hf_from_state_dict(BertForSequenceClassification, config_to_hf(config), hf_state)
    if isinstance(model, GeneformerModel):
        return build_hf_from_state_dict(
            lambda cfg: BertModel(cfg, add_pooling_layer=False), config_to_hf(config), _base_to_hf(state, "", config)
        )
    raise ValueError(f"{type(model).__name__} is not a bioscale Geneformer model")
