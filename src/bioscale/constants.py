"""Constants every layer of bioscale shares, defined once (models, data, distributed and the loops all import them).

- ``IGNORE_INDEX``: the label value the loss skips (PyTorch ``cross_entropy``'s default ``ignore_index``).
- ``PAD_TOKEN_ID``: ``<pad>`` in both bioscale tokenizers (as in ESM-2's alphabet).
"""

IGNORE_INDEX = -100
PAD_TOKEN_ID = 1
