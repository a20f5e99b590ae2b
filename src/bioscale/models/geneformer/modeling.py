"""Geneformer as ``transformers`` ``PreTrainedModel`` subclasses: base encoder, masked LM, cell (sequence) and gene
(token) classification.

Computes the same function as ``transformers``' ``BertForMaskedLM`` (checked to 1e-4 in float32 by the tests), the
architecture of the published Geneformer checkpoints: a *post*-LayerNorm BERT. The embedding is
``LN(word + token_type[0] + position)`` followed by dropout, with **learned absolute positions** (in packed batches
they restart at 0 for every cell, so a packed cell sees exactly the positions it would see alone); each block is
``h = LN(x + Drop(Attn(x)))`` then ``LN(h + Drop(FFN(h)))`` with biases everywhere, scale ``head_dim ** -0.5`` and
no rotary embedding; the FFN is Linear → ReLU → Linear; the masked-LM head is dense → act → LayerNorm → the word
embedding matrix (tied, read directly) plus a bias. bioscale fuses BERT's query / key / value into one ``qkv_proj``
and runs attention behind :func:`bioscale.models.attention.attention_forward`, so padded (``attention_mask``) and
packed (``cu_seq_lens_q/k``, or any other output form of ``DataCollatorWithFlattening``) batches go through the same
blocks and backends as the other families. What ``Trainer``, PEFT and Lightning rely on (labels, loss normalisation,
activation checkpointing, embeddings, the stock-named adapter layout) is the contract of
:class:`~bioscale.models.hf_contract.HFContractMixin`.

Numerical notes, where this code differs from ``BertForMaskedLM`` and why:

- The additions of the embedding happen in BERT's order (``(word + token_type) + position``), so float32 sums are
  the same bits; only row 0 of the token-type table is ever added (Geneformer has one segment), and a non-zero
  ``token_type_ids`` is refused by the forward-argument rule of :mod:`bioscale.models.common`.
- ``"gelu"`` is the exact erf form (:func:`bioscale.models.layers.gelu`), transformers' ``GELUActivation``.
- The blocks are post-norm, so they cannot carry the residual as two tensors the way ``Esm2Block`` does: the
  LayerNorm that would absorb the add is in the same block.
- Attention dropout exists on padded ``sdpa`` batches only (as for every bioscale model); packed, flex and
  context-parallel training need ``attention_probs_dropout_prob=0`` (the L1 recipes set it).

Transformer blocks are ``model.layers`` on every class. A block is called as
``block(hidden_states [B, S, D], attn_inputs=AttentionInputs) -> hidden_states``; it contains no host
synchronisation and no Python branching on tensor values, so each block can be wrapped by ``torch.compile``,
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
from bioscale.models.batch import Batch, labels_like, mean_pool, prepare_batch, unbatch
from bioscale.models.common import (
    BioscalePreTrainedModel,
    EncoderHeadsMixin,
    EncoderInputsMixin,
    attention_inputs_for_batch,
    init_in_place,
    keep_as_is,
    reject_unknown_kwargs,
)
from bioscale.models.fused import linear_relu
from bioscale.models.geneformer.config import GeneformerConfig
from bioscale.models.hf_contract import HFContractMixin, pop_forward_options
from bioscale.models.layers import gelu
from bioscale.models.loss import check_loss_reduction, sequence_classification_loss, token_cross_entropy
from bioscale.models.outputs import (
    MaskedLMOutputWithCount,
    SequenceClassifierOutputWithCount,
    TokenClassifierOutputWithCount,
)


def linear_activation(linear: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``act(linear(x))`` for the activation named in the config: ``"relu"`` as one GEMM with a ReLU epilogue
    (:func:`bioscale.models.fused.linear_relu`, the same values), the exact erf ``"gelu"`` after the linear."""
    return linear_relu(linear, x) if name == "relu" else gelu(linear(x))


