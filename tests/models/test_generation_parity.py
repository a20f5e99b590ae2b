"""Generation through ``transformers``' ``GenerationMixin`` equals stock ``LlamaForCausalLM`` on the converted weights,
in every decoding mode users reach for, under whichever ``transformers`` release is installed (the suite runs under the
locked version and under the newest the ranges admit: ``scripts/check_latest.sh``).

Float32 on CPU: outputs must be token-for-token equal, and sampled outputs equal under the same seed (same logits,
same RNG draws).
"""

from __future__ import annotations

import pytest
import torch
from model_test_utils import tiny_llama_config
from transformers import LlamaForCausalLM

from bioscale.models import from_hf

PROMPT_LENGTHS = [6, 11, 3]

MODES: dict[str, dict[str, object]] = {
    "greedy": dict(do_sample=False),
    "greedy-no-cache": dict(do_sample=False, use_cache=False),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=6, top_p=0.9),
    "sampling-no-cache": dict(do_sample=True, temperature=1.3, use_cache=False),
    "beam-search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam-search-no-cache": dict(do_sample=False, num_beams=2, use_cache=False),
    "beam-sampling": dict(do_sample=True, num_beams=2, top_k=8),
}


def _left_padded(lengths: list[int], seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, 21, (length,), generator=gen)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, torch.nn.Module]:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config()).eval()
    return hf, from_hf(hf).eval()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch", ["single", "left-padded"])
def test_generate_equals_transformers(models, mode: str, batch: str) -> None:
    hf, ours = models
    input_ids, attention_mask = _left_padded([7] if batch == "single" else PROMPT_LENGTHS)
    kwargs = dict(MODES[mode], max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(11)
        expected = hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        torch.manual_seed(11)
        actual = ours.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert actual.shape == expected.shape
    assert actual.shape[-1] == input_ids.shape[-1] + 12
    assert torch.equal(actual, expected)


def test_generation_stops_at_eos_like_transformers(models) -> None:
    hf, ours = models
    input_ids, attention_mask = _left_padded(PROMPT_LENGTHS)
    with torch.no_grad():
        # Pick as eos the token greedy decoding emits first for row 0, so at least one row stops early.
        first = int(hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[0, -1])
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=first)
        expected = hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        actual = ours.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(actual, expected)


def test_scores_equal_transformers(models) -> None:
    hf, ours = models
    input_ids, attention_mask = _left_padded(PROMPT_LENGTHS)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = hf.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        actual = ours.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    for step_actual, step_expected in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_actual, step_expected, atol=1e-4, rtol=0)
