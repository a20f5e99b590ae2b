"""Tiny reference configs and batch builders shared by the model tests (plain functions, no fixtures)."""

from __future__ import annotations

import torch
import transformers
from transformers import EsmConfig, LlamaConfig

ESM_MASK, ESM_PAD, ESM_CLS, ESM_EOS = 32, 1, 0, 2


# transformers 4.x does not pass attention_mask to EsmEmbeddings, so its token-dropout ratio divides by the padded
# width instead of the sequence length (fixed in 5.x; fair-esm and bioscale divide by the real length). Against a 4.x
# reference, ESM comparisons therefore use sequences of equal length, where both readings agree.
HF_ESM_TOKEN_DROPOUT_IGNORES_PADDING = int(transformers.__version__.split(".")[0]) < 5


def esm_reference_lengths(lengths: list[int]) -> list[int]:
    """``lengths``, or equal lengths when the installed transformers ESM is the 4.x one (see above)."""
    return [max(lengths)] * len(lengths) if HF_ESM_TOKEN_DROPOUT_IGNORES_PADDING else lengths


def tiny_esm_config(**overrides: object) -> EsmConfig:
    """A 2-layer ESM-2-style ``transformers`` config (rotary, token dropout, no dropout)."""
    kwargs: dict[str, object] = dict(
        vocab_size=33,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        position_embedding_type="rotary",
        token_dropout=True,
        mask_token_id=ESM_MASK,
        pad_token_id=ESM_PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-5,
        emb_layer_norm_before=False,
        max_position_embeddings=1026,
    )
    kwargs.update(overrides)
    return EsmConfig(**kwargs)


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: with a 16-position "original" context every frequency band of a 16-dim head is exercised.
    "original_max_position_embeddings": 16,
}


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 2-layer Llama 3 ``transformers`` config with GQA (4 query / 2 kv heads) and llama3 RoPE scaling."""
    kwargs: dict[str, object] = dict(
        vocab_size=21,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING),
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def esm_padded_batch(
    lengths: list[int], seed: int = 0, mask_fraction: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ESM batch ``(input_ids, attention_mask)``: <cls> residues <eos>, some <mask>, pads."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), ESM_PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(4, 30, (length,), generator=gen)
        tokens[0], tokens[-1] = ESM_CLS, ESM_EOS
        masked = torch.rand(length, generator=gen) < mask_fraction
        masked[0] = masked[-1] = False
        tokens[masked] = ESM_MASK
        input_ids[row, :length] = tokens
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def llama_padded_batch(lengths: list[int], vocab_size: int = 21, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded causal-LM batch ``(input_ids, attention_mask)`` with pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, vocab_size, (length,), generator=gen)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, object]:
    """The packed (THD) form of a right-padded batch, as ``DataCollatorWithFlattening`` would produce it."""
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).tolist()
    keep = attention_mask.bool()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    batch: dict[str, object] = {
        "input_ids": input_ids[keep][None],
        "position_ids": torch.cat([torch.arange(n, device=device) for n in lengths])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    if labels is not None:
        batch["labels"] = labels[keep][None]
    return batch
