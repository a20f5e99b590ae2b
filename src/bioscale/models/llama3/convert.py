"""Exact conversion between ``transformers`` Llama (``LlamaForCausalLM``, ``LlamaModel``) and bioscale Llama 3.

Every tensor survives the round trip bit for bit: q/k/v are concatenated into ``qkv_proj`` and gate/up into
``gate_up_proj`` (and split back), vocabulary padding is added and removed, tied embeddings stay tied. RoPE settings are
read from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (transformers 4). Llama variants
that Llama 3 does not use — attention or MLP biases, an activation other than SiLU, RoPE scalings other than
``llama3`` — raise ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedModel

from bioscale.models.hf_utils import build_bioscale_from_state_dict, build_hf_from_state_dict, pad_rows, require
from bioscale.models.llama3.config import Llama3Config
from bioscale.models.llama3.modeling import Llama3ForCausalLM, Llama3Model, Llama3PreTrainedModel
from bioscale.models.rotary import validate_rope_scaling


def _hf_rope(hf_config: LlamaConfig) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either generation of ``transformers`` config."""
    rope_parameters = getattr(hf_config, "rope_parameters", None)
    if isinstance(rope_parameters, dict) and rope_parameters:
        theta = rope_parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return float(theta), validate_rope_scaling(rope_parameters)
    return float(getattr(hf_config, "rope_theta", 10000.0)), validate_rope_scaling(
        getattr(hf_config, "rope_scaling", None)
    )


def config_from_hf(hf_config: LlamaConfig, **overrides: Any) -> Llama3Config:
    """``Llama3Config`` equivalent to ``hf_config``; ``overrides`` set bioscale-only fields."""
    require(not getattr(hf_config, "attention_bias", False), "attention_bias=True is not supported (Llama 3 has none)")
    require(not getattr(hf_config, "mlp_bias", False), "mlp_bias=True is not supported (Llama 3 has none)")
    require(
        getattr(hf_config, "hidden_act", "silu") == "silu",
        f"hidden_act={getattr(hf_config, 'hidden_act', None)!r} is not supported (Llama 3 uses 'silu')",
    )
    rope_theta, rope_scaling = _hf_rope(hf_config)
    kwargs: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        initializer_range=hf_config.initializer_range,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        use_cache=getattr(hf_config, "use_cache", True),
    )
    kwargs.update(overrides)
    return Llama3Config(**kwargs)


def config_to_hf(config: Llama3Config) -> LlamaConfig:
    """The stock ``LlamaConfig`` of ``config`` (bioscale-only fields are dropped: they do not change outputs).

    Its ``config.json`` reads as the same model in every supported ``transformers`` release: see
    :func:`_write_rope_for_every_version`.
    """
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        # Both generations of transformers accept the 4.x spelling (5.x folds it into rope_parameters).
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        attention_bias=False,
        attention_dropout=config.attention_dropout,
        mlp_bias=False,
    )
    _write_rope_for_every_version(hf_config, config.rope_theta, config.rope_scaling)
    return hf_config


def _write_rope_for_every_version(hf_config: LlamaConfig, rope_theta: float, rope_scaling: dict | None) -> None:
    """Make ``hf_config.save_pretrained`` write the RoPE settings under the 4.x keys as well as 5.x's.

    transformers 5 folds ``rope_theta`` and ``rope_scaling`` into ``rope_parameters`` and writes only that; 4.x does
    not know ``rope_parameters`` and silently falls back to ``rope_theta`` 10000 and no scaling, a different model.
    5.x reads ``rope_parameters`` first, so the extra keys change nothing there. ``to_dict`` serialises the instance
    ``__dict__``; on 5.x ``rope_scaling`` is a class property, hence the direct writes.
    """
    hf_config.__dict__.setdefault("rope_theta", float(rope_theta))
    hf_config.__dict__.setdefault("rope_scaling", dict(rope_scaling) if rope_scaling else None)


