"""Every ``--scale`` preset speaks the trainer's schema: its train overrides compose with its recipe (unknown or
mistyped keys would raise) and use the sectioned names, not the aliases kept for users."""

from __future__ import annotations

import pytest

from bioscale.pipeline.scales import PRESETS
from bioscale.train.config import ALIASES, load_config


@pytest.mark.parametrize("scale", sorted(PRESETS))
def test_scale_train_overrides_compose_with_the_recipe(scale: str) -> None:
    preset = PRESETS[scale]
    for modality, overrides in preset.train_overrides.items():
        keys = [override.split("=", 1)[0].lstrip("+~") for override in overrides]
        assert not set(keys) & set(ALIASES), f"{scale}/{modality} uses an alias: {keys}"
        cfg = load_config(preset.recipe[modality], list(overrides))
        for override in overrides:
            key, value = override.split("=", 1)
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert str(node) == value, (scale, modality, key, node, value)
