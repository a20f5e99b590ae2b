"""Exact conversion between ``transformers`` ESM (``EsmModel``, ``EsmForMaskedLM``, ``EsmForTokenClassification``)
and bioscale ESM-2, in both directions.

Every tensor survives the round trip ``transformers → bioscale → transformers`` bit for bit: query/key/value are
concatenated into ``qkv_proj`` (and split back), vocabulary padding is added and removed, and the contact-prediction
weights ride along as buffers. Only ``EsmModel``'s pooler is dropped (with a warning): ESM-2 never trained it and
bioscale has no pooler. Configurations ESM-2 does not use (absolute position embeddings, decoder or cross-attention
mode, ESMFold) raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import EsmConfig, EsmForMaskedLM, EsmForTokenClassification, EsmModel, PreTrainedModel

from bioscale.models.esm2.config import Esm2Config
from bioscale.models.esm2.modeling import (
    Esm2ForMaskedLM,
    Esm2ForSequenceClassification,
    Esm2ForTokenClassification,
    Esm2Model,
    Esm2PreTrainedModel,
)
from bioscale.models.hf_utils import build_bioscale_from_state_dict, build_hf_from_state_dict, pad_rows, require

_CLASSIFICATION_FIELDS = ("id2label", "label2id", "problem_type")


def config_from_hf(hf_config: EsmConfig, **overrides: Any) -> Esm2Config:
    """``Esm2Config`` equivalent to ``hf_config``; ``overrides`` set bioscale-only fields (``padded_vocab_size``...)."""
    require(
        getattr(hf_config, "position_embedding_type", "absolute") == "rotary",
        f"position_embedding_type={getattr(hf_config, 'position_embedding_type', 'absolute')!r} is not supported: "
        "bioscale implements ESM-2, which uses rotary position embeddings ('rotary')",
    )
    require(not getattr(hf_config, "is_folding_model", False), "is_folding_model=True (ESMFold) is not supported")
    require(not getattr(hf_config, "is_decoder", False), "is_decoder=True is not supported: ESM-2 is an encoder")
    require(not getattr(hf_config, "add_cross_attention", False), "add_cross_attention=True is not supported")
    token_dropout = bool(getattr(hf_config, "token_dropout", False))
    require(
        not token_dropout or hf_config.mask_token_id is not None,
        "token_dropout=True needs mask_token_id to be set in the transformers config",
    )
    kwargs: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.layer_norm_eps,
        hidden_dropout_prob=hf_config.hidden_dropout_prob,
        attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
        initializer_range=hf_config.initializer_range,
        token_dropout=token_dropout,
        emb_layer_norm_before=bool(getattr(hf_config, "emb_layer_norm_before", False)),
        mask_token_id=hf_config.mask_token_id if hf_config.mask_token_id is not None else 32,
        pad_token_id=hf_config.pad_token_id,
        rope_theta=float(getattr(hf_config, "rope_theta", 10000.0) or 10000.0),
        num_labels=hf_config.num_labels,
    )
    if getattr(hf_config, "eos_token_id", None) is not None:
        kwargs["eos_token_id"] = hf_config.eos_token_id
    for field in _CLASSIFICATION_FIELDS:
        if getattr(hf_config, field, None) is not None:
            kwargs[field] = getattr(hf_config, field)
    kwargs.update(overrides)
    return Esm2Config(**kwargs)


def config_to_hf(config: Esm2Config) -> EsmConfig:
    """The stock ``EsmConfig`` of ``config`` (bioscale-only fields are dropped: they do not change outputs)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        position_embedding_type="rotary",
        emb_layer_norm_before=config.emb_layer_norm_before,
        token_dropout=config.token_dropout,
        mask_token_id=config.mask_token_id,
        pad_token_id=config.pad_token_id,
        num_labels=config.num_labels,
    )
    if config.rope_theta != 10000.0:
        kwargs["rope_theta"] = config.rope_theta  # only transformers >= 5 reads it; 10000 is ESM-2's value
    for field in _CLASSIFICATION_FIELDS:
        if getattr(config, field, None) is not None:
            kwargs[field] = getattr(config, field)
    return EsmConfig(**kwargs)