def _base_from_hf(hf_state: dict[str, torch.Tensor], prefix: str, config: Llama3Config) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": pad_rows(hf_state[f"{prefix}embed_tokens.weight"], config.embedding_rows)}
    for i in range(config.num_hidden_layers):
        src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
        out[f"{dst}attention.qkv_proj.weight"] = torch.cat(
            [hf_state[f"{src}self_attn.{proj}_proj.weight"] for proj in ("q", "k", "v")], dim=0
        )
        out[f"{dst}attention.o_proj.weight"] = hf_state[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}mlp.gate_up_proj.weight"] = torch.cat(
            [hf_state[f"{src}mlp.gate_proj.weight"], hf_state[f"{src}mlp.up_proj.weight"]], dim=0
        )
        out[f"{dst}mlp.down_proj.weight"] = hf_state[f"{src}mlp.down_proj.weight"]
        out[f"{dst}attention_norm.weight"] = hf_state[f"{src}input_layernorm.weight"]
        out[f"{dst}mlp_norm.weight"] = hf_state[f"{src}post_attention_layernorm.weight"]
    out["norm.weight"] = hf_state[f"{prefix}norm.weight"]
    return out


def _base_to_hf(state: dict[str, torch.Tensor], prefix: str, config: Llama3Config) -> dict[str, torch.Tensor]:
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    out = {f"{prefix}embed_tokens.weight": state["embed_tokens.weight"][: config.vocab_size]}
    for i in range(config.num_hidden_layers):
        src, dst = f"layers.{i}.", f"{prefix}layers.{i}."
        q, k, v = state[f"{src}attention.qkv_proj.weight"].split((q_dim, kv_dim, kv_dim), dim=0)
        out[f"{dst}self_attn.q_proj.weight"] = q
        out[f"{dst}self_attn.k_proj.weight"] = k
        out[f"{dst}self_attn.v_proj.weight"] = v
        out[f"{dst}self_attn.o_proj.weight"] = state[f"{src}attention.o_proj.weight"]
        gate, up = state[f"{src}mlp.gate_up_proj.weight"].chunk(2, dim=0)
        out[f"{dst}mlp.gate_proj.weight"] = gate
        out[f"{dst}mlp.up_proj.weight"] = up
        out[f"{dst}mlp.down_proj.weight"] = state[f"{src}mlp.down_proj.weight"]
        out[f"{dst}input_layernorm.weight"] = state[f"{src}attention_norm.weight"]
        out[f"{dst}post_attention_layernorm.weight"] = state[f"{src}mlp_norm.weight"]
    out[f"{prefix}norm.weight"] = state["norm.weight"]
    return out


def from_hf(hf_model: PreTrainedModel, **config_overrides: Any) -> Llama3PreTrainedModel:
    """bioscale Llama 3 with the weights of ``hf_model`` (copied).

    ``LlamaForCausalLM`` → :class:`Llama3ForCausalLM`, ``LlamaModel`` → :class:`Llama3Model`. ``config_overrides``
    set bioscale-only fields (``padded_vocab_size``, ``attn_backend``).
    """
    config = config_from_hf(hf_model.config, **config_overrides)
    hf_state = hf_model.state_dict()
    if isinstance(hf_model, LlamaForCausalLM):
        state = {f"model.{k}": v for k, v in _base_from_hf(hf_state, "model.", config).items()}
        if config.tie_word_embeddings:
            require(
                torch.equal(hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]),
                "tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight",
            )
        else:
            state["lm_head.weight"] = pad_rows(hf_state["lm_head.weight"], config.embedding_rows)
        return build_bioscale_from_state_dict(Llama3ForCausalLM, config, state)
    if isinstance(hf_model, LlamaModel):
        return build_bioscale_from_state_dict(Llama3Model, config, _base_from_hf(hf_state, "", config))
    raise ValueError(f"{type(hf_model).__name__} is not supported; convert LlamaForCausalLM or LlamaModel")


def to_hf(model: Llama3PreTrainedModel) -> PreTrainedModel:
    """The stock ``transformers`` model with ``model``'s weights (copied); loads with no bioscale installed."""
    config: Llama3Config = model.config
    hf_config = config_to_hf(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, Llama3ForCausalLM):
        base = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        hf_state = _base_to_hf(base, "model.", config)
        if config.tie_word_embeddings:
            hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
        else:
            hf_state["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
        return build_hf_from_state_dict(LlamaForCausalLM, hf_config, hf_state)
    if isinstance(model, Llama3Model):
        return build_hf_from_state_dict(LlamaModel, hf_config, _base_to_hf(state, "", config))
    raise ValueError(f"{type(model).__name__} is not a bioscale Llama 3 model")
