"""Secondary-structure label alphabets: 8-state DSSP (as Porter6 writes it) and its 3-state reduction.

Data, not a model or a loop: fine-tuning (``bioscale.use.finetune``) encodes labels with it and the
secondary-structure evaluation (``bioscale.eval.secondary_structure``) scores Q3 / Q8 with it.
"""

from __future__ import annotations

import numpy as np

# 8-state DSSP as in Porter6: helices H (alpha), G (3-10), I (pi); strands E, bridges B; turns T, bends S; coil '~'.
DSSP8_LABELS: tuple[str, ...] = ("H", "G", "I", "E", "B", "T", "S", "~")
DSSP3_LABELS: tuple[str, ...] = ("H", "E", "C")
_DSSP8_TO_DSSP3 = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E", "T": "C", "S": "C", "~": "C"}
# DSSP8 class index -> DSSP3 class index, for reducing predictions and labels given as ids.
DSSP8_TO_DSSP3_INDEX = np.array([DSSP3_LABELS.index(_DSSP8_TO_DSSP3[s]) for s in DSSP8_LABELS], dtype=np.int64)
# Other spellings of coil seen in DSSP files: '-', 'C', ' ', 'L'; 'P' (PPII, DSSP >= 4) counts as coil too.
_DSSP8_ALIASES = {"-": "~", "C": "~", " ": "~", "L": "~", "P": "~"}


def dssp8_to_dssp3(states: str) -> str:
    """Reduce an 8-state DSSP string to 3 states: H, G, I → H; E, B → E; T, S, ``~`` (coil) → C.

    ``ValueError`` names the first character that is not a DSSP state.
    """
    out = []
    for position, state in enumerate(states):
        state = _DSSP8_ALIASES.get(state, state)
        if state not in _DSSP8_TO_DSSP3:
            raise ValueError(f"{state!r} at position {position + 1} is not an 8-state DSSP label {DSSP8_LABELS}")
        out.append(_DSSP8_TO_DSSP3[state])
    return "".join(out)
