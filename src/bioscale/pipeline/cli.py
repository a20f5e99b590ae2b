"""``bioscale data | train | eval | pipeline``: the stages as commands that pipe.

Each command prints exactly one JSON line on stdout, the description of the artifact it wrote (``path`` plus the
metadata); logs, progress bars and warnings go to stderr (stdout is pointed at stderr while the stage runs, see
streams.py). A stage that needs an input artifact takes ``--input PATH`` or, without it, reads the previous stage's
line from stdin::

    bioscale data --scale tiny | bioscale train --scale tiny | bioscale eval --scale tiny

Exit status: 0 on success, 2 for bad arguments or invalid input (the message names the path and field), 1 when
training stops on non-finite losses.

``bioscale train`` belongs to the training CLI (:mod:`bioscale.train.cli`, recipes) unless it is given pipeline
options or piped input: :func:`train_main` makes that choice and :func:`train_stage_main` runs the stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from bioscale.pipeline.artifacts import Artifact
from bioscale.pipeline.scales import SCALES
from bioscale.pipeline.stages import is_main_process
from bioscale.pipeline.streams import resolve_input_artifact, stdout_to_stderr
from bioscale.train.cli import main as recipe_main

# Options that only the pipeline's train stage understands: their presence routes `bioscale train` here.
PIPELINE_TRAIN_OPTIONS = ("--input", "--data-artifact", "--scale", "--seed", "--out", "--overwrite", "--device")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )


def _limit(text: str) -> int | None:
    """An ``--max-*`` value: a positive integer, or ``all``."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=SCALES, default="tiny",
                        help="data size and training/eval budget (see bioscale/pipeline/scales.py; default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the training run and the masking")
    parser.add_argument("--out", default=None,
                        help="artifact directory (default: outputs/<stage>/<time>-<scale>-seed<seed>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help (0) or a usage error (2): argparse has already printed to stderr
        return int(exit_.code or 0)


def _run(stage: str, body: Callable[[], Artifact]) -> int:
    """Run ``body`` with stdout sent to stderr; print the artifact's JSON line; map errors to exit codes."""
    _setup_logging()
    try:
        with stdout_to_stderr() as emit:
            artifact = body()
            if is_main_process():  # one line per launch, also under torchrun
                emit(artifact.describe())
    except (ValueError, FileNotFoundError) as err:
        print(f"bioscale {stage}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  (NonFiniteLossError lives in train; report any stop in one line)
        if type(err).__name__ == "NonFiniteLossError":
            print(f"bioscale {stage}: stopped: {err}", file=sys.stderr)
            return 1
        raise
    return 0


def _out(args: argparse.Namespace, stage: str) -> Path:
    from bioscale.pipeline.stages import default_out

    if args.out:
        return Path(args.out)
    if not is_main_process():
        # Every rank must agree on the directory, and a time stamp may differ between them: require --out.
        raise ValueError("under torchrun, pass --out DIR (the ranks cannot agree on a time-stamped default)")
    return default_out(stage, args.scale, args.seed)


# ---------------------------------------------------------------------------------------------------------------------


def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioscale data",
        description="Curate sequences into a dataset artifact (parquet shards, train/validation split by sequence "
        "hash, counts). Without --source, curates the offline demo corpus.",
    )
    parser.add_argument("--source", default=None,
                        help="FASTA[.gz], parquet file or shard directory, hf:<dataset>, demo:<kind> "
                        "(default: the demo corpus)")
    parser.add_argument("--kind", choices=("protein", "dna"), default="protein")
    _common(parser)
    parser.add_argument("--min-length", type=int, default=1, help="drop sequences shorter than this (residues)")
    parser.add_argument("--max-length", type=int, default=None, help="drop sequences longer than this (residues)")
    parser.add_argument("--chunk-length", type=int, default=None,
                        help="DNA: cut records into chunks of this many bases")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--max-records", type=_limit, default=-1,
                        help="keep at most N unique sequences, or 'all' (default: the scale's cap)")
    parser.add_argument("--sequence-column", default="sequence")
    parser.add_argument("--id-column", default=None)
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--unknown-residues", choices=("map", "reject", "error"), default="map")
    parser.add_argument("--shard-size", type=int, default=100_000, help="rows per parquet shard")
    return parser


