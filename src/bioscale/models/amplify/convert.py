"""Exact conversion between chandar-lab's published AMPLIFY format and bioscale AMPLIFY, in both directions.

AMPLIFY has no stock ``transformers`` class: the ``chandar-lab/AMPLIFY_*`` checkpoints are Hugging Face *remote code*
(``config.json`` with ``model_type: "AMPLIFY"`` and an ``auto_map`` to ``amplify.AMPLIFY``). So "the ``transformers``
side" of this converter is that published format itself, and nothing here imports the published code:

- :func:`config_from_reference` reads its config (a ``config.json`` dict, or the ``AMPLIFYConfig`` of a loaded
  reference model); :func:`reference_config_dict` writes one with the same fields.
- :func:`from_reference_state_dict` builds a bioscale model from tensors named as in the released checkpoints
  (``encoder.weight``, ``transformer_encoder.N.{q,k,v,wo}.weight``, ``...ffn.w12/w3.weight``,
  ``...attention_norm/ffn_norm.weight``, ``layer_norm_2.weight``, ``decoder.weight/bias``);
  :func:`to_reference_state_dict` gives those tensors back.
- :func:`from_hf` takes a loaded published ``AMPLIFY`` module (recognised by its config's ``model_type``);
  :func:`to_hf` returns an :class:`AmplifyReferenceCheckpoint` whose ``save_pretrained(dir)`` writes ``config.json``
  and ``model.safetensors`` that the published code loads (:func:`save_reference_checkpoint` does the same in one
  call). It is not a ``torch.nn.Module``: building the published class would mean importing remote code.

Every tensor survives ``published → bioscale → published`` bit for bit: ``q``/``k``/``v`` are concatenated into
``qkv_proj`` and split back, ``w12`` *is* ``gate_up_proj`` (gate then up), vocabulary padding is added and removed.
A config the published code would not build the way bioscale does (``hidden_act`` other than SwiGLU, LayerNorm instead
of RMSNorm, biases, a norm after the embedding, no final norm) and a state dict with missing, extra or mis-shaped
tensors raise ``ValueError`` naming the field or the tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig

from bioscale.models.amplify.config import AmplifyConfig
from bioscale.models.amplify.modeling import (
    AmplifyForMaskedLM,
    AmplifyForSequenceClassification,
    AmplifyForTokenClassification,
    AmplifyModel,
    AmplifyPreTrainedModel,
)
from bioscale.models.hf_utils import build_bioscale_from_state_dict, pad_rows

REFERENCE_MODEL_TYPE = "AMPLIFY"
# As chandar-lab's config.json has it: the remote code lives in amplify.py next to the weights.
REFERENCE_AUTO_MAP = {"AutoConfig": "amplify.AMPLIFYConfig", "AutoModel": "amplify.AMPLIFY"}
REFERENCE_ARCHITECTURES = ["AMPLIFY"]

# The published config's architecture switches, and the one value of each that AMPLIFY (and bioscale) uses.
FIXED_REFERENCE_FIELDS: dict[str, Any] = {
    "rms_norm": True,
    "att_bias": False,
    "ffn_bias": False,
    "layer_norm_after_embedding": False,
    "layer_norm_before_last_layer": True,
}
# Published field -> (bioscale field, the published default when the field is absent).
_COPIED_FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", 27),
    "hidden_size": ("hidden_size", 960),
    "num_hidden_layers": ("num_hidden_layers", 32),
    "num_attention_heads": ("num_attention_heads", 15),
    "intermediate_size": ("intermediate_size", 3840),
    "max_length": ("max_position_embeddings", 2048),
    "norm_eps": ("norm_eps", 1e-5),
    "dropout_prob": ("dropout_prob", 0.0),
    "embedding_init_range": ("embedding_init_range", 0.02),
    "decoder_init_range": ("decoder_init_range", 0.02),
    "pad_token_id": ("pad_token_id", 0),
}
# Special-token ids of the AMPLIFY alphabet, used when the published config does not state them.
_TOKEN_FIELDS: dict[str, int] = {"unk_token_id": 1, "mask_token_id": 2, "bos_token_id": 3, "eos_token_id": 4}

_BASE_CLASSES: dict[str, type[AmplifyPreTrainedModel]] = {
    "base": AmplifyModel,
    "masked_lm": AmplifyForMaskedLM,
    "token_classification": AmplifyForTokenClassification,
    "sequence_classification": AmplifyForSequenceClassification,
}


def config_from_reference(reference: Mapping[str, Any] | PretrainedConfig, **overrides: Any) -> AmplifyConfig:
    """``AmplifyConfig`` equivalent to a published AMPLIFY config (a ``config.json`` dict or an ``AMPLIFYConfig``).

    ``overrides`` set bioscale-only fields (``padded_vocab_size``, ``attn_backend``) or classification fields
    (``num_labels``...). Fields the published config lacks take the published defaults.

    Raises:
        ValueError: naming the field, for another ``model_type``, ``hidden_act`` other than SwiGLU, or an
            architecture switch (``rms_norm``, ``att_bias``, ``ffn_bias``, ``layer_norm_after_embedding``,
            ``layer_norm_before_last_layer``) with a value AMPLIFY does not use.
    """
    fields = dict(reference.to_dict() if isinstance(reference, PretrainedConfig) else reference)
    model_type = fields.get("model_type", REFERENCE_MODEL_TYPE)
    if model_type != REFERENCE_MODEL_TYPE:
        raise ValueError(f"model_type={model_type!r} is not chandar-lab's AMPLIFY ({REFERENCE_MODEL_TYPE!r})")
    hidden_act = fields.get("hidden_act", "SwiGLU")
    if str(hidden_act).lower() != "swiglu":
        raise ValueError(
            f"hidden_act={hidden_act!r} is not supported: AMPLIFY's MLP is SwiGLU (the released checkpoints' "
            "ffn.w12 / ffn.w3 tensors); the published code's relu / gelu MLPs are not implemented"
        )
    for name, expected in FIXED_REFERENCE_FIELDS.items():
        value = fields.get(name, expected)
        if value != expected:
            raise ValueError(f"{name}={value!r} is not supported: bioscale implements AMPLIFY's {name}={expected!r}")
    kwargs: dict[str, Any] = {ours: fields.get(theirs, default) for theirs, (ours, default) in _COPIED_FIELDS.items()}
    kwargs["dropout_prob"] = float(kwargs["dropout_prob"])
    kwargs["hidden_act"] = hidden_act
    for name, default in _TOKEN_FIELDS.items():
        kwargs[name] = fields[name] if fields.get(name) is not None else default
    # The published AMPLIFY is always the masked LM (decoder included): say so, as a bioscale checkpoint would.
    kwargs["architectures"] = [AmplifyForMaskedLM.__name__]
    kwargs.update(overrides)
    return AmplifyConfig(**kwargs)


def reference_config_dict(config: AmplifyConfig, *, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The published ``config.json`` of ``config``: every ``AMPLIFYConfig`` field, ``model_type`` ``"AMPLIFY"``,
    ``architectures`` and ``auto_map`` as chandar-lab's have them, and the alphabet's special-token ids.
    bioscale-only fields (vocabulary padding, attention backend) are dropped: they do not change outputs."""
    out: dict[str, Any] = {
        "architectures": list(REFERENCE_ARCHITECTURES),
        "auto_map": dict(REFERENCE_AUTO_MAP),
        "model_type": REFERENCE_MODEL_TYPE,
    }
    for theirs, (ours, _) in _COPIED_FIELDS.items():
        out[theirs] = getattr(config, ours)
    out["hidden_act"] = "SwiGLU"
    out.update(FIXED_REFERENCE_FIELDS)
    for name in _TOKEN_FIELDS:
        out[name] = getattr(config, name)
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["transformers_version"] = transformers.__version__
    return dict(sorted(out.items()))


