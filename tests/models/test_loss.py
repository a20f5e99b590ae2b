"""``bioscale.models.loss``: the label-position gather the LM heads run under ``logits_on_labels_only``."""

from __future__ import annotations

import pytest
import torch

from bioscale.constants import IGNORE_INDEX
from bioscale.models.loss import select_label_positions, token_cross_entropy


@pytest.mark.parametrize("shape", [(3, 7), (1, 21)])  # padded [B, S] and packed [1, T]
def test_label_positions_equal_boolean_indexing_with_the_same_gradient(shape) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.6] = IGNORE_INDEX
    hidden = torch.randn(*shape, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(int((labels != IGNORE_INDEX).sum()), 5, dtype=torch.float64, generator=generator)

    rows, kept = select_label_positions(hidden, labels)
    (grad,) = torch.autograd.grad((rows * upstream).sum(), hidden)
    keep = labels != IGNORE_INDEX
    (expected_grad,) = torch.autograd.grad((hidden[keep] * upstream).sum(), hidden)
    assert torch.equal(rows, hidden[keep]) and torch.equal(kept, labels[keep])
    assert torch.equal(grad, expected_grad)
    # The head's loss over the selected rows equals the loss over every position.
    logits = torch.randn(*shape, 11, dtype=torch.float64, generator=generator)
    selected, selected_labels = select_label_positions(logits, labels)
    for reduction in ("sum", "mean"):
        assert torch.allclose(token_cross_entropy(selected, selected_labels, reduction=reduction)[0],
                              token_cross_entropy(logits, labels, reduction=reduction)[0])  # fmt: skip


def test_no_label_gives_empty_rows_and_a_shape_mismatch_is_refused() -> None:
    rows, kept = select_label_positions(torch.ones(2, 3, 4), torch.full((2, 3), IGNORE_INDEX))
    assert rows.shape == (0, 4) and kept.shape == (0,)
    with pytest.raises(ValueError, match="does not match"):
        select_label_positions(torch.ones(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