def data_main(argv: list[str] | None = None) -> int:
    """``bioscale data``: curate a source (or the demo corpus) into a dataset artifact."""
    args = _parse(data_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> Artifact:
        from bioscale.pipeline.curate import curate

        return curate(
            args.source, out=_out(args, "data"), kind=args.kind, scale=args.scale, seed=args.seed,
            sequence_column=args.sequence_column, id_column=args.id_column, hf_split=args.hf_split,
            min_length=args.min_length, max_length=args.max_length, chunk_length=args.chunk_length,
            unknown_residues=args.unknown_residues, validation_fraction=args.validation_fraction,
            max_records=args.max_records, shard_size=args.shard_size, overwrite=args.overwrite,
        )

    return _run("data", body)


# ---------------------------------------------------------------------------------------------------------------------


def train_stage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioscale train",
        usage="bioscale train [--input DATASET_ARTIFACT] [--scale S] [--seed N] [--out DIR] [key=value ...]",
        description="Pipeline mode of `bioscale train`: train on a dataset artifact (from --input or the JSON line "
        "on stdin) and write a model artifact. Recipe mode: bioscale train --config-name RECIPE.",
    )
    parser.add_argument("--input", "--data-artifact", dest="input", default=None,
                        help="dataset artifact directory (default: read the JSON line piped on stdin)")
    _common(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the recipe's)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides applied last, e.g. num_train_steps=100 dtype=bf16")
    return parser


def train_stage_main(argv: list[str] | None = None) -> int:
    """``bioscale train`` in pipeline mode: a dataset artifact in, a model artifact out."""
    args = _parse(train_stage_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> Artifact:
        from bioscale.pipeline.stages import train_stage

        dataset = resolve_input_artifact(args.input, what="dataset artifact")
        return train_stage(
            dataset, out=_out(args, "model"), scale=args.scale, seed=args.seed, overrides=args.overrides,
            device=args.device, overwrite=args.overwrite,
        )

    return _run("train", body)


def is_pipeline_train(argv: list[str], *, stdin_is_tty: bool | None = None) -> bool:
    """Whether a ``bioscale train`` command line is the pipeline stage rather than a recipe run.

    Pipeline mode: a pipeline option is present (``--input``, ``--data-artifact``, ``--scale``, ``--seed``, ``--out``,
    ``--overwrite``, ``--device``), or there is no ``--config-name`` and no ``--help`` and stdin is piped.
    """
    def given(option: str) -> bool:
        return any(arg == option or arg.startswith(option + "=") for arg in argv)

    if any(given(option) for option in PIPELINE_TRAIN_OPTIONS):
        return True
    if any(given(option) for option in ("--config-name", "-cn", "--help", "-h", "--print-config")):
        return False
    if stdin_is_tty is None:
        stdin_is_tty = sys.stdin is None or sys.stdin.closed or sys.stdin.isatty()
    return not stdin_is_tty


def train_main(argv: list[str] | None = None) -> int:
    """``bioscale train``: the pipeline stage, or the recipe CLI (:mod:`bioscale.train.cli`); see is_pipeline_train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if is_pipeline_train(argv):
        return train_stage_main(argv)

    return recipe_main(argv)


# ---------------------------------------------------------------------------------------------------------------------


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioscale eval",
        description="Evaluate a model artifact (from --input or the JSON line on stdin) or any checkpoint directory "
        "(--model): perplexity / bits per base, the secondary-structure probe (proteins) against a random-init "
        "model, and a Markdown/HTML report.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", default=None, help="model artifact directory (default: read stdin)")
    source.add_argument("--model", default=None,
                        help="a checkpoint directory instead of a model artifact (needs --data)")
    parser.add_argument("--data", default=None,
                        help="FASTA/parquet to evaluate on (default: the validation split of the model's dataset)")
    parser.add_argument("--sequence-column", default=None,
                        help="the sequence column of a parquet --data (default: sequence, Sequence, seq or sequences)")
    _common(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--bf16", action="store_true", help="run forward passes under bf16 autocast")
    parser.add_argument("--max-sequences", type=_limit, default=-1,
                        help="evaluate at most N sequences, or 'all' (default: the scale's cap)")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--ss-data", default=None,
                       help="Porter6-style parquet for the secondary-structure probe (default: ../shared/data)")
    probe.add_argument("--no-ss", action="store_true", help="skip the secondary-structure probe")
    parser.add_argument("--ss-head", choices=("probe", "lora", "full"), default="probe",
                        help="secondary structure: linear probe on frozen embeddings (default), or fine-tune a "
                        "per-residue head with LoRA adapters or all weights")
    parser.add_argument("--ss-finetune-steps", type=int, default=None,
                        help="steps of the --ss-head lora|full fine-tune per model (default: the scale's)")
    parser.add_argument("--no-random-baseline", action="store_true", help="do not evaluate a random-init model")
    cells = parser.add_argument_group("single cells (Geneformer; --data a tokenized parquet or an .h5ad)")
    cells.add_argument("--label-column", default=None,
                       help="cell-type column (parquet column or obs) for the linear cell-type probe")  # fmt: skip
    cells.add_argument("--gene-medians", default=None, help="gene medians for ranking an .h5ad --data")
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    """``bioscale eval``: a model artifact in, an evaluation artifact out."""
    args = _parse(eval_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> Artifact:
        from bioscale.pipeline.stages import evaluate

        model = args.model or resolve_input_artifact(args.input, what="model artifact")
        return evaluate(
            model, out=_out(args, "eval"), data=args.data, sequence_column=args.sequence_column, scale=args.scale,
            seed=args.seed,
            secondary_structure=False if args.no_ss else args.ss_data, max_sequences=args.max_sequences,
            ss_head=args.ss_head, ss_finetune_steps=args.ss_finetune_steps,
            random_baseline=not args.no_random_baseline, device=args.device, bf16=args.bf16,
            overwrite=args.overwrite, label_column=args.label_column, gene_medians=args.gene_medians,
        )

    return _run("eval", body)


# ---------------------------------------------------------------------------------------------------------------------


def pipeline_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bioscale pipeline",
        description="Run data -> train -> eval in one process under --out/{data,model,eval}; prints the evaluation "
        "artifact's JSON line.",
    )
    parser.add_argument("--source", default=None, help="as in `bioscale data` (default: the demo corpus)")
    parser.add_argument("--kind", choices=("protein", "dna"), default="protein")
    _common(parser)
    parser.add_argument("--device", default=None)
    parser.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--ss-data", default=None)
    probe.add_argument("--no-ss", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the training stage, e.g. num_train_steps=100")
    return parser


def pipeline_main(argv: list[str] | None = None) -> int:
    """``bioscale pipeline``: all three stages; the evaluation artifact's line on stdout."""
    args = _parse(pipeline_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> Artifact:
        from bioscale.pipeline.stages import run_pipeline

        artifacts = run_pipeline(
            args.source, out=_out(args, "pipeline"), kind=args.kind, scale=args.scale, seed=args.seed,
            train_overrides=args.overrides, device=args.device, overwrite=args.overwrite,
            eval_kwargs={"secondary_structure": False if args.no_ss else args.ss_data, "bf16": args.bf16},
        )
        return artifacts["eval"]

    return _run("pipeline", body)