def reference_tensor_shapes(config: AmplifyConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a published AMPLIFY checkpoint for ``config``, name -> shape."""
    hidden, ffn, vocab = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"transformer_encoder.{i}."
        for proj in ("q", "k", "v", "wo"):
            shapes[f"{layer}{proj}.weight"] = (hidden, hidden)
        shapes[f"{layer}ffn.w12.weight"] = (2 * ffn, hidden)
        shapes[f"{layer}ffn.w3.weight"] = (hidden, ffn)
        shapes[f"{layer}attention_norm.weight"] = (hidden,)
        shapes[f"{layer}ffn_norm.weight"] = (hidden,)
    shapes["layer_norm_2.weight"] = (hidden,)
    shapes["decoder.weight"] = (vocab, hidden)
    shapes["decoder.bias"] = (vocab,)
    return shapes


def check_reference_state_dict(state: Mapping[str, torch.Tensor], config: AmplifyConfig) -> None:
    """``ValueError`` naming the tensors unless ``state`` holds exactly the published tensors of ``config``."""
    expected = reference_tensor_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(".ffn.0." in key or ".ffn.2." in key for key in unexpected):
            hint = " (ffn.0 / ffn.2 are the published relu / gelu MLP: bioscale implements AMPLIFY's SwiGLU)"
        raise ValueError(
            f"state dict does not fit AMPLIFY {config.num_hidden_layers}x{config.hidden_size}: missing tensors "
            f"{missing}, unexpected {unexpected}{hint}"
        )
    wrong = {key: tuple(state[key].shape) for key, shape in expected.items() if tuple(state[key].shape) != shape}
    if wrong:
        details = ", ".join(f"{key} {got} (expected {expected[key]})" for key, got in sorted(wrong.items()))
        raise ValueError(f"state dict does not fit the AMPLIFY config: tensors of the wrong shape: {details}")


def _base_from_reference(state: Mapping[str, torch.Tensor], config: AmplifyConfig) -> dict[str, torch.Tensor]:
    """bioscale ``AmplifyModel`` tensors from the published ones."""
    out = {"embed_tokens.weight": pad_rows(state["encoder.weight"], config.embedding_rows)}
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer_encoder.{i}.", f"layers.{i}."
        out[f"{dst}attention.qkv_proj.weight"] = torch.cat([state[f"{src}{p}.weight"] for p in ("q", "k", "v")], dim=0)
        out[f"{dst}attention.out_proj.weight"] = state[f"{src}wo.weight"]
        out[f"{dst}mlp.gate_up_proj.weight"] = state[f"{src}ffn.w12.weight"]  # w12 = gate then up, as gate_up_proj
        out[f"{dst}mlp.down_proj.weight"] = state[f"{src}ffn.w3.weight"]
        out[f"{dst}attention_norm.weight"] = state[f"{src}attention_norm.weight"]
        out[f"{dst}mlp_norm.weight"] = state[f"{src}ffn_norm.weight"]
    out["norm.weight"] = state["layer_norm_2.weight"]
    return out


def from_reference_state_dict(
    state: Mapping[str, torch.Tensor], config: AmplifyConfig, task: str = "masked_lm"
) -> AmplifyPreTrainedModel:
    """The bioscale model for ``task`` with the published tensors ``state`` (copied).

    ``"masked_lm"`` keeps every tensor; ``"base"`` keeps the encoder (the decoder is dropped); a classification task
    puts a freshly initialised head on the encoder. ``state`` must hold exactly the published tensors of ``config``
    (:func:`check_reference_state_dict`).
    """
    if task not in _BASE_CLASSES:
        raise ValueError(f"AMPLIFY has no task {task!r}; choose one of {sorted(_BASE_CLASSES)}")
    check_reference_state_dict(state, config)
    base = _base_from_reference(state, config)
    if task == "base":
        return build_bioscale_from_state_dict(AmplifyModel, config, base)
    if task == "masked_lm":
        full = {f"amplify.{key}": value for key, value in base.items()}
        full["lm_head.weight"] = pad_rows(state["decoder.weight"], config.embedding_rows)
        full["lm_head.bias"] = pad_rows(state["decoder.bias"], config.embedding_rows)
        return build_bioscale_from_state_dict(AmplifyForMaskedLM, config, full)
    device = state["encoder.weight"].device
    with torch.device(device):
        model = _BASE_CLASSES[task](config)  # built (and its head initialised) on the weights' device
    model.amplify.load_state_dict(base, strict=True)
    return model.to(state["encoder.weight"].dtype)


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def to_reference_state_dict(model: AmplifyPreTrainedModel) -> dict[str, torch.Tensor]:
    """The published tensors (names as in the released checkpoints) of an ``AmplifyForMaskedLM``, copied.

    Raises ``ValueError`` for the other classes: the published ``AMPLIFY`` always has its decoder, and no
    classification head.
    """
    if not isinstance(model, AmplifyForMaskedLM):
        raise ValueError(
            f"{type(model).__name__} has no published AMPLIFY counterpart (the published model is the masked LM, "
            "decoder included); convert an AmplifyForMaskedLM"
        )
    config: AmplifyConfig = model.config
    state = {key: value.detach() for key, value in model.state_dict().items()}
    base = _prefixed(state, "amplify.")
    hidden, vocab = config.hidden_size, config.vocab_size
    out = {"encoder.weight": base["embed_tokens.weight"][:vocab]}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"transformer_encoder.{i}."
        q, k, v = base[f"{src}attention.qkv_proj.weight"].split(hidden, dim=0)
        out.update({f"{dst}q.weight": q, f"{dst}k.weight": k, f"{dst}v.weight": v})
        out[f"{dst}wo.weight"] = base[f"{src}attention.out_proj.weight"]
        out[f"{dst}ffn.w12.weight"] = base[f"{src}mlp.gate_up_proj.weight"]
        out[f"{dst}ffn.w3.weight"] = base[f"{src}mlp.down_proj.weight"]
        out[f"{dst}attention_norm.weight"] = base[f"{src}attention_norm.weight"]
        out[f"{dst}ffn_norm.weight"] = base[f"{src}mlp_norm.weight"]
    out["layer_norm_2.weight"] = base["norm.weight"]
    out["decoder.weight"] = state["lm_head.weight"][:vocab]
    out["decoder.bias"] = state["lm_head.bias"][:vocab]
    # Own, contiguous storage per tensor: safetensors refuses tensors that share memory (q/k/v are views).
    return {key: value.contiguous().clone() for key, value in out.items()}


class AmplifyReferenceCheckpoint:
    """A bioscale AMPLIFY in the published format: ``config`` (the ``config.json`` dict) and ``state_dict`` (the
    released tensor names). ``save_pretrained(directory)`` writes ``config.json`` + ``model.safetensors``, a directory
    chandar-lab's ``AMPLIFY.from_pretrained`` loads (with ``amplify.py`` beside it, ``AutoModel`` with
    ``trust_remote_code=True`` does too)."""

    def __init__(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state_dict)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``; ``safe_serialization=False`` is
        refused (the published checkpoints, and bioscale's loader, are safetensors only)."""
        from safetensors.torch import save_file

        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("AMPLIFY reference checkpoints are written as safetensors only")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.cpu() for k, v in self._state_dict.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        return directory

    def __repr__(self) -> str:
        return f"AmplifyReferenceCheckpoint({self.config['num_hidden_layers']}x{self.config['hidden_size']})"


