"""Llama 3 as ``transformers`` ``PreTrainedModel`` subclasses: the decoder (``Llama3Model``) and the causal LM.

Computes the same function as ``transformers``' ``LlamaForCausalLM`` (checked to 1e-4 in float32, with grouped-query
attention and ``llama3`` RoPE scaling) with fused projections — one ``qkv_proj`` (query, key, value stacked along the
output dimension) and one ``gate_up_proj`` (gate, then up) — and attention behind
:func:`bioscale.models.attention.attention_forward`, so padded and packed batches share the blocks. ``generate()``
works through ``transformers.GenerationMixin`` with a ``DynamicCache`` (padded ``sdpa`` path, left padding allowed).

Causal-LM labels. Pass ``labels`` *unshifted*, exactly like ``input_ids`` with ``-100`` where nothing is to be
predicted (as ``transformers`` expects); the model shifts them itself with
:func:`bioscale.models.loss.shift_labels`: the logits at
position ``i`` are scored against ``labels[i + 1]``. In a packed batch the shift never crosses a boundary: the last
token of each sequence predicts nothing (it is *not* asked to predict the first token of the next sequence). Code that
has already shifted (context parallelism shards after shifting) passes ``shift_labels`` instead, used as is (a keyword
option, not a parameter: ``Trainer`` takes every parameter named ``*label*`` for a label).

Transformer blocks are ``model.layers`` on both classes. A block is called as
``block(hidden_states [B, S, D], rotary=(cos, sin), attn_inputs=AttentionInputs, kv_cache=None) -> [B, S, D]``;
without a KV cache it has no host synchronisation and no Python branching on tensor values, so each block can be
wrapped by ``torch.compile``, activation checkpointing or ``fully_shard`` from outside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from bioscale.models.attention import AttentionInputs, attention_forward
from bioscale.models.batch import Batch, labels_like, prepare_batch, unbatch
from bioscale.models.common import (
    BioscalePreTrainedModel,
    attention_inputs_for_batch,
    keep_as_is,
    output_cache_field,
    split_forward_kwargs,
)
from bioscale.models.hf_contract import HFContractMixin, pop_forward_options
from bioscale.models.llama3.config import Llama3Config
from bioscale.models.loss import check_loss_reduction, select_label_positions, shift_labels, token_cross_entropy
from bioscale.models.outputs import CausalLMOutputWithCount
from bioscale.models.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary


class Llama3Attention(nn.Module):
    """Grouped-query self-attention with a fused bias-free ``qkv_proj``."""

    def __init__(self, config: Llama3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: AttentionInputs,
        kv_cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).split(self.split_sizes, dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rotary)
        if kv_cache is not None:
            # transformers caches are [B, H, S, D]; attention here is [B, S, H, D] (transposes are views).
            k, v = kv_cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = attention_forward(q, k, v, attn_inputs, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(batch, seq_len, -1))


class Llama3MLP(SwiGLUMLP):
    """Llama's SwiGLU MLP (:class:`bioscale.models.layers.SwiGLUMLP`, gate and up fused in ``gate_up_proj``)."""

    def __init__(self, config: Llama3Config) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, bias=False)


