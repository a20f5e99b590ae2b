"""Exact conversion between CodonFM's released EnCodon format and bioscale EnCodon, in both directions.

EnCodon has no stock ``transformers`` class. The released ``nvidia/NV-CodonFM-Encodon-*`` checkpoints are the
state dict of CodonFM's ``EnCodon`` module (optionally under Lightning's ``model.`` prefix) with a ``config.json`` of
the training wrapper's hyper-parameters, which CodonFM's own loader (NVIDIA-Digital-Bio/CodonFM
``src/inference/encodon.py``) reads with ``EncodonPL(**config)`` (possibly nested under ``"hparams"``). That layout is
"the reference side" of this converter, and nothing here imports CodonFM code:

- :func:`config_from_reference` reads such a config (or the reference ``EnCodonConfig``'s ``to_dict()``);
  :func:`reference_config_dict` writes one (``EncodonPL``'s arguments; no ``model_type``, which ``EncodonPL`` would
  not take), and :func:`is_reference_config` recognises one for ``bioscale.use.loading``.
- :func:`from_reference_state_dict` builds a bioscale model from the released tensor names
  (``embeddings.word_embeddings.weight``, ``embeddings.post_ln.*``, ``layers.N.pre_attn_layer_norm.*``,
  ``layers.N.attention.{query,key,value}.*``, ``layers.N.attention.rotary_emb.inv_freq``,
  ``layers.N.post_attn_layer_norm.*``, ``layers.N.post_attn_dense.*``, ``layers.N.pre_ffn_layer_norm.*``,
  ``layers.N.intermediate_dense.*``, ``layers.N.post_ffn_layer_norm.*``, ``layers.N.output_dense.*``,
  ``cls.{0,2,3}.*``);
  :func:`to_reference_state_dict` gives exactly those tensors back, in the reference module's order.
- :func:`from_hf` takes a loaded reference ``EnCodon`` module; :func:`to_hf` returns an
  :class:`EnCodonReferenceCheckpoint` whose ``save_pretrained(dir)`` writes ``config.json`` and ``model.safetensors``.

Every tensor survives ``reference -> bioscale -> reference`` bit for bit: ``query`` / ``key`` / ``value`` are
concatenated into ``qkv_proj`` and split back, vocabulary padding is added and removed, and the RoPE ``inv_freq``
buffers (persistent in the reference, recomputed from ``rotary_theta`` here) are checked on the way in and recomputed
on the way out with the reference's formula (bit-identical, tested). A config bioscale would not build the same way
(another activation, vocabulary, padding id, position embedding, a LoRA or cross-attention downstream head) and a state
dict with missing, extra or mis-shaped tensors, or ``inv_freq`` buffers of another theta, raise ``ValueError`` naming
the field or the tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioscale.models.codonfm.config import CODON_VOCAB_SIZE, REFERENCE_ROTARY_THETA, EnCodonConfig
from bioscale.models.codonfm.modeling import (
    EnCodonForMaskedLM,
    EnCodonForSequenceClassification,
    EnCodonModel,
    EnCodonPreTrainedModel,
)
from bioscale.models.hf_utils import build_bioscale_from_state_dict, pad_rows
from bioscale.models.rotary import compute_inv_freq

# CodonFM's training wrapper (EncodonPL) defaults rotary_theta to 1e4, the reference EnCodonConfig to 1e5; a config
# that does not state it takes the default of the format it is in (EncodonPL's has these keys, EnCodonConfig's not).
ENCODON_PL_ROTARY_THETA = 1e4
_ENCODON_PL_KEYS = frozenset({"position_embedding_type", "loss_type", "use_downstream_head", "finetune_strategy"})
# Reference field -> default when absent (both formats agree on these).
_COPIED_FIELDS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "classifier_dropout": 0.1,
    "max_position_embeddings": 2048,
}
# The fields whose value is fixed by the released architecture and the 69-token vocabulary.
_FIXED_FIELDS: dict[str, Any] = {
    "vocab_size": CODON_VOCAB_SIZE,
    "hidden_act": "gelu",
    "pad_token_id": 3,
    "position_embedding_type": "rotary",
    "use_downstream_head": False,
    "lora": False,
}
# EncodonPL's remaining arguments, with its defaults (written so that EncodonPL(**config) rebuilds the model).
_ENCODON_PL_DEFAULTS: dict[str, Any] = {
    "ignore_index": -100,
    "loss_type": "regression",
    "lora_alpha": 32.0,
    "lora_r": 16,
    "lora_dropout": 0.1,
    "finetune_strategy": "full",
    "num_classes": 2,
    "cross_attention_hidden_dim": 256,
    "cross_attention_num_heads": 8,
}
_REFERENCE_MODEL_TYPES = (None, "custom", "encodon")  # EnCodonConfig's class / instance model_type; EncodonPL: none
LIGHTNING_PREFIX = "model."

_CLASSES: dict[str, type[EnCodonPreTrainedModel]] = {
    "base": EnCodonModel,
    "masked_lm": EnCodonForMaskedLM,
    "sequence_classification": EnCodonForSequenceClassification,
}


def _fields(reference: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The flat field dict of a reference config: a ``config.json`` dict (``"hparams"`` unwrapped), or an object with
    ``to_dict()`` (the reference ``EnCodonConfig``)."""
    fields = dict(reference.to_dict() if hasattr(reference, "to_dict") else reference)
    if isinstance(fields.get("hparams"), Mapping):  # a Lightning checkpoint's hyper-parameters, nested
        fields = dict(fields["hparams"])
    return fields