def from_hf(reference_model: nn.Module, **config_overrides: Any) -> AmplifyForMaskedLM:
    """bioscale ``AmplifyForMaskedLM`` with the weights of a loaded published ``AMPLIFY`` (copied).

    Recognised by its config (``model_type == "AMPLIFY"``), never by importing the published code.
    ``config_overrides`` set bioscale-only fields (``padded_vocab_size``, ``attn_backend``).
    """
    config = getattr(reference_model, "config", None)
    if getattr(config, "model_type", None) != REFERENCE_MODEL_TYPE:
        raise ValueError(
            f"{type(reference_model).__name__} is not chandar-lab's AMPLIFY (config model_type "
            f"{getattr(config, 'model_type', None)!r}, expected {REFERENCE_MODEL_TYPE!r})"
        )
    bioscale_config = config_from_reference(config, **config_overrides)
    model = from_reference_state_dict(reference_model.state_dict(), bioscale_config, task="masked_lm")
    assert isinstance(model, AmplifyForMaskedLM)
    return model


def to_hf(model: AmplifyPreTrainedModel) -> AmplifyReferenceCheckpoint:
    """``model`` in the published format (an ``AmplifyForMaskedLM`` only; see :class:`AmplifyReferenceCheckpoint`)."""
    state = to_reference_state_dict(model)
    dtype = next(iter(state.values())).dtype
    return AmplifyReferenceCheckpoint(reference_config_dict(model.config, dtype=dtype), state)


def save_reference_checkpoint(model: AmplifyPreTrainedModel, directory: str | Path) -> Path:
    """Write ``model`` as a published AMPLIFY checkpoint (``config.json`` + ``model.safetensors``) to ``directory``."""
    return to_hf(model).save_pretrained(directory)