def _base_from_hf(hf_state: dict[str, torch.Tensor], prefix: str, config: Esm2Config) -> dict[str, torch.Tensor]:
    """bioscale ``Esm2Model`` tensors from a ``transformers`` ``EsmModel`` state dict under ``prefix``."""
    rows = config.embedding_rows
    out = {"embeddings.word_embeddings.weight": pad_rows(hf_state[f"{prefix}embeddings.word_embeddings.weight"], rows)}
    if config.emb_layer_norm_before:
        for name in ("weight", "bias"):
            out[f"embeddings.layer_norm.{name}"] = hf_state[f"{prefix}embeddings.layer_norm.{name}"]
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
        for name in ("weight", "bias"):
            out[f"{dst}attention.qkv_proj.{name}"] = torch.cat(
                [hf_state[f"{src}attention.self.{proj}.{name}"] for proj in ("query", "key", "value")], dim=0
            )
            out[f"{dst}attention.out_proj.{name}"] = hf_state[f"{src}attention.output.dense.{name}"]
            out[f"{dst}attention_norm.{name}"] = hf_state[f"{src}attention.LayerNorm.{name}"]
            out[f"{dst}mlp_norm.{name}"] = hf_state[f"{src}LayerNorm.{name}"]
            out[f"{dst}mlp.up_proj.{name}"] = hf_state[f"{src}intermediate.dense.{name}"]
            out[f"{dst}mlp.down_proj.{name}"] = hf_state[f"{src}output.dense.{name}"]
    for name in ("weight", "bias"):
        out[f"final_layer_norm.{name}"] = hf_state[f"{prefix}encoder.emb_layer_norm_after.{name}"]
        out[f"contact_head.{name}"] = hf_state[f"{prefix}contact_head.regression.{name}"]
    return out


