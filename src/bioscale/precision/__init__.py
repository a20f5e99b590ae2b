"""Precision converters applied to a model from outside, after the ``meta`` build and before parallelize.

:mod:`bioscale.precision.fp8` swaps the ``nn.Linear`` layers of chosen transformer blocks for torchao's
``Float8Linear`` (an optional extra, imported lazily); :mod:`bioscale.precision.quant_stats` records what the FP8 casts
do to activations, weights and gradients. Nothing here imports ``torchao`` at module import time, so ``import
bioscale.precision`` works without the ``fp8`` extra.
"""

from bioscale.precision.fp8 import (
    FP8_RECIPES,
    apply_fp8,
    check_fp8_hardware,
    fp8_block_indices,
    fp8_layer_names,
    precompute_fp8_scales,
)
from bioscale.precision.quant_stats import QuantStats, attach_quant_stats, cast_stats

__all__ = [
    "FP8_RECIPES",
    "QuantStats",
    "apply_fp8",
    "attach_quant_stats",
    "cast_stats",
    "check_fp8_hardware",
    "fp8_block_indices",
    "fp8_layer_names",
    "precompute_fp8_scales",
]
