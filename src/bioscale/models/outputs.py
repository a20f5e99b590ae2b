"""Model outputs: the ``transformers`` output classes plus ``num_label_tokens``.

Each subclass keeps every field of its ``transformers`` parent (so code written for ``EsmForMaskedLM`` /
``LlamaForCausalLM`` outputs works unchanged) and adds ``num_label_tokens``: the number of tokens the loss was
computed over, for normalising by the global count across micro-batches and ranks (see :mod:`bioscale.models.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


@dataclass
class MaskedLMOutputWithCount(MaskedLMOutput):
    """``MaskedLMOutput`` + ``num_label_tokens`` (int64 scalar tensor, ``None`` without labels)."""

    num_label_tokens: torch.Tensor | None = None


@dataclass
class CausalLMOutputWithCount(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` + ``num_label_tokens`` (int64 scalar tensor, ``None`` without labels)."""

    num_label_tokens: torch.Tensor | None = None


@dataclass
class TokenClassifierOutputWithCount(TokenClassifierOutput):
    """``TokenClassifierOutput`` + ``num_label_tokens`` (int64 scalar tensor, ``None`` without labels)."""

    num_label_tokens: torch.Tensor | None = None


@dataclass
class SequenceClassifierOutputWithCount(SequenceClassifierOutput):
    """``SequenceClassifierOutput`` + ``num_label_tokens`` (number of labelled sequences; ``None`` without labels)."""

    num_label_tokens: torch.Tensor | None = None