def _base_to_hf(state: dict[str, torch.Tensor], prefix: str, config: Esm2Config) -> dict[str, torch.Tensor]:
    """``transformers`` ``EsmModel`` tensors (under ``prefix``) from a bioscale ``Esm2Model`` state dict."""
    vocab, hidden = config.vocab_size, config.hidden_size
    out = {f"{prefix}embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"][:vocab]}
    if config.emb_layer_norm_before:
        for name in ("weight", "bias"):
            out[f"{prefix}embeddings.layer_norm.{name}"] = state[f"embeddings.layer_norm.{name}"]
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
        for name in ("weight", "bias"):
            query, key, value = state[f"{src}attention.qkv_proj.{name}"].split(hidden, dim=0)
            out[f"{dst}attention.self.query.{name}"] = query
            out[f"{dst}attention.self.key.{name}"] = key
            out[f"{dst}attention.self.value.{name}"] = value
            out[f"{dst}attention.output.dense.{name}"] = state[f"{src}attention.out_proj.{name}"]
            out[f"{dst}attention.LayerNorm.{name}"] = state[f"{src}attention_norm.{name}"]
            out[f"{dst}LayerNorm.{name}"] = state[f"{src}mlp_norm.{name}"]
            out[f"{dst}intermediate.dense.{name}"] = state[f"{src}mlp.up_proj.{name}"]
            out[f"{dst}output.dense.{name}"] = state[f"{src}mlp.down_proj.{name}"]
    for name in ("weight", "bias"):
        out[f"{prefix}encoder.emb_layer_norm_after.{name}"] = state[f"final_layer_norm.{name}"]
        out[f"{prefix}contact_head.regression.{name}"] = state[f"contact_head.{name}"]
    return out


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def from_hf(hf_model: PreTrainedModel, **config_overrides: Any) -> Esm2PreTrainedModel:
    """bioscale ESM-2 with the weights of ``hf_model`` (copied).

    ``EsmForMaskedLM`` → :class:`Esm2ForMaskedLM`, ``EsmForTokenClassification`` → :class:`Esm2ForTokenClassification`,
    ``EsmModel`` → :class:`Esm2Model`. ``config_overrides`` set bioscale-only fields (``padded_vocab_size``,
    ``attn_backend``).
    """
    config = config_from_hf(hf_model.config, **config_overrides)
    hf_state = hf_model.state_dict()
    if isinstance(hf_model, EsmForMaskedLM):
        state = {f"esm.{k}": v for k, v in _base_from_hf(hf_state, "esm.", config).items()}
        decoder = hf_state["lm_head.decoder.weight"]
        embedding = hf_state["esm.embeddings.word_embeddings.weight"]
        require(
            decoder.data_ptr() == embedding.data_ptr() or torch.equal(decoder, embedding),
            "EsmForMaskedLM with an LM decoder not tied to the word embeddings is not supported",
        )
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            state[f"lm_head.{name}"] = hf_state[f"lm_head.{name}"]
        state["lm_head.bias"] = pad_rows(hf_state["lm_head.bias"], config.embedding_rows)
        return build_bioscale_from_state_dict(Esm2ForMaskedLM, config, state)
    if isinstance(hf_model, EsmForTokenClassification):
        state = {f"esm.{k}": v for k, v in _base_from_hf(hf_state, "esm.", config).items()}
        state["classifier.weight"] = hf_state["classifier.weight"]
        state["classifier.bias"] = hf_state["classifier.bias"]
        return build_bioscale_from_state_dict(Esm2ForTokenClassification, config, state)
    if isinstance(hf_model, EsmModel):
        if getattr(hf_model, "pooler", None) is not None:
            warnings.warn(
                "EsmModel's pooler is dropped: ESM-2 never trained it and bioscale's Esm2Model has none "
                "(build the transformers model with add_pooling_layer=False for an exact round trip)",
                stacklevel=2,
            )
        return build_bioscale_from_state_dict(Esm2Model, config, _base_from_hf(hf_state, "", config))
    raise ValueError(
        f"{type(hf_model).__name__} is not supported; convert EsmForMaskedLM, EsmForTokenClassification or EsmModel"
    )


def to_hf(model: Esm2PreTrainedModel) -> PreTrainedModel:
    """The stock ``transformers`` model with ``model``'s weights (copied); loads with no bioscale installed."""
    config: Esm2Config = model.config
    hf_config = config_to_hf(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, Esm2ForMaskedLM):
        hf_state = _base_to_hf(_prefixed(state, "esm."), "esm.", config)
        for name in ("dense.weight", "dense.bias", "layer_norm.weight", "layer_norm.bias"):
            hf_state[f"lm_head.{name}"] = state[f"lm_head.{name}"]
        hf_state["lm_head.bias"] = state["lm_head.bias"][: config.vocab_size]
        hf_state["lm_head.decoder.weight"] = hf_state["esm.embeddings.word_embeddings.weight"]
        return build_hf_from_state_dict(EsmForMaskedLM, hf_config, hf_state)
    if isinstance(model, Esm2ForTokenClassification):
        hf_state = _base_to_hf(_prefixed(state, "esm."), "esm.", config)
        hf_state["classifier.weight"] = state["classifier.weight"]
        hf_state["classifier.bias"] = state["classifier.bias"]
        return build_hf_from_state_dict(EsmForTokenClassification, hf_config, hf_state)
    if isinstance(model, Esm2ForSequenceClassification):
        raise ValueError(
            "Esm2ForSequenceClassification has no exact transformers counterpart (it mean-pools; "
            "EsmForSequenceClassification reads <cls>); export model.esm instead"
        )
    if isinstance(model, Esm2Model):
        # ESM-2 checkpoints have no pooler; neither has the bioscale base model.
        return build_hf_from_state_dict(
            lambda cfg: EsmModel(cfg, add_pooling_layer=False), hf_config, _base_to_hf(state, "", config)
        )
    raise ValueError(f"{type(model).__name__} is not a bioscale ESM-2 model")
