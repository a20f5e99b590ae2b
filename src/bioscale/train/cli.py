"""``bioscale train``: compose a Hydra recipe with ``key=value`` overrides and run the training loop.

The same command runs as one process or under ``torchrun --nproc_per_node=N`` (every rank parses the same
arguments). Configuration errors (unknown recipe or key, bad value, required value left ``???``) print one clear
line and exit with status 2 before any model is built. File-system errors (a missing ``data.source``, a full disk,
a folder that cannot be written), a run directory in use by another run or holding another run's checkpoints, and a
refused resume also print one line (naming the path) and exit with status 2. A run stopped by ``nan_tolerance``, or
whose final weights are not finite, exits with status 1. A
finished run prints its summary (``run_dir``, ``metrics``, ``final_model``, losses, ...) as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bioscale_cli import describe_os_error

USAGE = "bioscale train --config-name <recipe> [--config-dir DIR] [--print-config] [key=value ...]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioscale train",
        usage=USAGE,
        description="Train a model from a Hydra recipe. Overrides are Hydra syntax: key=value, +new.key=value.",
        add_help=False,
    )
    parser.add_argument("--config-name", "-cn", dest="config_name", default=None, help="recipe name (see below)")
    parser.add_argument(
        "--config-dir",
        "-cd",
        dest="config_dir",
        default=None,
        help="folder of your own recipes (default: the recipes shipped in bioscale/configs)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help", "-h", action="store_true", help="show this help and the recipes, then exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_train_steps=100")
    return parser


def _help_text(config_dir: str | None) -> str:
    from bioscale.train.config import list_recipes

    recipes = list_recipes(config_dir)
    width = max((len(name) for name in recipes), default=0)
    lines = [_parser().format_help().rstrip(), "", "recipes:"]
    lines += [f"  {name.ljust(width)}  {description}" for name, description in recipes.items()]
    lines += [
        "",
        "common switches: num_train_steps=N data.use_sequence_packing=true grad_acc_steps=N parallelism.strategy=ddp|fsdp2",
        "  checkpoint.ckpt_dir=DIR checkpoint.save_every_n_steps=N checkpoint.resume_from_checkpoint=true",
        "  fp8.enabled=true fp8.layers=[1,2] profiler.enabled=true compile.enabled=true dtype=bf16|fp32 device=cpu",
        "multi-GPU: torchrun --nproc_per_node=8 -m bioscale.cli train --config-name L1_esm2_650M",
    ]
    return "\n".join(lines)


def _setup_logging() -> None:
    # Only rank 0 talks at INFO; other ranks report warnings and errors (prefixed with their rank).
    rank = int(os.environ.get("RANK", "0"))
    if logging.getLogger().handlers:
        return
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank{rank}] " if "RANK" in os.environ else ""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bioscale train``; returns the process exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.help:
        print(_help_text(args.config_dir))
        return 0
    if args.config_name is None:
        print(
            f"usage: {USAGE}\nbioscale train: error: --config-name is required; "
            "`bioscale train --help` lists the recipes",
            file=sys.stderr,
        )
        return 2

    from bioscale.train.config import config_to_yaml, load_config

    try:
        cfg = load_config(args.config_name, args.overrides, config_dir=args.config_dir)
    except ValueError as err:
        print(f"bioscale train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0

    _setup_logging()
    from bioscale.train.train import NonFiniteLossError, _jsonable, train

    try:
        summary = train(cfg)
    except ValueError as err:
        print(f"bioscale train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing data path, a full disk, a folder without write permission: what and where
        print(f"bioscale train: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"bioscale train: stopped: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        # One JSON line on stdout: where the run put its files (run_dir, metrics, final_model) and how it ended.
        print(json.dumps(_jsonable(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
