"""DNA generation: greedy output equals stock ``LlamaForCausalLM``'s on the same weights, sampling is seeded, and bad
prompts fail with the character and its position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bioscale.models import to_hf
from bioscale.use import generate_dna, load_model
from bioscale.use.cli import generate_main

PROMPTS = ["ACGTTGCA", "GATTACAGATTACAGGC", "T", ""]  # different lengths: left padding and an empty prompt


def test_greedy_equals_transformers_llama(llama_dir: Path) -> None:
    loaded = load_model(llama_dir, task="causal_lm")
    hf_model = to_hf(loaded.model).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    kwargs = {"max_new_tokens": 24, "tokenizer": loaded.tokenizer, "device": "cpu", "dtype": torch.float32}
    ours = generate_dna(loaded.model, PROMPTS, **kwargs)
    reference = generate_dna(hf_model, PROMPTS, **kwargs)
    assert [s.generated for s in ours.samples] == [s.generated for s in reference.samples]
    # Batching must not change a prompt's continuation (left padding is masked out).
    alone = generate_dna(loaded.model, PROMPTS[1], **kwargs)
    assert alone.samples[0].generated == ours.samples[1].generated
    for sample in ours.samples:
        assert set(sample.generated) <= set("ACGTNRYSWKMBDHV")
        assert sample.num_new_tokens == len(sample.generated) + int(sample.stopped_at_eos) <= 24


def test_sampling_is_seeded_and_gives_num_samples(llama_dir: Path) -> None:
    kwargs = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.3, "top_k": 4, "top_p": 0.95, "num_samples": 3,
                  "stop_at_eos": False, "device": "cpu"}  # fmt: skip
    first = generate_dna(llama_dir, ["ACGT", "GG"], seed=7, **kwargs)
    second = generate_dna(llama_dir, ["ACGT", "GG"], seed=7, **kwargs)
    assert [s.generated for s in first.samples] == [s.generated for s in second.samples]
    assert [(s.prompt_index, s.sample_index) for s in first.samples] == [(p, k) for p in range(2) for k in range(3)]
    assert all(len(s.generated) == 16 and not s.stopped_at_eos for s in first.samples)
    assert len({s.generated for s in first.samples}) > 1  # sampling, not greedy
    assert first.num_new_tokens == 6 * 16


def test_invalid_prompt_names_character_and_position(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"prompt 1: character 'X' at position 3 is not a valid base"):
        generate_dna(llama_dir, ["ACGT", "acXgt"], max_new_tokens=4, device="cpu")
    assert generate_main([str(llama_dir), "--prompt", "ACG-T", "--max-new-tokens", "4", "--device", "cpu"]) == 2
    assert "character '-' at position 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="generation needs a causal model with its LM head"):
        generate_dna(load_model(llama_dir).model, "ACGT", max_new_tokens=4, device="cpu")  # base model: no LM head
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_dna(llama_dir, "ACGT", max_new_tokens=0, device="cpu")


def test_cli_prints_json(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(llama_dir), "--prompt", "ACGTAC", "--prompt", "gg", "--max-new-tokens", "8", "--device", "cpu",
            "--no-stop-at-eos"]  # fmt: skip
    assert generate_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoding"] == "greedy"
    assert [s["prompt"] for s in report["samples"]] == ["ACGTAC", "GG"]
    expected = generate_dna(llama_dir, ["ACGTAC", "GG"], max_new_tokens=8, stop_at_eos=False, device="cpu")
    assert [s["generated"] for s in report["samples"]] == [s.generated for s in expected.samples]
