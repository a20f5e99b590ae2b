"""RoPE tables equal transformers' (default and llama3 scaling), stay float32, and follow packed positions."""

from __future__ import annotations

import pytest
import torch
from model_test_utils import LLAMA3_SCALING, tiny_llama_config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from bioscale.models.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq, validate_rope_scaling


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_inv_freq_and_tables_match_transformers_llama(scaling: dict | None) -> None:
    hf_config = tiny_llama_config(
        rope_scaling=dict(scaling) if scaling else None, hidden_size=128, num_attention_heads=4
    )
    reference = LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(32, base=500000.0, rope_scaling=scaling)
    torch.testing.assert_close(ours.inv_freq, reference.inv_freq, atol=0, rtol=0)
    position_ids = torch.cat([torch.arange(40), torch.arange(25)])[None]  # packed: positions restart
    x = torch.zeros(1, 65, 128)
    cos_ref, sin_ref = reference(x, position_ids)
    cos, sin = ours(position_ids, torch.float32)
    torch.testing.assert_close(cos, cos_ref, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=0, rtol=0)


def test_scaling_changes_only_low_frequencies() -> None:
    meta_llama_31 = {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}
    plain = compute_inv_freq(64, 500000.0)
    scaled = compute_inv_freq(64, 500000.0, meta_llama_31)
    assert torch.equal(scaled[:2], plain[:2])  # high frequencies untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # lowest frequency divided by factor


def test_inv_freq_stays_float32_when_model_is_cast() -> None:
    rotary = RotaryEmbedding(16)
    expected = rotary.inv_freq.clone()
    rotary.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, expected)


def test_rotation_is_relative() -> None:
    # q·k after RoPE depends only on the distance between positions: the property packing relies on.
    rotary = RotaryEmbedding(8, base=100.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)

    def score(pos_q: int, pos_k: int) -> torch.Tensor:
        cos_q, sin_q = rotary(torch.tensor([[pos_q]]), torch.float64)
        cos_k, sin_k = rotary(torch.tensor([[pos_k]]), torch.float64)
        rq, _ = apply_rotary(q.double(), q.double(), cos_q, sin_q)
        rk, _ = apply_rotary(k.double(), k.double(), cos_k, sin_k)
        return (rq * rk).sum()

    torch.testing.assert_close(score(3, 1), score(103, 101), atol=1e-5, rtol=0)  # angles are float32
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_invalid_scaling_raises() -> None:
    with pytest.raises(ValueError, match="missing"):
        validate_rope_scaling({"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="not supported"):
        validate_rope_scaling({"type": "dynamic", "factor": 2.0})
    assert validate_rope_scaling({"rope_type": "default", "rope_theta": 1e4}) is None
