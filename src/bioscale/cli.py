"""``python -m bioscale.cli`` (e.g. ``torchrun -m bioscale.cli train ...``): the ``bioscale`` command.

The dispatcher itself is :mod:`bioscale_cli`, outside this package, so that ``bioscale --help`` does not import torch.
"""

from __future__ import annotations

import sys

from bioscale_cli import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
