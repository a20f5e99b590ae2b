"""Every weight a forward reads belongs to a module whose forward runs.

Wrappers that work through module hooks rely on it: Megatron-FSDP all-gathers a module's weights in that module's
forward pre-hook and attaches its root backward hook to the last module's output; a head computed with
``F.linear(h, head.weight)`` skips both, and the head's (and then every) gradient never reached the optimizer
(found on 2 GPUs: the loss stayed at ln(vocab)). Checked for every head, padded and packed, tied and untied.
"""

from __future__ import annotations

import pytest
import torch

from bioscale.models import build_config, build_model

CASES = [
    ("esm2", "masked_lm", {}),
    ("esm2", "token_classification", {"num_labels": 3}),
    ("llama3", "causal_lm", {}),
    ("llama3", "causal_lm", {"tie_word_embeddings": True}),
]


def _called_modules(model: torch.nn.Module, run) -> set[str]:
    called: set[str] = set()
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: called.add(name))
        for name, module in model.named_modules()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return called


@pytest.mark.parametrize("family, task, overrides", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_weights_with_gradients_belong_to_modules_that_ran(family, task, overrides, packed):
    torch.manual_seed(0)
    config = build_config(family, "debug", **overrides)
    model = build_model(config, task=task, device="cpu")
    ids = torch.randint(4, min(24, config.vocab_size), (2, 12))
    labels = ids.clone() if task != "token_classification" else torch.randint(0, 3, (2, 12))
    if packed:
        lengths = torch.tensor([12, 12])
        cu = torch.tensor([0, 12, 24], dtype=torch.int32)
        batch = {
            "input_ids": ids.reshape(1, -1),
            "labels": labels.reshape(1, -1),
            "position_ids": torch.arange(12).repeat(2)[None],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": int(lengths.max()),
            "max_length_k": int(lengths.max()),
        }
    else:
        batch = {"input_ids": ids, "labels": labels}

    called = _called_modules(model, lambda: model(**batch).loss.backward())
    owners = {name.rpartition(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert owners, "no parameter received a gradient"
    assert owners <= called, f"weights read outside their module's forward: {sorted(owners - called)}"
