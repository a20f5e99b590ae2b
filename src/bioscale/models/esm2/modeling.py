"""ESM-2 as ``transformers`` ``PreTrainedModel`` subclasses: base encoder, masked-LM, token and sequence classification.

Computes the same function as ``transformers``' ``EsmForMaskedLM`` (checked to 1e-4 in float32 by the tests), with
the projections fused for speed (one ``qkv_proj`` instead of query/key/value) and attention behind
:func:`bioscale.models.attention.attention_forward`, so padded (``attention_mask``) and packed (``cu_seq_lens_q/k``)
batches run through the same blocks. Where ESM differs from a textbook BERT, the code follows ESM and says so:
the query is scaled by ``head_dim ** -0.5`` *before* RoPE, GELU is the exact erf form, there is a LayerNorm after the
last block (``emb_layer_norm_after``), the LM head is dense → GELU → LayerNorm → decoder tied to the word embeddings
plus a bias, and token dropout rescales the embeddings by the observed mask ratio.

Transformer blocks are ``model.layers`` on every class. A block is called as
``block(hidden_states [B, S, D], rotary=(cos, sin), attn_inputs=AttentionInputs, residual=None) -> (out, residual)``,
the residual stream carried as two tensors whose sum it is (see :class:`Esm2Block` for why); it contains no
host synchronisation and no Python branching on tensor values, so each block can be wrapped by ``torch.compile``,
activation checkpointing or ``fully_shard`` from outside.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from bioscale.models.attention import AttentionInputs, attention_forward
from bioscale.models.batch import Batch, labels_like, mean_pool, unbatch
from bioscale.models.common import (
    BioscalePreTrainedModel,
    EncoderHeadsMixin,
    EncoderInputsMixin,
    attention_inputs_for_batch,
    keep_as_is,
    reject_unknown_kwargs,
)
from bioscale.models.esm2.config import Esm2Config
from bioscale.models.hf_contract import HFContractMixin, pop_forward_options
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
from bioscale.models.layers import GeluMLP, RotaryEmbedding, apply_rotary, gelu

# ESM was trained masking 15% of tokens and replacing 80% of those with <mask>: the expected <mask> ratio.
MASK_RATIO_TRAIN = 0.15 * 0.8


class Esm2Embeddings(nn.Module):
    """Word embeddings with ESM's token-dropout rescaling and optional LayerNorm (no position embeddings: RoPE)."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.embedding_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.emb_layer_norm_before else None
        )
        self.token_dropout = config.token_dropout
        self.mask_token_id = config.mask_token_id

    def forward(self, batch: Batch) -> torch.Tensor:
        input_ids = batch.input_ids
        embeddings = self.word_embeddings(input_ids)
        if self.token_dropout:
            # <mask> tokens are treated as dropped-out inputs: zeroed, and the rest scaled by
            # (1 - expected mask ratio) / (1 - observed mask ratio) of *their own* sequence (EsmEmbeddings).
            is_mask = input_ids == self.mask_token_id
            embeddings = embeddings.masked_fill(is_mask.unsqueeze(-1), 0.0)
            ratio = self._observed_mask_ratio(is_mask, batch)
            embeddings = (embeddings * (1 - MASK_RATIO_TRAIN) / (1 - ratio).unsqueeze(-1)).to(embeddings.dtype)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        if batch.attention_mask is not None:
            embeddings = (embeddings * batch.attention_mask.unsqueeze(-1)).to(embeddings.dtype)
        return embeddings

    @staticmethod
    def _observed_mask_ratio(is_mask: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Fraction of <mask> tokens in each token's own sequence, broadcastable to ``[B, S]``."""
        if batch.is_packed:
            assert batch.sequence_ids is not None and batch.cu_seqlens is not None
            counts = torch.zeros(batch.num_sequences, device=is_mask.device, dtype=torch.float32)
            counts.index_add_(0, batch.sequence_ids, is_mask[0].to(torch.float32))
            lengths = batch.cu_seqlens.diff().to(torch.float32)
            return (counts / lengths)[batch.sequence_ids].unsqueeze(0)
        if batch.attention_mask is not None:
            lengths = batch.attention_mask.sum(-1)
        else:
            lengths = torch.full((is_mask.shape[0],), is_mask.shape[1], device=is_mask.device)
        return (is_mask.sum(-1).to(torch.float32) / lengths)[:, None]


class Esm2Attention(nn.Module):
    """Self-attention with a fused ``qkv_proj`` (query, key, value stacked in that order along the output dim)."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_inputs: AttentionInputs
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        # ESM scales the query before RoPE (not the logits); the attention kernel then uses scale 1.
        q = q * self.head_dim**-0.5
        q, k = apply_rotary(q, k, *rotary, compute_in_float32=True)
        out = attention_forward(q, k, v, attn_inputs, scale=1.0)
        return self.out_proj(out.reshape(batch, seq_len, -1))


class Esm2MLP(GeluMLP):
    """ESM's MLP: ``down(gelu(up(x)))`` with biases and the exact erf GELU."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, bias=True, approximate="none")


class Esm2Block(nn.Module):
    """Pre-LayerNorm transformer block: ``h = x + attn(LN(x))``, then ``h + mlp(LN(h))``.

    The block's input and output are each carried as two tensors whose sum is the residual stream: the block takes
    ``(hidden_states, residual)`` with ``x = hidden_states + residual`` (``residual=None``: ``x = hidden_states``) and
    returns ``(mlp_out, h)``, leaving the last residual add to the next block. Why: blocks are compiled one by one, and
    a block that returned ``h + mlp_out`` would write that sum to memory in its own kernel only for the next block to
    read it back for its first LayerNorm; taken at the start of the next block, the add fuses into that LayerNorm
    (on ESM-2 650M this removes one full read-write pass over the activations per block). The sums are the same
    floating-point additions as the one-tensor form (addition commutes exactly).
    """

    # Adapter (PEFT) layout, bioscale.models.adapters: transformers' EsmLayer names, so ESM's usual LoRA lists
    # (["query", "value"], ["query", "key", "value", "dense"]) adapt the same linears as on EsmForMaskedLM.
    adapter_layout = {
        "attention.qkv_proj": ("attention.query", "attention.key", "attention.value"),
        "attention.out_proj": ("attention.output.dense",),
        "mlp.up_proj": ("mlp.intermediate.dense",),
        "mlp.down_proj": ("mlp.output.dense",),
    }

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Esm2Attention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Esm2MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

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


class Esm2ContactHead(nn.Module):
    """Weights of ``transformers``' ESM contact-prediction regression, carried so conversion loses no tensor.

    Stored as buffers (not parameters): bioscale does not implement contact prediction, and buffers keep data-parallel
    wrappers from expecting gradients for them.
    """

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        in_features = config.num_hidden_layers * config.num_attention_heads
        self.register_buffer("weight", torch.zeros(1, in_features))
        self.register_buffer("bias", torch.zeros(1))


class Esm2PreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = Esm2Config
    base_model_prefix = "esm"
    main_input_name = "input_ids"
    _no_split_modules = ["Esm2Block"]
    # Stock EsmPreTrainedModel declares the same: Trainer averages per-micro-batch means (its numbers, measured).
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        super()._init_module(module, only_missing)
        if isinstance(module, Esm2LMHead) and not keep_as_is(module.bias, only_missing):
            module.bias.zero_()
        elif isinstance(module, Esm2ContactHead) and not keep_as_is(module.weight, only_missing):
            nn.init.normal_(module.weight, std=self.initializer_range)
            module.bias.zero_()


class Esm2Model(EncoderInputsMixin, Esm2PreTrainedModel):
    """The ESM-2 encoder; ``forward`` returns ``BaseModelOutput(last_hidden_state)`` after the final LayerNorm."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__(config)
        self.embeddings = Esm2Embeddings(config)
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta)
        self.layers = nn.ModuleList([Esm2Block(config) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.contact_head = Esm2ContactHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def encode(self, batch: Batch) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` (packed: ``[1, T, D]``) after the final LayerNorm."""
        hidden_states = self.embeddings(batch)
        rotary = self.rotary(batch.position_ids, hidden_states.dtype)
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        attn_inputs = attention_inputs_for_batch(
            batch, hidden_states, backend=self.config.attn_backend, causal=False, dropout_p=dropout_p
        )
        residual = None
        for block in self.layers:
            hidden_states, residual = block(hidden_states, rotary, attn_inputs, residual)
        return self.final_layer_norm(hidden_states + residual if residual is not None else hidden_states)

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


class Esm2LMHead(nn.Module):
    """dense → GELU → LayerNorm → (tied word embeddings) + bias, logits sliced to the real vocabulary."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.embedding_rows))
        self.vocab_size = config.vocab_size

    def forward(self, hidden_states: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(gelu(self.dense(hidden_states)))
        logits = F.linear(x, embedding_weight) + self.bias
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]  # drop the vocabulary-padding columns
        return logits


class _Esm2WithBase(EncoderHeadsMixin, Esm2PreTrainedModel):
    """Shared plumbing of the heads: the ``esm`` base model and ``layers``."""

    esm: Esm2Model


class Esm2ForMaskedLM(_Esm2WithBase):
    """ESM-2 with its masked-LM head (``transformers.EsmForMaskedLM``)."""

    # The decoder reads the word-embedding matrix (no module of its own); its bias is vocabulary-sized.
    _vocab_parameter_paths = ("lm_head.bias",)

    def __init__(self, config: Esm2Config) -> None:
        super().__init__(config)
        self.esm = Esm2Model(config)
        self.lm_head = Esm2LMHead(config)
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
    ) -> MaskedLMOutputWithCount:
        """Masked-LM forward.

        Args:
            labels: token ids to predict, ``-100`` where there is nothing to predict; same shape as ``input_ids``.
            loss_reduction: ``"mean"`` over label tokens or ``"sum"``; ``num_label_tokens`` is always returned.
            logits_on_labels_only (keyword, in ``kwargs``): with ``labels``, run the LM head only where
                ``labels != -100``; ``logits`` is then ``[num_label_tokens, vocab_size]`` (rows in order of
                appearance) and ``loss`` is unchanged. Saves the head's compute and memory on the ~85% of positions MLM
                does not score (one host sync). A keyword option rather than a parameter: ``Trainer`` takes every
                parameter named ``*label*`` for a label (:mod:`bioscale.models.hf_contract`).
        """
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch = self.esm.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        hidden_states = self.esm.encode(batch)
        weight = self.esm.embeddings.word_embeddings.weight  # the tied decoder
        return self._masked_lm_output(hidden_states, batch, labels, head=partial(self.lm_head, embedding_weight=weight),
                                      loss_reduction=loss_reduction, options=options)  # fmt: skip


class Esm2ForTokenClassification(_Esm2WithBase):
    """Per-token classification (``transformers.EsmForTokenClassification``: dropout → linear)."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.esm = Esm2Model(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
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
        batch = self.esm.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        logits = self.classifier(self.dropout(self.esm.encode(batch)))
        loss = count = None
        if labels is not None:
            loss_sum, count = token_cross_entropy(logits, labels_like(labels, batch), reduction="sum")
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return TokenClassifierOutputWithCount(loss=loss, logits=unbatch(logits, batch), num_label_tokens=count)


class Esm2ClassificationHead(nn.Module):
    """dense → tanh → dropout → out_proj on a pooled sequence embedding."""

    def __init__(self, config: Esm2Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class Esm2ForSequenceClassification(_Esm2WithBase):
    """Per-sequence classification or regression on the *mean* of the sequence's hidden states.

    Pooling is the mean over every non-padding token of a sequence, ``<cls>`` and ``<eos>`` included, computed per
    sequence in packed batches too (``transformers``' ESM head reads the ``<cls>`` token instead, so this class has no
    exact ``transformers`` counterpart and ``to_hf`` refuses it). ``logits`` are ``[num_sequences, num_labels]``.
    The loss follows ``transformers``: ``problem_type`` ``"regression"`` (MSE; the default when ``num_labels == 1``),
    ``"single_label_classification"`` (cross-entropy; default for integer labels) or ``"multi_label_classification"``
    (BCE with logits; default for float labels).
    """

    def __init__(self, config: Esm2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.esm = Esm2Model(config)
        self.classifier = Esm2ClassificationHead(config)
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
        batch = self.esm.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        logits = self.classifier(mean_pool(self.esm.encode(batch), batch))
        loss = count = None
        if labels is not None:
            loss_sum, count = sequence_classification_loss(
                logits, labels.to(logits.device), problem_type=self.config.problem_type, num_labels=self.num_labels,
                reduction="sum",
            )  # fmt: skip
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return SequenceClassifierOutputWithCount(loss=loss, logits=logits, num_label_tokens=count)
