"""A split decided by a keyed hash of the sequence itself: identical sequences always fall on the same side.

Used by curation (train/validation) and by the secondary-structure probe (probe train/test), so no held-out sequence
also appears, verbatim, on the training side. A pure function of ``(sequence, seed)``: streaming, no memory of earlier
records, and the same on every machine and Python version (``hash()`` is salted per process; BLAKE2b is not).
"""

from __future__ import annotations

import hashlib


def held_out_fraction_point(sequence: str, *, seed: int) -> float:
    """A uniform-looking number in [0, 1) determined by ``(sequence, seed)``."""
    key = seed.to_bytes(8, "little", signed=True)
    value = int.from_bytes(hashlib.blake2b(sequence.encode(), digest_size=8, key=key).digest(), "little")
    return value / 2.0**64


def is_held_out(sequence: str, *, seed: int, fraction: float) -> bool:
    """Whether ``sequence`` belongs to the held-out side of a ``fraction`` split keyed by ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1); got {fraction}")
    return held_out_fraction_point(sequence, seed=seed) < fraction
