"""CodonFM EnCodon as ``transformers`` ``PreTrainedModel`` subclasses: base encoder, masked LM, and sequence
classification / regression.

Computes the same function as the released EnCodon architecture (the ``nvidia/NV-CodonFM-Encodon-*`` checkpoints;
checked to 1e-4 in float32 by the tests against the copy in ``../shared/reference/codonfm_reference``):

- embedding (no absolute positions) -> LayerNorm -> dropout;
- each layer is *sub-LN*: ``h = x + Drop(Wo · LN(MHA(LN(x))))`` then ``h + Drop(W2 · LN(GELU(W1 · LN(h))))``, the
  FFN's inner LayerNorm over the ``intermediate_size`` width; attention with biased q / k / v / o projections,
  rotate-half RoPE (``rotary_theta``) and scale ``head_dim ** -0.5``;
- no final LayerNorm; the masked-LM head is ``Linear(h, h) -> GELU -> LayerNorm -> Linear(h, 69)``, biased and untied;
- exact (erf) GELU, LayerNorm eps 1e-12, dropout 0.1 (hidden and attention probabilities).

bioscale fuses the reference's ``query`` / ``key`` / ``value`` into one ``qkv_proj`` (weights and biases stacked in
that order: one GEMM instead of three) and runs attention behind :func:`bioscale.models.attention.attention_forward`,
so padded (``attention_mask``) and packed (``cu_seq_lens_q/k``) batches go through the same blocks and backends as
ESM-2 and AMPLIFY. Where the two differ numerically, the code says so:

- RoPE: the reference rotates q / k against float32 cos / sin tables (its ``inv_freq`` buffer is float32, and the
  product promotes) and casts back; so does this one (float32 tables, ``compute_in_float32=True``).
- Masks: the reference adds ``finfo.min`` at padding keys; bioscale uses a boolean key mask. Real tokens' outputs are
  the same; padding rows differ and are never read.
- The reference asserts that the padded length is a multiple of 8 (an xformers-era guard); bioscale takes any length.

Transformer blocks are ``model.layers`` on every class. A block is called as
``block(hidden_states [B, S, D], rotary=(cos, sin), attn_inputs=AttentionInputs, residual=None) -> (out, residual)``,
the residual stream carried as two tensors whose sum it is, as ``Esm2Block`` does and for the same reason: the add
fuses into the next block's first LayerNorm when blocks are compiled one by one, and the sums are the same
floating-point additions as the one-tensor form. It contains no host synchronisation and no Python branching on tensor
values, so each block can be wrapped by ``torch.compile``, activation checkpointing or ``fully_shard`` from outside.

Initialisation is the reference's MAGNETO scheme (Wang et al., 2022, as CodonFM applies it): every linear weight
xavier-normal with gain ``initializer_range * sqrt(ln(2 N))`` (``N`` layers), except the query and key projections
(gain 1); biases zero; LayerNorms one / zero; the embedding N(0, ``initializer_range``) with a zero padding row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from bioscale.models.attention import AttentionInputs, attention_forward
from bioscale.models.batch import Batch, mean_pool, unbatch
from bioscale.models.codonfm.config import EnCodonConfig
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
from bioscale.models.layers import RotaryEmbedding, apply_rotary
from bioscale.models.loss import check_loss_reduction, sequence_classification_loss
from bioscale.models.outputs import MaskedLMOutputWithCount, SequenceClassifierOutputWithCount


class EnCodonAttention(nn.Module):
    """Self-attention with biases: ``out_proj(out_norm(attention(rope(q), rope(k), v)))``.

    ``qkv_proj`` is the reference's ``query``, ``key``, ``value`` stacked along the output dim (weights and biases),
    ``out_norm`` its ``post_attn_layer_norm`` and ``out_proj`` its ``post_attn_dense``: the LayerNorm between the
    attention and the output projection is EnCodon's (sub-LN), so it lives with the attention here.
    """

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.out_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_inputs: AttentionInputs
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each [B, S, H, D]
        # The reference multiplies q / k by float32 tables (promoting) and casts back: rotate in float32.
        q, k = apply_rotary(q, k, *rotary, compute_in_float32=True)
        out = attention_forward(q, k, v, attn_inputs, scale=self.head_dim**-0.5)
        return self.out_proj(self.out_norm(out.reshape(batch, seq_len, -1)))


class EnCodonMLP(nn.Module):
    """``down_proj(inner_norm(gelu(up_proj(x))))``: the reference's ``intermediate_dense``, ``post_ffn_layer_norm``
    (over the FFN width) and ``output_dense``; exact erf GELU (``ACT2FN["gelu"]``, i.e. ``F.gelu``)."""

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.inner_norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.inner_norm(F.gelu(self.up_proj(hidden_states))))


class EnCodonBlock(nn.Module):
    """Sub-LN encoder layer: ``h = x + Drop(attention(attention_norm(x)))``, then ``h + Drop(mlp(mlp_norm(h)))``
    (the reference's ``EncoderLayer``; ``attention_norm`` = ``pre_attn_layer_norm``, ``mlp_norm`` =
    ``pre_ffn_layer_norm``).

    Input and output are two tensors whose sum is the residual stream (see the module docstring): the block takes
    ``(hidden_states, residual)`` with ``x = hidden_states + residual`` and returns ``(Drop(mlp_out), h)``.
    """

    # Adapter (PEFT) layout, bioscale.models.adapters: the reference EncoderLayer's linear names (its attention's
    # query / key / value; post_attn_dense, intermediate_dense, output_dense), so LoRA lists written for it carry over.
    adapter_layout = {
        "attention.qkv_proj": ("attention.query", "attention.key", "attention.value"),
        "attention.out_proj": ("attention.post_attn_dense",),
        "mlp.up_proj": ("mlp.intermediate_dense",),
        "mlp.down_proj": ("mlp.output_dense",),
    }

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EnCodonAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EnCodonMLP(config)
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


class EnCodonLMHead(nn.Module):
    """The reference's ``cls``: ``decoder(norm(gelu(dense(x))))`` (``cls.0``, ``cls.2``, ``cls.3``), biased, untied;
    the decoder has ``embedding_rows`` outputs (vocabulary padding rows are zero and sliced off by the model)."""

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.embedding_rows, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden_states))))


class EnCodonPreTrainedModel(HFContractMixin, BioscalePreTrainedModel):
    config_class = EnCodonConfig
    base_model_prefix = "encodon"
    main_input_name = "input_ids"
    _no_split_modules = ["EnCodonBlock"]

    @property
    def magneto_gain(self) -> float:
        """The xavier gain of every linear weight but the query / key rows: ``initializer_range * sqrt(ln(2N))``."""
        config: EnCodonConfig = self.config
        return config.initializer_range * math.sqrt(math.log(2 * max(config.num_hidden_layers, 1)))

    def init_weights(self) -> None:
        """Initialise every parameter and buffer from scratch (no-op while the model is on ``meta``).

        Children before parents, the order of ``transformers``' loading hook: a module-level rule (the query / key rows
        of ``qkv_proj``, the decoder's vocabulary padding) then refines what the per-``nn.Linear`` rule did.
        """
        if any(t.device.type == "meta" for t in [*self.parameters(), *self.buffers()]):
            return
        for module in reversed(list(self.modules())):  # reversed pre-order: every module after its descendants
            self._init_module(module, only_missing=False)

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        config: EnCodonConfig = self.config
        gain = self.magneto_gain
        if isinstance(module, EnCodonAttention):
            weight, hidden = module.qkv_proj.weight, config.hidden_size
            if not keep_as_is(weight, only_missing):

                def qkv(w: torch.Tensor) -> None:
                    # Fans of each [h, h] block, as the reference's separate query / key / value layers have them.
                    for block, block_gain in enumerate((1.0, 1.0, gain)):  # query, key: gain 1 (MAGNETO)
                        nn.init.xavier_normal_(w[block * hidden : (block + 1) * hidden], gain=block_gain)

                init_in_place(weight, qkv)
        elif isinstance(module, EnCodonLMHead):
            weight, vocab = module.decoder.weight, config.vocab_size
            if weight.shape[0] > vocab and not keep_as_is(weight, only_missing):

                def decoder(w: torch.Tensor) -> None:
                    nn.init.xavier_normal_(w[:vocab], gain=gain)  # the fans of the reference's [69, h] decoder
                    w[vocab:].zero_()

                init_in_place(weight, decoder)
        elif isinstance(module, nn.Linear):
            if not keep_as_is(module.weight, only_missing):
                init_in_place(module.weight, lambda w: nn.init.xavier_normal_(w, gain=gain))
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if not keep_as_is(module.weight, only_missing):

                def embedding(w: torch.Tensor) -> None:
                    nn.init.normal_(w, mean=0.0, std=config.initializer_range)
                    if module.padding_idx is not None:
                        w[module.padding_idx].zero_()
                    w[config.vocab_size :].zero_()

                init_in_place(module.weight, embedding)
        else:
            super()._init_module(module, only_missing)  # LayerNorm, RoPE tables


class EnCodonModel(EncoderInputsMixin, EnCodonPreTrainedModel):
    """The EnCodon encoder; ``forward`` returns ``BaseModelOutput(last_hidden_state)``, the last layer's output (EnCodon
    has no final LayerNorm: the reference's ``last_hidden_state``)."""

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size, padding_idx=config.pad_token_id)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta)
        self.layers = nn.ModuleList([EnCodonBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def encode(self, batch: Batch) -> torch.Tensor:
        """Hidden states ``[B, S, D]`` (packed: ``[1, T, D]``) after the last layer."""
        hidden_states = self.embed_dropout(self.embed_norm(self.embed_tokens(batch.input_ids)))
        rotary = self.rotary(batch.position_ids, torch.float32)  # float32 tables, as the reference's (see above)
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        attn_inputs = attention_inputs_for_batch(
            batch, hidden_states, backend=self.config.attn_backend, causal=False, dropout_p=dropout_p
        )
        residual = None
        for block in self.layers:
            hidden_states, residual = block(hidden_states, rotary, attn_inputs, residual)
        return hidden_states + residual if residual is not None else hidden_states

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


class _EnCodonWithBase(EncoderHeadsMixin, EnCodonPreTrainedModel):
    """Shared plumbing of the heads: the ``encodon`` base model and ``layers``."""

    encodon: EnCodonModel


class EnCodonForMaskedLM(_EnCodonWithBase):
    """EnCodon with its masked-LM head (the reference ``EnCodon``): logits over the 69 tokens (vocabulary-padding
    columns dropped)."""

    _output_embeddings_path = "lm_head.decoder"

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__(config)
        self.encodon = EnCodonModel(config)
        self.lm_head = EnCodonLMHead(config)
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
            logits_on_labels_only (keyword, in ``kwargs``): with ``labels``, run the head only where
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


class EnCodonClassificationHead(nn.Module):
    """dense -> tanh -> dropout -> out_proj on a pooled sequence embedding (the head of ESM-2's and AMPLIFY's sequence
    classes), dropout ``classifier_dropout``."""

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class EnCodonForSequenceClassification(_EnCodonWithBase):
    """Per-sequence classification or regression (expression level, mRNA stability, translation efficiency...) on the
    *mean* of each sequence's hidden states.

    Pooling is the mean over every non-padding token of a sequence (``<CLS>`` and ``<SEP>`` included), per sequence in
    packed batches too; ``logits`` are ``[num_sequences, num_labels]``. The loss follows ``transformers``'
    ``problem_type`` rules: ``"regression"`` (MSE; the default when ``num_labels == 1``),
    ``"single_label_classification"`` or ``"multi_label_classification"``, the contract of
    ``Esm2ForSequenceClassification``. (CodonFM's own downstream head is a cross-attention from ``<CLS>``; it has no
    counterpart here, and a checkpoint that holds one is refused by the converter.)
    """

    def __init__(self, config: EnCodonConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encodon = EnCodonModel(config)
        self.classifier = EnCodonClassificationHead(config)
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