class Llama3Block(nn.Module):
    """Pre-RMSNorm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    # Adapter (PEFT) layout, bioscale.models.adapters: LlamaDecoderLayer's projection names (o_proj and down_proj
    # already have them), so q_proj ... up_proj target lists adapt what they adapt on LlamaForCausalLM.
    adapter_layout = {
        "attention.qkv_proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }

    def __init__(self, config: Llama3Config, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Llama3Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Llama3MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: AttentionInputs,
        kv_cache: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), rotary, attn_inputs, kv_cache
        )
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class Llama3PreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = Llama3Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Llama3Block"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        super()._init_module(module, only_missing)
        if module is getattr(self, "lm_head", None) and not keep_as_is(module.weight, only_missing):
            self._zero_padded_vocab_rows(module.weight)


class Llama3Model(Llama3PreTrainedModel):
    """The Llama 3 decoder; ``forward`` returns ``BaseModelOutputWithPast`` after the final RMSNorm."""

    def __init__(self, config: Llama3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta, rope_scaling=config.rope_scaling)
        self.layers = nn.ModuleList([Llama3Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def prepare_batch(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        past_key_values: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> Batch:
        """Validate the forward inputs (see :func:`bioscale.models.batch.prepare_batch`; every packed form of
        ``DataCollatorWithFlattening`` is accepted)."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        return prepare_batch(
            input_ids,
            vocab_size=self.config.vocab_size,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            past_length=past_length,
            seq_idx=seq_idx,
            derive_packing=True,
        )

    def decode(self, batch: Batch, kv_cache: Cache | None = None) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` (packed: ``[1, T, D]``) after the final RMSNorm; appends to ``kv_cache``."""
        if batch.is_packed and kv_cache is not None:
            raise ValueError("a KV cache (use_cache / past_key_values) is not supported with packed inputs")
        hidden_states = self.embed_tokens(batch.input_ids)
        rotary = self.rotary(batch.position_ids, hidden_states.dtype)
        dropout_p = self.config.attention_dropout if self.training else 0.0
        # KV-cache decoding always runs on sdpa (the cache is padded, never packed).
        backend = "sdpa" if kv_cache is not None else self.config.attn_backend
        attn_inputs = attention_inputs_for_batch(batch, hidden_states, backend=backend, causal=True, dropout_p=dropout_p)
        for block in self.layers:
            hidden_states = block(hidden_states, rotary, attn_inputs, kv_cache)
        return self.norm(hidden_states)

    def _cache_for(
        self, past_key_values: Cache | None, use_cache: bool | None, kwargs: dict[str, Any], caller: str
    ) -> Cache | None:
        """The KV cache of one forward: ``past_key_values``, or a cache passed under another name (transformers
        5.2x's ``generate()`` passes ``cache=``), or a new one when ``use_cache=True``; ``None`` for a plain forward.

        Checks the other extra keyword arguments (:func:`bioscale.models.common.split_forward_kwargs`).
        """
        other = split_forward_kwargs(caller, kwargs, takes_cache=True)
        if past_key_values is not None and other is not None and other is not past_key_values:
            raise ValueError(f"{caller}: two different KV caches were passed (past_key_values and cache)")
        if past_key_values is None:
            past_key_values = other
        # A plain forward (training) never builds a cache; generate() passes one, or use_cache=True asks for one.
        if past_key_values is None and use_cache:
            try:
                return DynamicCache(config=self.config)
            except TypeError:  # transformers 4.x: DynamicCache() takes no config
                return DynamicCache()
        return past_key_values

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        options = pop_forward_options(kwargs)
        kv_cache = self._cache_for(past_key_values, use_cache, kwargs, type(self).__name__)
        batch = self.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, kv_cache,
            options.seq_idx,
        )  # fmt: skip
        hidden_states = self.decode(batch, kv_cache)
        return BaseModelOutputWithPast(
            last_hidden_state=unbatch(hidden_states, batch), **{output_cache_field(BaseModelOutputWithPast): kv_cache}
        )


class Llama3ForCausalLM(Llama3PreTrainedModel, GenerationMixin):
    """Llama 3 with its LM head (``transformers.LlamaForCausalLM``), ``generate()`` included.

    With ``tie_word_embeddings`` the head reads the embedding matrix (there is no ``lm_head`` module).
    """

    _output_embeddings_path = "lm_head"  # absent (None) when tied

    # Fast generation (static KV cache, CUDA-graph decode step): the blocks keep the contract in
    # bioscale.models.decoding, which bioscale.use.generation_engine relies on.
    _supports_static_kv_decode = True

    def __init__(self, config: Llama3Config) -> None:
        super().__init__(config)
        self.model = Llama3Model(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.embedding_rows, bias=False)
        )
        self.post_init()

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks of the decoder (for FSDP / activation checkpointing / compile)."""
        return self.model.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM-head matrix ``[embedding_rows, hidden]`` (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (vocabulary-padding columns dropped)."""
        # Call the head module (not F.linear on its weight): wrappers that work through module hooks see its use
        # (Megatron-FSDP all-gathers a module's weights in its forward pre-hook and hangs its root backward hook on
        # the last module's output; reading lm_head.weight directly skipped both, so no gradient reached its
        # optimizer). Tied heads read the embedding matrix, gathered by the embedding's own forward.
        if self.lm_head is not None:
            logits = self.lm_head(hidden_states)
        else:
            logits = F.linear(hidden_states, self.model.embed_tokens.weight)
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> CausalLMOutputWithCount:
        """Causal-LM forward (padded, packed, or one decoding step with ``past_key_values``).

        Args:
            labels: unshifted targets like ``input_ids`` (``-100`` = ignore); shifted per sequence here (module
                docstring).
            logits_to_keep: ``generate()``'s knob: an int ``n > 0`` keeps the last ``n`` positions, a 1-D tensor the
                listed positions; ``0`` keeps all. Not combinable with labels.
            loss_reduction: ``"mean"`` over label tokens or ``"sum"``; ``num_label_tokens`` is always returned.
            shift_labels (keyword, in ``kwargs``): already-shifted targets, used as they are (give ``labels`` or
                ``shift_labels``, not both).
            logits_on_labels_only (keyword, in ``kwargs``): with labels, run the LM head only at scored positions;
                ``logits`` is then ``[num_label_tokens, vocab_size]`` and ``loss`` is unchanged.
            num_items_in_batch (keyword, in ``kwargs``): ``Trainer``'s count of label tokens over the accumulated
                step; the loss is then the sum of token losses divided by it (``transformers``' ``ForCausalLMLoss``).
        """
        options = pop_forward_options(kwargs, shift_labels=True)
        shift_labels = options.shift_labels
        check_loss_reduction(loss_reduction)
        if labels is not None and shift_labels is not None:
            raise ValueError("give labels (unshifted) or shift_labels (already shifted), not both")
        has_labels = labels is not None or shift_labels is not None
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if has_labels and not keep_all:
            raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position")
        kv_cache = self.model._cache_for(past_key_values, use_cache, kwargs, type(self).__name__)
        cache_field = {output_cache_field(CausalLMOutputWithCount): kv_cache}
        batch = self.model.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, kv_cache,
            options.seq_idx,
        )  # fmt: skip
        hidden_states = self.model.decode(batch, kv_cache)

        if not has_labels:
            if isinstance(logits_to_keep, int):
                hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits = unbatch(self.compute_logits(hidden_states), batch)
            return CausalLMOutputWithCount(logits=logits, **cache_field)

        if labels is not None:
            targets = shift_labels_fn(labels_like(labels, batch), batch.cu_seqlens)
        else:
            assert shift_labels is not None
            targets = labels_like(shift_labels, batch)
        if options.logits_on_labels_only:
            hidden_states, targets = select_label_positions(hidden_states, targets)
        logits = self.compute_logits(hidden_states)
        loss_sum, count = token_cross_entropy(logits, targets, reduction="sum")
        loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        if not options.logits_on_labels_only:
            logits = unbatch(logits, batch)
        return CausalLMOutputWithCount(loss=loss, logits=logits, num_label_tokens=count, **cache_field)


shift_labels_fn = shift_labels  # the forward() argument of the same name shadows the function inside forward
