"""The ``bioscale`` command: a thin dispatcher to each subcommand's own module.

It lives outside the ``bioscale`` package on purpose: ``import bioscale`` registers the models with the
``transformers`` Auto classes, which imports torch and transformers (seconds, and their import-time notices), and a
submodule cannot be imported without its package. So ``bioscale --help`` imports nothing but this module. Each
subcommand lives next to the code it drives and is imported only when run, so a missing optional dependency of one
subcommand never breaks another. ``python -m bioscale.cli`` (what ``torchrun -m`` needs) runs this same ``main``.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). The function takes ``argv: list[str]`` and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    # `bioscale train --config-name X` runs a recipe; with --input / piped stdin it is the pipeline's train stage.
    "train": ("bioscale.pipeline.cli", "train_main", "train a model from a Hydra recipe (bioscale train --config-name L0_sanity)"),
    "data": ("bioscale.pipeline.cli", "data_main", "curate sequences into a dataset artifact"),
    "eval": ("bioscale.pipeline.cli", "eval_main", "evaluate a model artifact"),
    "pipeline": ("bioscale.pipeline.cli", "pipeline_main", "run data -> train -> eval"),
    "embed": ("bioscale.use.cli", "embed_main", "embed sequences with a trained model"),
    "finetune": ("bioscale.use.cli", "finetune_main", "fine-tune a classification head (full or LoRA)"),
    "generate": ("bioscale.use.cli", "generate_main", "generate DNA with a causal model"),
    "export": ("bioscale.use.cli", "export_main", "export a bioscale model to the plain transformers format"),
    "tokenize-cells": ("bioscale.use.cli", "tokenize_cells_main", "rank-value encode single cells (.h5ad) for Geneformer"),
    "score": ("bioscale.use.variants", "score_main", "zero-shot variant scores (masked log-likelihood ratio)"),
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: what went wrong and the path (``No such file or directory: /x/y``)."""
    text = err.strerror or str(err)
    for name in (err.filename, err.filename2):
        if name is not None and str(name) not in text:
            text += f": {name}" if name == err.filename else f" -> {name}"
    return text


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: bioscale <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)  # no command: a usage error
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())  # asked for: the help is the output
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(version("bioscale"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"bioscale: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except OSError as err:  # a missing, unreadable or full path, from any subcommand: one line naming it
        print(f"bioscale {name}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
