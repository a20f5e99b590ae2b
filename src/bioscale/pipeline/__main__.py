"""``python -m bioscale.pipeline data|train|eval|pipeline …``: the stage commands without the ``bioscale`` dispatcher.

Here ``train`` is always the pipeline stage (a dataset artifact in, a model artifact out).
"""

from __future__ import annotations

import sys

from bioscale.pipeline.cli import data_main, eval_main, pipeline_main, train_stage_main

COMMANDS = {"data": data_main, "train": train_stage_main, "eval": eval_main, "pipeline": pipeline_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m bioscale.pipeline {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