class GeneformerEmbeddings(nn.Module):
    """``LN(word + token_type[0] + position)`` then dropout (``BertEmbeddings``), positions from the batch."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.embedding_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, batch: Batch) -> torch.Tensor:
        embeddings = self.word_embeddings(batch.input_ids) + self.token_type_embeddings.weight[0]
        embeddings = embeddings + self.position_embeddings(batch.position_ids)
        return self.dropout(self.layer_norm(embeddings))


class GeneformerAttention(nn.Module):
    """Self-attention with a fused ``qkv_proj`` (BERT's query, key, value stacked in that order) and ``out_proj``
    (BERT's ``attention.output.dense``), biases on both."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attn_inputs: AttentionInputs) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)
        out = attention_forward(q, k, v, attn_inputs, scale=self.head_dim**-0.5)
        return self.out_proj(out.reshape(batch, seq_len, -1))


class GeneformerMLP(nn.Module):
    """``down_proj(act(up_proj(x)))``: BERT's intermediate and output dense layers, ReLU for Geneformer."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(linear_activation(self.up_proj, self.act, hidden_states))


class GeneformerBlock(nn.Module):
    """Post-LayerNorm block (``BertLayer``): ``h = LN(x + Drop(attn(x)))``, then ``LN(h + Drop(mlp(h)))``.

    ``attention_norm`` and ``mlp_norm`` are BERT's ``attention.output.LayerNorm`` and ``output.LayerNorm``: each
    normalises the residual sum *after* its sub-layer.
    """

    # Adapter (PEFT) layout, bioscale.models.adapters: BertLayer's linear names (as Esm2Block's, ESM being BERT-named),
    # so BERT's usual LoRA lists (["query", "value"], ["query", "key", "value", "dense"]) adapt the same linears as on
    # BertForMaskedLM; "dense" also finds the LM head's transform (lm_head.dense), as on BERT.
    adapter_layout = {
        "attention.qkv_proj": ("attention.query", "attention.key", "attention.value"),
        "attention.out_proj": ("attention.output.dense",),
        "mlp.up_proj": ("mlp.intermediate.dense",),
        "mlp.down_proj": ("mlp.output.dense",),
    }

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.attention = GeneformerAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GeneformerMLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attn_inputs: AttentionInputs) -> torch.Tensor:
        hidden_states = self.attention_norm(hidden_states + self.dropout(self.attention(hidden_states, attn_inputs)))
        return self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))


class GeneformerLMHead(nn.Module):
    """dense → act → LayerNorm → (tied word embeddings) + bias (``BertOnlyMLMHead``), logits sliced to the real
    vocabulary."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.embedding_rows))
        self.vocab_size = config.vocab_size

    def forward(self, hidden_states: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(linear_activation(self.dense, self.act, hidden_states))
        logits = F.linear(x, embedding_weight) + self.bias
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]  # drop the vocabulary-padding columns
        return logits


class GeneformerPreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = GeneformerConfig
    base_model_prefix = "bert"
    main_input_name = "input_ids"
    _no_split_modules = ["GeneformerBlock"]
    # Trainer averages per-micro-batch means. Stock BertFor* take **kwargs but ignore num_items_in_batch (their loss is
    # CrossEntropyLoss's mean), so Trainer (transformers 5.24) infers accepts_loss_kwargs=True, skips its division by
    # the accumulation steps and doubles loss and gradient at gradient_accumulation_steps=2 (measured: 20.18 against
    # 10.09). Declaring False gives the stock loss at accumulation 1 and, at 2, the stock run without that doubling:
    # what EsmForMaskedLM, which declares it, gives.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        """BERT's init, normal(``initializer_range``) weights, zero biases, the ``<pad>`` row zero, also under FSDP2
        (:func:`~bioscale.models.common.init_in_place`). Only the word embedding (the one table with a ``padding_idx``) has vocabulary-padding rows to
        zero: the shared rule zeroes every table's rows past ``vocab_size``, which for a tiny vocabulary would wipe
        the learned positions past it."""
        std = self.initializer_range
        if isinstance(module, nn.Linear):
            if not keep_as_is(module.weight, only_missing):
                init_in_place(module.weight, lambda w: nn.init.normal_(w, mean=0.0, std=std))
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if not keep_as_is(module.weight, only_missing):
                padding_idx, vocab_size = module.padding_idx, self.config.vocab_size

                def embedding(w: torch.Tensor) -> None:
                    nn.init.normal_(w, mean=0.0, std=std)
                    if padding_idx is not None:  # the word embedding: <pad> row and vocabulary padding zero
                        w[padding_idx].zero_()
                        w[vocab_size:].zero_()

                init_in_place(module.weight, embedding)
        else:
            super()._init_module(module, only_missing)  # LayerNorm
        if isinstance(module, GeneformerLMHead) and not keep_as_is(module.bias, only_missing):
            module.bias.zero_()


class GeneformerModel(EncoderInputsMixin, GeneformerPreTrainedModel):
    """The Geneformer encoder (``BertModel`` without its pooler); ``forward`` returns
    ``BaseModelOutput(last_hidden_state)``, the output of the last block's LayerNorm."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__(config)
        self.embeddings = GeneformerEmbeddings(config)
        self.layers = nn.ModuleList([GeneformerBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def prepare_batch(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> Batch:
        """:meth:`EncoderInputsMixin.prepare_batch`, and a check that every cell fits the learned positions (an
        ``nn.Embedding`` would otherwise fail with an index error deep in the kernel)."""
        batch = super().prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, seq_idx
        )
        longest = batch.max_seqlen if batch.is_packed else batch.input_ids.shape[1]
        limit = self.config.max_position_embeddings
        # From shapes and max_length_q only (no sync): a padded row or a packed cell longer than the position table.
        if longest is not None and longest > limit:
            raise ValueError(
                f"a cell of {longest} tokens is longer than the model's max_position_embeddings ({limit}): truncate "
                f"cells to their top {limit} genes (the tokenizer's model_input_size)"
            )
        return batch

    def encode(self, batch: Batch) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` (packed: ``[1, T, D]``) after the last block."""
        hidden_states = self.embeddings(batch)
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        attn_inputs = attention_inputs_for_batch(
            batch, hidden_states, backend=self.config.attn_backend, causal=False, dropout_p=dropout_p
        )
        for block in self.layers:
            hidden_states = block(hidden_states, attn_inputs)
        return hidden_states

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
        return BaseModelOutput(last_hidden_state=unbatch(self.encode(batch), batch))


class _GeneformerWithBase(EncoderHeadsMixin, GeneformerPreTrainedModel):
    """Shared plumbing of the heads: the ``bert`` base model and ``layers``."""

    bert: GeneformerModel


class GeneformerForMaskedLM(_GeneformerWithBase):
    """Geneformer with its masked-LM head (``transformers.BertForMaskedLM``); the decoder is the word embedding
    matrix itself, so it stays tied through every save, load, shard and conversion."""

    # The decoder reads the word-embedding matrix (no module of its own, so get_output_embeddings() is None and
    # resize_token_embeddings keeps the tie by construction); its bias is vocabulary-sized.
    _vocab_parameter_paths = ("lm_head.bias",)

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__(config)
        self.bert = GeneformerModel(config)
        self.lm_head = GeneformerLMHead(config)
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
            labels: gene ids to predict, ``-100`` where there is nothing to predict; same shape as ``input_ids``.
            loss_reduction: ``"mean"`` over label tokens or ``"sum"``; ``num_label_tokens`` is always returned.
            logits_on_labels_only (keyword, in ``kwargs``): with ``labels``, run the LM head only where
                ``labels != -100``; ``logits`` is then ``[num_label_tokens, vocab_size]`` and ``loss`` is unchanged.
                With a 25k-gene vocabulary the head is the largest matmul of a small Geneformer, and MLM scores only
                ~15% of positions (one host sync). A keyword option rather than a parameter: ``Trainer`` takes every
                parameter named ``*label*`` for a label (:mod:`bioscale.models.hf_contract`).
        """
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch, hidden_states = self._batch_and_hidden(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        weight = self.bert.embeddings.word_embeddings.weight  # the tied decoder
        return self._masked_lm_output(hidden_states, batch, labels, head=partial(self.lm_head, embedding_weight=weight),
                                      loss_reduction=loss_reduction, options=options)  # fmt: skip


class GeneformerForTokenClassification(_GeneformerWithBase):
    """Per-gene classification (``transformers.BertForTokenClassification``: dropout → linear)."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = GeneformerModel(config)
        self.dropout = nn.Dropout(config.head_dropout)
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
        """Gene classification; ``labels`` like ``input_ids`` with class ids, ``-100`` where unlabelled."""
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


class GeneformerPooler(nn.Module):
    """dense → tanh on one vector per cell (``BertPooler``'s weights): the first token with
    ``classifier_pooling="cls"``, the mean of the cell's tokens with ``"mean"``."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(pooled))


def first_token(hidden_states: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The first token of each sequence: ``[num_sequences, D]`` (packed: at every ``cu_seqlens`` start)."""
    if batch.is_packed:
        assert batch.cu_seqlens is not None
        return hidden_states[0].index_select(0, batch.cu_seqlens[:-1].long())
    return hidden_states[:, 0]


class GeneformerForSequenceClassification(_GeneformerWithBase):
    """Per-cell classification or regression (cell types, disease states): pooled cell vector → ``pooler``
    (dense → tanh) → dropout → ``classifier``.

    ``classifier_pooling="cls"`` reads each cell's first token and is exactly ``BertForSequenceClassification`` (the
    converter sets it for that class); ``"mean"`` (the default for a fresh head) averages the cell's tokens, per cell
    in packed batches too, because a V1 cell has no ``<cls>`` token and its first token is merely the top-ranked gene.
    ``logits`` are ``[num_cells, num_labels]``; the loss follows ``transformers``' ``problem_type`` rules, as the other
    families' sequence heads do.
    """

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = GeneformerModel(config)
        self.pooler = GeneformerPooler(config)
        self.dropout = nn.Dropout(config.head_dropout)
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
    ) -> SequenceClassifierOutputWithCount:
        options = pop_forward_options(kwargs)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch, hidden_states = self._batch_and_hidden(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
            options.seq_idx,
        )  # fmt: skip
        if self.config.classifier_pooling == "cls":
            pooled = first_token(hidden_states, batch)
        else:
            pooled = mean_pool(hidden_states, batch)
        logits = self.classifier(self.dropout(self.pooler(pooled)))
        loss = count = None
        if labels is not None:
            loss_sum, count = sequence_classification_loss(
                logits, labels.to(logits.device), problem_type=self.config.problem_type, num_labels=self.num_labels,
                reduction="sum",
            )  # fmt: skip
            loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        return SequenceClassifierOutputWithCount(loss=loss, logits=logits, num_label_tokens=count)
