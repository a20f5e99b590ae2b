"""AMPLIFY as ``transformers`` ``PreTrainedModel`` subclasses: base encoder, masked LM, token and sequence
classification.

Computes the same function as chandar-lab's published ``AMPLIFY`` (the Hugging Face remote code of
``chandar-lab/AMPLIFY_*``; checked to 1e-4 in float32 by the tests against the copy in ``../shared/reference``): a
pre-norm encoder with RMSNorm everywhere and no norm after the embedding, no absolute positions, bias-free attention
with interleaved RoPE (adjacent pairs rotated as complex numbers, theta 10000) and scale ``head_dim ** -0.5``, a
SwiGLU MLP ``int(2I/3)`` wide rounded up to a multiple of 8, a final RMSNorm and an untied decoder with a bias.
bioscale fuses the projections for speed (one ``qkv_proj`` for the published ``q``/``k``/``v``; one ``gate_up_proj`` =
the published ``w12``, gate then up) and runs attention behind :func:`bioscale.models.attention.attention_forward`, so
padded (``attention_mask``) and packed (``cu_seq_lens_q/k``) batches go through the same blocks and backends as
ESM-2. Where the two differ numerically, the code says so:

- RoPE: the published code rotates ``q``/``k`` in float32 with a float32 (complex64) table whatever the activation
  dtype; so does this one (tables are computed in float32 and not cast to the activation dtype, unlike ESM-2's).
- RMSNorm: the published norm computes in the activation dtype; :class:`bioscale.models.layers.RMSNorm` computes in
  float32 and casts back before the weight (identical in float32, a rounding difference in bf16).
- The published forward turns ``attention_mask`` into a *bf16* additive mask even in float32 (chandar-lab/AMPLIFY
  issue 16); bioscale uses a boolean key mask, so padded rows equal the published model run on each sequence alone.
- The final RMSNorm belongs to the base model here (``last_hidden_state`` is normalised, as for ESM-2), where the
  published model applies it just before the decoder; its ``hidden_states[-1]`` is the pre-norm state.

Transformer blocks are ``model.layers`` on every class. A block is called as
``block(hidden_states [B, S, D], rotary=(cos, sin), attn_inputs=AttentionInputs, residual=None) -> (out, residual)``,
the residual stream carried as two tensors whose sum it is (as ``Esm2Block`` does, and for the same reason: the add
fuses into the next block's first norm when blocks are compiled one by one); it contains no host synchronisation and no
Python branching on tensor values, so each block can be wrapped by ``torch.compile``, activation checkpointing or
``fully_shard`` from outside.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from bioscale.models.amplify.config import AmplifyConfig
from bioscale.models.attention import AttentionInputs, attention_forward
from bioscale.models.batch import Batch, labels_like, mean_pool, unbatch
from bioscale.models.common import (
    BioscalePreTrainedModel,
    EncoderHeadsMixin,
    EncoderInputsMixin,
    attention_inputs_for_batch,
    init_in_place,
    keep_as_is,
    reject_unknown_kwargs,
)
from bioscale.models.hf_contract import HFContractMixin, pop_forward_options
from bioscale.models.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary
from bioscale.models.loss import (
    check_loss_reduction,
    sequence_classification_loss,
    token_cross_entropy,
)
from bioscale.models.outputs import (
    MaskedLMOutputWithCount,
    SequenceClassifierOutputWithCount,
    TokenClassifierOutputWithCount,
)


class AmplifyAttention(nn.Module):
    """Bias-free self-attention with a fused ``qkv_proj`` (the published ``q``, ``k``, ``v`` stacked in that order
    along the output dim) and ``out_proj`` (the published ``wo``)."""

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_inputs: AttentionInputs
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        # The published code rotates q/k as complex64 numbers (float32) and hands back the activation dtype.
        q, k = apply_rotary(q, k, *rotary, compute_in_float32=True, interleaved=True)
        out = attention_forward(q, k, v, attn_inputs, scale=self.head_dim**-0.5)
        return self.out_proj(out.reshape(batch, seq_len, -1))


class AmplifyMLP(SwiGLUMLP):
    """AMPLIFY's SwiGLU: ``down_proj(silu(gate) * up)``, ``gate_up_proj`` = the published ``w12`` (gate then up),
    ``down_proj`` = ``w3``, :attr:`AmplifyConfig.ffn_hidden_size` wide, no biases."""

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__(config.hidden_size, config.ffn_hidden_size, bias=False)


class AmplifyBlock(nn.Module):
    """Pre-RMSNorm encoder block: ``h = x + attn(norm(x))``, then ``h + mlp(norm(h))`` (published ``EncoderBlock``).

    Input and output are each two tensors whose sum is the residual stream, exactly as in ``Esm2Block`` (see its
    docstring): the block takes ``(hidden_states, residual)`` with ``x = hidden_states + residual`` and returns
    ``(mlp_out, h)``, leaving the last add to the next block, where it fuses into that block's RMSNorm. The sums are the
    same floating-point additions as the one-tensor form.
    """

    # Adapter (PEFT) layout, bioscale.models.adapters: the published module names (q, k, v, wo; ffn.w12 = gate then
    # up, fused there too, and ffn.w3), so LoRA lists written for chandar-lab's AMPLIFY adapt the same linears.
    adapter_layout = {
        "attention.qkv_proj": ("attention.q", "attention.k", "attention.v"),
        "attention.out_proj": ("attention.wo",),
        "mlp.gate_up_proj": ("mlp.w12",),
        "mlp.down_proj": ("mlp.w3",),
    }

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attention = AmplifyAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = AmplifyMLP(config)
        self.dropout = nn.Dropout(config.dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_inputs: AttentionInputs,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states + self.dropout(
            self.attention(self.attention_norm(hidden_states), rotary, attn_inputs)
        )
        return self.dropout(self.mlp(self.mlp_norm(hidden_states))), hidden_states


class AmplifyPreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = AmplifyConfig
    base_model_prefix = "amplify"
    main_input_name = "input_ids"
    _no_split_modules = ["AmplifyBlock"]

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        """The published initialisation: every linear weight ~ U(-decoder_init_range, +), the embedding ~
        U(-embedding_init_range, +); biases zero. bioscale also zeroes the padding token's embedding row (its gradient
        is zero anyway: ``padding_idx``) and every vocabulary-padding row."""
        config: AmplifyConfig = self.config
        if isinstance(module, nn.Linear):
            if not keep_as_is(module.weight, only_missing):
                init_in_place(module.weight, lambda w: nn.init.uniform_(w, -config.decoder_init_range,
                                                                        config.decoder_init_range))  # fmt: skip
                if module is getattr(self, "lm_head", None):
                    self._zero_padded_vocab_rows(module.weight)
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if not keep_as_is(module.weight, only_missing):
                padding_idx = module.padding_idx

                def embedding(w: torch.Tensor) -> None:
                    nn.init.uniform_(w, -config.embedding_init_range, config.embedding_init_range)
                    if padding_idx is not None:
                        w[padding_idx].zero_()
                    self._zero_padded_vocab_rows(w)

                init_in_place(module.weight, embedding)
        else:
            super()._init_module(module, only_missing)  # RMSNorm, RoPE tables


class AmplifyModel(EncoderInputsMixin, AmplifyPreTrainedModel):
    """The AMPLIFY encoder; ``forward`` returns ``BaseModelOutput(last_hidden_state)`` after the final RMSNorm."""

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta, interleaved=True)
        self.layers = nn.ModuleList([AmplifyBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def encode(self, batch: Batch) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` (packed: ``[1, T, D]``) after the final RMSNorm."""
        hidden_states = self.embed_tokens(batch.input_ids)
        # float32 tables whatever the activation dtype, as the published complex64 table (see the module docstring).
        rotary = self.rotary(batch.position_ids, torch.float32)
        dropout_p = self.config.dropout_prob if self.training else 0.0
        attn_inputs = attention_inputs_for_batch(
            batch, hidden_states, backend=self.config.attn_backend, causal=False, dropout_p=dropout_p
        )
        residual = None
        for block in self.layers:
            hidden_states, residual = block(hidden_states, rotary, attn_inputs, residual)
        return self.norm(hidden_states + residual if residual is not None else hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        batch = self.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        hidden_states = self.encode(batch)
        return BaseModelOutput(last_hidden_state=unbatch(hidden_states, batch))


class _AmplifyWithBase(EncoderHeadsMixin, AmplifyPreTrainedModel):
    """Shared plumbing of the heads: the ``amplify`` base model and ``layers``."""

    amplify: AmplifyModel


class AmplifyForMaskedLM(_AmplifyWithBase):
    """AMPLIFY with its masked-LM decoder (the published ``AMPLIFY``): an untied ``lm_head`` with a bias, logits
    sliced to ``vocab_size`` (vocabulary-padding columns dropped)."""

    _output_embeddings_path = "lm_head"

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__(config)
        self.amplify = AmplifyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.embedding_rows, bias=True)
        self.post_init()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # drop the vocabulary-padding columns
        return logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> MaskedLMOutputWithCount:
        """Masked-LM forward.

        Args:
            labels: token ids to predict, ``-100`` where there is nothing to predict; same shape as ``input_ids``.
            loss_reduction: ``"mean"`` over label tokens or ``"sum"``; ``num_label_tokens`` is always returned.
            logits_on_labels_only (keyword, in ``kwargs``): with ``labels``, run the decoder only where
                ``labels != -100``; ``logits`` is then ``[num_label_tokens, vocab_size]`` and ``loss`` is unchanged
                (one host sync).
            num_items_in_batch (keyword, in ``kwargs``): ``Trainer``'s label-token count over the accumulated step;
                the loss is then the sum of token losses divided by it (:mod:`bioscale.models.hf_contract`).
        """
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch, hidden_states = self._batch_and_hidden(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        return self._masked_lm_output(hidden_states, batch, labels, head=self.compute_logits,
                                      loss_reduction=loss_reduction, options=options)  # fmt: skip


class AmplifyForTokenClassification(_AmplifyWithBase):
    """Per-token classification: dropout → linear on the encoder's hidden states (no published counterpart; a fresh
    head on a converted encoder)."""

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amplify = AmplifyModel(config)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> TokenClassifierOutputWithCount:
        """Token classification; ``labels`` like ``input_ids`` with class ids, ``-100`` where unlabelled."""
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch, hidden_states = self._batch_and_hidden(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        logits = self.classifier(self.dropout(hidden_states))
        loss = count = None
        if labels is not None:
            loss_sum, count = token_cross_entropy(logits, labels_like(labels, batch), reduction="sum")
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return TokenClassifierOutputWithCount(loss=loss, logits=unbatch(logits, batch), num_label_tokens=count)


class AmplifyClassificationHead(nn.Module):
    """dense → tanh → dropout → out_proj on a pooled sequence embedding (the same head as ESM-2's)."""

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class AmplifyForSequenceClassification(_AmplifyWithBase):
    """Per-sequence classification or regression on the *mean* of each sequence's hidden states.

    Pooling is the mean over every non-padding token of a sequence (``<bos>`` and ``<eos>`` included), per sequence in
    packed batches too; ``logits`` are ``[num_sequences, num_labels]``. The loss follows ``transformers``'
    ``problem_type`` rules: ``"regression"`` (MSE; the default when ``num_labels == 1``),
    ``"single_label_classification"`` (cross-entropy; default for integer labels) or ``"multi_label_classification"``
    (BCE with logits; default for float labels). The same contract as ``Esm2ForSequenceClassification``.
    """

    def __init__(self, config: AmplifyConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amplify = AmplifyModel(config)
        self.classifier = AmplifyClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithCount:
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch, hidden_states = self._batch_and_hidden(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        logits = self.classifier(mean_pool(hidden_states, batch))
        loss = count = None
        if labels is not None:
            loss_sum, count = sequence_classification_loss(
                logits, labels.to(logits.device), problem_type=self.config.problem_type, num_labels=self.num_labels,
                reduction="sum",
            )  # fmt: skip
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return SequenceClassifierOutputWithCount(loss=loss, logits=logits, num_label_tokens=count)
