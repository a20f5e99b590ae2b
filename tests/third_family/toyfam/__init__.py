"""A throw-away model family that lives only in the tests: proof that a family is one folder plus one registration.

``ToyEncoder`` is a small bidirectional protein encoder built only from the shared blocks
(``bioscale.models.layers``: RMSNorm, SwiGLU, interleaved rotary) and bioscale's attention backends. Nothing outside
this folder knows it; ``register_model_family(MODEL_SPEC)`` makes every tool take it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput

from bioscale.models.attention import attention_forward
from bioscale.models.batch import Batch, labels_like, prepare_batch, unbatch
from bioscale.models.common import BioscalePreTrainedModel, attention_inputs_for_batch, reject_unknown_kwargs
from bioscale.models.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP, apply_rotary
from bioscale.models.loss import check_loss_reduction, select_label_positions, token_cross_entropy
from bioscale.models.outputs import MaskedLMOutputWithCount, TokenClassifierOutputWithCount
from bioscale.models.registry import ModelSpec


class ToyConfig(PretrainedConfig):
    model_type = "bioscale_toyfam_test"

    def __init__(
        self,
        vocab_size: int = 33,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 48,
        max_position_embeddings: int = 1026,
        attn_backend: str = "sdpa",
        pad_token_id: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.attn_backend = attn_backend
        self.head_dim = hidden_size // num_attention_heads
        self.embedding_rows = vocab_size


class ToyBlock(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.attention_norm = RMSNorm(config.hidden_size)
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(config.hidden_size)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attn_inputs: Any) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(self.attention_norm(x)).view(batch, seq_len, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rotary(q, k, *rotary, interleaved=True)
        x = x + self.o_proj(attention_forward(q, k, v, attn_inputs).reshape(batch, seq_len, -1))
        return x + self.mlp(self.mlp_norm(x))


class ToyPreTrainedModel(BioscalePreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"
    _no_split_modules = ["ToyBlock"]


class ToyModel(ToyPreTrainedModel):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.rotary = RotaryEmbedding(config.head_dim, interleaved=True)
        self.layers = nn.ModuleList([ToyBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def encode(self, batch: Batch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        rotary = self.rotary(batch.position_ids, hidden.dtype)
        attn_inputs = attention_inputs_for_batch(
            batch, hidden, backend=self.config.attn_backend, causal=False, dropout_p=0.0
        )
        for block in self.layers:
            hidden = block(hidden, rotary, attn_inputs)
        return self.norm(hidden)

    def batch_of(self, input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q,
                 max_length_k) -> Batch:  # fmt: skip
        return prepare_batch(
            input_ids, vocab_size=self.config.vocab_size, attention_mask=attention_mask, position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
            max_length_k=max_length_k,
        )  # fmt: skip

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                max_length_q=None, max_length_k=None, **kwargs: Any) -> BaseModelOutput:  # fmt: skip
        reject_unknown_kwargs(type(self).__name__, kwargs)
        batch = self.batch_of(input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q,
                              max_length_k)  # fmt: skip
        return BaseModelOutput(last_hidden_state=unbatch(self.encode(batch), batch))


class _WithBase(ToyPreTrainedModel):
    toy: ToyModel

    @property
    def layers(self) -> nn.ModuleList:
        return self.toy.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.toy.embed_tokens


class ToyForMaskedLM(_WithBase):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.toy = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, logits_on_labels_only: bool = False,
                loss_reduction: str = "mean", **kwargs: Any) -> MaskedLMOutputWithCount:  # fmt: skip
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_loss_reduction(loss_reduction)
        batch = self.toy.batch_of(input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
                                  max_length_q, max_length_k)  # fmt: skip
        hidden = self.toy.encode(batch)
        if labels is None:
            return MaskedLMOutputWithCount(logits=unbatch(self.lm_head(hidden), batch))
        labels = labels_like(labels, batch)
        if logits_on_labels_only:
            hidden, labels = select_label_positions(hidden, labels)
        logits = self.lm_head(hidden)
        loss, count = token_cross_entropy(logits, labels, reduction=loss_reduction)
        return MaskedLMOutputWithCount(
            loss=loss, logits=logits if logits_on_labels_only else unbatch(logits, batch), num_label_tokens=count
        )


class ToyForTokenClassification(_WithBase):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.toy = ToyModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, loss_reduction: str = "mean",
                **kwargs: Any) -> TokenClassifierOutputWithCount:  # fmt: skip
        reject_unknown_kwargs(type(self).__name__, kwargs)
        batch = self.toy.batch_of(input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k,
                                  max_length_q, max_length_k)  # fmt: skip
        logits = self.classifier(self.toy.encode(batch))
        loss = count = None
        if labels is not None:
            loss, count = token_cross_entropy(logits, labels_like(labels, batch), reduction=loss_reduction)
        return TokenClassifierOutputWithCount(loss=loss, logits=unbatch(logits, batch), num_label_tokens=count)


def _no_stock_counterpart(model: Any, **_: Any) -> Any:
    raise ValueError("the toy family has no stock transformers counterpart")


def flops_per_token(config: ToyConfig, seq_len: int) -> float:
    hidden, ffn = config.hidden_size, config.intermediate_size
    matmul = config.num_hidden_layers * (4 * hidden * hidden + 3 * hidden * ffn) + hidden * config.vocab_size
    return 6.0 * matmul + 12.0 * config.num_hidden_layers * hidden * seq_len


MODEL_SPEC = ModelSpec(
    name="toyfam",
    config_class=ToyConfig,
    model_classes={"base": ToyModel, "masked_lm": ToyForMaskedLM, "token_classification": ToyForTokenClassification},
    default_task="masked_lm",
    sizes={"debug": {}},
    from_hf=_no_stock_counterpart,
    to_hf=_no_stock_counterpart,
    hf_model_types=(),
    flops_per_token=flops_per_token,
    modality="protein",
    tokenizer="protein",
    causal=False,
    packing_tasks=frozenset({"base", "masked_lm", "token_classification"}),
    cp_tasks=frozenset({"base", "masked_lm", "token_classification"}),
    position_offset=2,
)
