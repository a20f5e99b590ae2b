"""Import-time notices of optional packages that are not bioscale's to show.

transformers 5 imports torchao at its own import time whenever torchao is installed (its quantizer registry does,
``transformers.quantizers.quantizer_torchao``), before bioscale has any say. torchao then logs one line per compiled
extension it cannot load (CPU builds have none of its CUDA kernels) and makes torch log a deprecation per enum it
registers with pytree. None of it concerns a bioscale user, FP8 or not, so ``import bioscale`` raises those two
loggers to ERROR for the duration of its own import and restores them after; later messages, and every error, still
show.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_NOISY_AT_IMPORT = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_third_party_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_AT_IMPORT]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