def is_reference_config(config_json: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` (which ``AutoConfig`` could not read) is CodonFM's EnCodon format: it names
    ``rotary_theta`` and the encoder shape, and no ``model_type`` other than the reference's own."""
    if not isinstance(config_json, Mapping):
        return False
    fields = _fields(config_json)
    shape = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"}
    return fields.get("model_type") in _REFERENCE_MODEL_TYPES and "rotary_theta" in fields and shape <= set(fields)


def config_from_reference(reference: Mapping[str, Any] | Any, **overrides: Any) -> EnCodonConfig:
    """``EnCodonConfig`` equivalent to a released EnCodon config (``config.json`` dict, nested ``"hparams"`` or not,
    or the reference ``EnCodonConfig``).

    ``overrides`` set bioscale-only fields (``padded_vocab_size``, ``attn_backend``) or classification fields
    (``num_labels``...). Absent fields take the reference defaults; an absent ``rotary_theta`` takes the default of the
    format (``EncodonPL``'s 1e4, ``EnCodonConfig``'s 1e5), and :func:`from_reference_state_dict` checks it against the
    checkpoint's ``inv_freq`` buffers.

    Raises:
        ValueError: naming the field, for another ``model_type``, a vocabulary other than the 69 codon tokens, an
            activation other than exact GELU, another padding id or position embedding, a cross-attention downstream
            head or LoRA adapters.
    """
    fields = _fields(reference)
    model_type = fields.get("model_type")
    if model_type not in _REFERENCE_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not CodonFM's EnCodon (expected none, 'custom' or 'encodon')")
    for name, expected in _FIXED_FIELDS.items():
        value = fields.get(name, expected)
        if value != expected:
            why = {
                "vocab_size": "the codon vocabulary has 69 tokens (<CLS> <SEP> <UNK> <PAD> <MASK> and 64 codons)",
                "hidden_act": "EnCodon's FFN activation is exact GELU",
                "pad_token_id": "<PAD> is token 3 of the codon vocabulary",
                "position_embedding_type": "EnCodon uses rotary position embeddings",
                "use_downstream_head": "CodonFM's cross-attention downstream head is not implemented in bioscale "
                "(use EnCodonForSequenceClassification on the encoder)",
                "lora": "merge the LoRA adapters into the weights first",
            }[name]
            raise ValueError(f"{name}={value!r} is not supported: {why}")
    kwargs: dict[str, Any] = {name: fields.get(name, default) for name, default in _COPIED_FIELDS.items()}
    default_theta = ENCODON_PL_ROTARY_THETA if _ENCODON_PL_KEYS & set(fields) else REFERENCE_ROTARY_THETA
    kwargs["rotary_theta"] = float(fields.get("rotary_theta", default_theta))
    # The released checkpoints are the masked LM (cls head included): say so, as a bioscale checkpoint would.
    kwargs["architectures"] = [EnCodonForMaskedLM.__name__]
    kwargs.update(overrides)
    return EnCodonConfig(**kwargs)


def reference_config_dict(config: EnCodonConfig) -> dict[str, Any]:
    """The released ``config.json`` of ``config``: the arguments of CodonFM's ``EncodonPL`` (which its loader calls
    as ``EncodonPL(**config)``) with this model's values, the wrapper's own defaults for the rest. bioscale-only
    fields (vocabulary padding, attention backend) are dropped: they do not change outputs."""
    out: dict[str, Any] = {name: getattr(config, name) for name in _COPIED_FIELDS}
    out.update(_FIXED_FIELDS)
    out["rotary_theta"] = config.rotary_theta
    out.update(_ENCODON_PL_DEFAULTS)
    return dict(sorted(out.items()))


def reference_tensor_shapes(config: EnCodonConfig, *, inv_freq: bool = True, head: bool = True) -> dict[str, tuple]:
    """Every tensor of a released EnCodon checkpoint for ``config``, name -> shape, in the reference module's order
    (``inv_freq``: the persistent RoPE buffers; ``head``: the ``cls`` masked-LM head)."""
    hidden, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple] = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.post_ln.weight": (hidden,),
        "embeddings.post_ln.bias": (hidden,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"layers.{i}."
        shapes[f"{layer}pre_attn_layer_norm.weight"] = shapes[f"{layer}pre_attn_layer_norm.bias"] = (hidden,)
        for proj in ("query", "key", "value"):
            shapes[f"{layer}attention.{proj}.weight"] = (hidden, hidden)
            shapes[f"{layer}attention.{proj}.bias"] = (hidden,)
        if inv_freq:
            shapes[f"{layer}attention.rotary_emb.inv_freq"] = (config.head_dim // 2,)
        shapes[f"{layer}post_attn_layer_norm.weight"] = shapes[f"{layer}post_attn_layer_norm.bias"] = (hidden,)
        shapes[f"{layer}post_attn_dense.weight"] = (hidden, hidden)
        shapes[f"{layer}post_attn_dense.bias"] = (hidden,)
        shapes[f"{layer}pre_ffn_layer_norm.weight"] = shapes[f"{layer}pre_ffn_layer_norm.bias"] = (hidden,)
        shapes[f"{layer}intermediate_dense.weight"] = (ffn, hidden)
        shapes[f"{layer}intermediate_dense.bias"] = (ffn,)
        shapes[f"{layer}post_ffn_layer_norm.weight"] = shapes[f"{layer}post_ffn_layer_norm.bias"] = (ffn,)
        shapes[f"{layer}output_dense.weight"] = (hidden, ffn)
        shapes[f"{layer}output_dense.bias"] = (hidden,)
    if head:
        shapes["cls.0.weight"], shapes["cls.0.bias"] = (hidden, hidden), (hidden,)
        shapes["cls.2.weight"], shapes["cls.2.bias"] = (hidden,), (hidden,)
        shapes["cls.3.weight"], shapes["cls.3.bias"] = (vocab, hidden), (vocab,)
    return shapes


def reference_inv_freq(config: EnCodonConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The reference's RoPE buffer, ``1 / theta ** (arange(0, d, 2) / d)`` in float32 (bioscale's
    :func:`~bioscale.models.rotary.compute_inv_freq`, bit-identical)."""
    return compute_inv_freq(config.head_dim, config.rotary_theta, device=device)


def _strip_lightning_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(LIGHTNING_PREFIX) for key in state):
        return {key[len(LIGHTNING_PREFIX) :]: value for key, value in state.items()}
    return dict(state)


def check_reference_state_dict(state: Mapping[str, torch.Tensor], config: EnCodonConfig, *, head: bool = True) -> None:
    """``ValueError`` naming the tensors unless ``state`` holds exactly the released tensors of ``config`` (the
    ``inv_freq`` buffers may be absent: all or none), and naming both values when its ``inv_freq`` buffers were
    computed with another theta than ``config.rotary_theta``."""
    has_inv_freq = any(key.endswith("rotary_emb.inv_freq") for key in state)
    expected = reference_tensor_shapes(config, inv_freq=has_inv_freq, head=head)
    if not head:
        state = {key: value for key, value in state.items() if not key.startswith("cls.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(key.startswith(("cross_attention", "model.cross_attention")) for key in unexpected):
            hint = " (cross_attention_* is CodonFM's downstream head, which bioscale does not implement)"
        elif any("lora_" in key for key in unexpected):
            hint = " (LoRA adapters: merge them into the weights first)"
        raise ValueError(
            f"state dict does not fit EnCodon {config.num_hidden_layers}x{config.hidden_size}: missing tensors "
            f"{missing}, unexpected {unexpected}{hint}"
        )
    wrong = {key: tuple(state[key].shape) for key, shape in expected.items() if tuple(state[key].shape) != shape}
    if wrong:
        details = ", ".join(f"{key} {got} (expected {expected[key]})" for key, got in sorted(wrong.items()))
        raise ValueError(f"state dict does not fit the EnCodon config: tensors of the wrong shape: {details}")
    if has_inv_freq:
        want = reference_inv_freq(config)
        for key in (k for k in expected if k.endswith("inv_freq")):
            got = state[key].detach().to("cpu", torch.float32)
            if not torch.allclose(got, want, rtol=1e-5, atol=0):
                implied = float(f"{float(got[-1]) ** (-config.head_dim / (config.head_dim - 2)):.6g}")
                raise ValueError(
                    f"{key} was computed with RoPE theta ~{implied:g}, but the config says rotary_theta="
                    f"{config.rotary_theta:g}; set rotary_theta={implied:g} in the config"
                )


def _base_from_reference(state: Mapping[str, torch.Tensor], config: EnCodonConfig) -> dict[str, torch.Tensor]:
    """bioscale ``EnCodonModel`` tensors from the released ones (``inv_freq`` buffers are not among them: bioscale's
    are non-persistent, recomputed from ``rotary_theta``)."""
    out = {
        "embed_tokens.weight": pad_rows(state["embeddings.word_embeddings.weight"], config.embedding_rows),
        "embed_norm.weight": state["embeddings.post_ln.weight"],
        "embed_norm.bias": state["embeddings.post_ln.bias"],
    }
    pairs = {
        "attention_norm": "pre_attn_layer_norm",
        "attention.out_norm": "post_attn_layer_norm",
        "attention.out_proj": "post_attn_dense",
        "mlp_norm": "pre_ffn_layer_norm",
        "mlp.up_proj": "intermediate_dense",
        "mlp.inner_norm": "post_ffn_layer_norm",
        "mlp.down_proj": "output_dense",
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attention.qkv_proj.{kind}"] = torch.cat(
                [state[f"{src}attention.{proj}.{kind}"] for proj in ("query", "key", "value")], dim=0
            )
            for ours, theirs in pairs.items():
                out[f"{dst}{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    return out


def _head_from_reference(state: Mapping[str, torch.Tensor], config: EnCodonConfig) -> dict[str, torch.Tensor]:
    return {
        "lm_head.dense.weight": state["cls.0.weight"],
        "lm_head.dense.bias": state["cls.0.bias"],
        "lm_head.norm.weight": state["cls.2.weight"],
        "lm_head.norm.bias": state["cls.2.bias"],
        "lm_head.decoder.weight": pad_rows(state["cls.3.weight"], config.embedding_rows),
        "lm_head.decoder.bias": pad_rows(state["cls.3.bias"], config.embedding_rows),
    }


def from_reference_state_dict(
    state: Mapping[str, torch.Tensor], config: EnCodonConfig, task: str = "masked_lm"
) -> EnCodonPreTrainedModel:
    """The bioscale model for ``task`` with the released tensors ``state`` (copied; a Lightning ``model.`` prefix is
    removed).

    ``"masked_lm"`` keeps every tensor; ``"base"`` keeps the encoder (the ``cls`` head may be absent); a classification
    task puts a freshly initialised head on the encoder. ``state`` must hold exactly the released tensors of ``config``
    (:func:`check_reference_state_dict`).
    """
    if task not in _CLASSES:
        raise ValueError(f"EnCodon has no task {task!r}; choose one of {sorted(_CLASSES)}")
    state = _strip_lightning_prefix(state)
    has_head = any(key.startswith("cls.") for key in state)
    check_reference_state_dict(state, config, head=task == "masked_lm" or has_head)
    base = _base_from_reference(state, config)
    if task == "base":
        return build_bioscale_from_state_dict(EnCodonModel, config, base)
    if task == "masked_lm":
        full = {f"encodon.{key}": value for key, value in base.items()}
        full.update(_head_from_reference(state, config))
        return build_bioscale_from_state_dict(EnCodonForMaskedLM, config, full)
    device = state["embeddings.word_embeddings.weight"].device
    with torch.device(device):
        model = _CLASSES[task](config)  # built (and its head initialised) on the weights' device
    model.encodon.load_state_dict(base, strict=True)
    return model.to(state["embeddings.word_embeddings.weight"].dtype)


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def to_reference_state_dict(model: EnCodonPreTrainedModel, *, inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """The released tensors (names and order of the reference ``EnCodon`` module) of an ``EnCodonForMaskedLM``, copied;
    ``inv_freq`` adds the reference's persistent RoPE buffers (float32, computed as the reference computes them).

    Raises ``ValueError`` for the other classes: the released model is the masked LM, head included.
    """
    if not isinstance(model, EnCodonForMaskedLM):
        raise ValueError(
            f"{type(model).__name__} has no released EnCodon counterpart (the released model is the masked LM, cls "
            "head included); convert an EnCodonForMaskedLM"
        )
    config: EnCodonConfig = model.config
    state = {key: value.detach() for key, value in model.state_dict().items()}
    base = _prefixed(state, "encodon.")
    hidden, vocab = config.hidden_size, config.vocab_size
    ours = {
        "pre_attn_layer_norm": "attention_norm",
        "post_attn_layer_norm": "attention.out_norm",
        "post_attn_dense": "attention.out_proj",
        "pre_ffn_layer_norm": "mlp_norm",
        "intermediate_dense": "mlp.up_proj",
        "post_ffn_layer_norm": "mlp.inner_norm",
        "output_dense": "mlp.down_proj",
    }
    out: dict[str, torch.Tensor] = {}
    for name in reference_tensor_shapes(config, inv_freq=inv_freq):
        if name == "embeddings.word_embeddings.weight":
            out[name] = base["embed_tokens.weight"][:vocab]
        elif name.startswith("embeddings.post_ln."):
            out[name] = base[f"embed_norm.{name.rsplit('.', 1)[1]}"]
        elif name.startswith("cls."):
            index, kind = name.split(".")[1:]
            module = {"0": "dense", "2": "norm", "3": "decoder"}[index]
            tensor = state[f"lm_head.{module}.{kind}"]
            out[name] = tensor[:vocab] if module == "decoder" else tensor
        else:
            layer, rest = name.split(".", 2)[1:]
            module, kind = rest.rsplit(".", 1)
            if module == "attention.rotary_emb":
                out[name] = reference_inv_freq(config, device=base["embed_tokens.weight"].device)
            elif module.startswith("attention."):
                which = ("query", "key", "value").index(module.split(".")[1])
                fused = base[f"layers.{layer}.attention.qkv_proj.{kind}"]
                out[name] = fused[which * hidden : (which + 1) * hidden]
            else:
                out[name] = base[f"layers.{layer}.{ours[module]}.{kind}"]
    # Own, contiguous storage per tensor: safetensors refuses tensors that share memory (q / k / v are views).
    return {key: value.contiguous().clone() for key, value in out.items()}


class EnCodonReferenceCheckpoint:
    """A bioscale EnCodon in the released format: ``config`` (the ``config.json`` dict: ``EncodonPL``'s arguments) and
    ``state_dict`` (the released tensor names). ``save_pretrained(directory)`` writes ``config.json`` +
    ``model.safetensors``; the reference ``EnCodon`` loads those tensors with ``load_state_dict(strict=True)``."""

    def __init__(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state_dict)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write ``config.json`` and ``model.safetensors``; ``safe_serialization=False`` is refused (safetensors
        only: bioscale never writes or reads pickled weights)."""
        from safetensors.torch import save_file

        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("EnCodon reference checkpoints are written as safetensors only")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.cpu() for k, v in self._state_dict.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        return directory

    def __repr__(self) -> str:
        return f"EnCodonReferenceCheckpoint({self.config['num_hidden_layers']}x{self.config['hidden_size']})"


def from_hf(reference_model: nn.Module, **config_overrides: Any) -> EnCodonForMaskedLM:
    """bioscale ``EnCodonForMaskedLM`` with the weights of a loaded reference ``EnCodon`` module (copied).

    Recognised by its config (the EnCodon fields, ``rotary_theta`` among them), never by importing CodonFM code.
    ``config_overrides`` set bioscale-only fields (``padded_vocab_size``, ``attn_backend``).
    """
    config = getattr(reference_model, "config", None)
    fields = config.to_dict() if hasattr(config, "to_dict") else None
    if not isinstance(fields, Mapping) or not is_reference_config(fields):
        raise ValueError(
            f"{type(reference_model).__name__} is not CodonFM's EnCodon (its config has no EnCodon fields; model_type "
            f"{getattr(config, 'model_type', None)!r})"
        )
    model = from_reference_state_dict(reference_model.state_dict(), config_from_reference(fields, **config_overrides))
    assert isinstance(model, EnCodonForMaskedLM)
    return model


def to_hf(model: EnCodonPreTrainedModel) -> EnCodonReferenceCheckpoint:
    """``model`` in the released format (an ``EnCodonForMaskedLM`` only; see :class:`EnCodonReferenceCheckpoint`)."""
    return EnCodonReferenceCheckpoint(reference_config_dict(model.config), to_reference_state_dict(model))


def save_reference_checkpoint(model: EnCodonPreTrainedModel, directory: str | Path) -> Path:
    """Write ``model`` as a released EnCodon checkpoint (``config.json`` + ``model.safetensors``) to ``directory``."""
    return to_hf(model).save_pretrained(directory)

