"""``bioscale embed | finetune | generate | export``: argument parsing around :mod:`bioscale.use`.

Each ``*_main(argv)`` parses its arguments, calls the library function and returns an exit code: 0 on success, 2
for a usage or input error (printed as one ``bioscale <command>: error: ...`` line on stderr, no traceback), so
scripts can tell bad input from a crash. Results go to stdout (``generate``: JSON) or to the output path; progress
and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32",
           "float32": "float32"}  # fmt: skip


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )  # fmt: skip


def _dtype(name: str | None):  # -> torch.dtype | None
    if name is None:
        return None
    import torch

    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return getattr(torch, _DTYPES[name])


def _run(command: str, body: Callable[[], int]) -> int:
    """Run ``body``, turning a ``ValueError`` (bad input) or a missing optional package into one error line and
    exit status 2."""
    try:
        return body()
    except (ValueError, ImportError) as err:
        print(f"bioscale {command}: error: {err}", file=sys.stderr)
        return 2


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")


def embed_main(argv: list[str]) -> int:
    """``bioscale embed MODEL INPUT -o OUT``."""
    parser = argparse.ArgumentParser(
        prog="bioscale embed",
        description=("Embed protein (ESM-2, AMPLIFY), DNA (Llama 3) or coding sequences (CodonFM, one vector per "
                     "codon) or cells (Geneformer) from FASTA / parquet / CSV / .h5ad into parquet or .npy."),
    )
    parser.add_argument("model", help="checkpoint directory (bioscale or transformers) or Hub id")
    parser.add_argument("input", help="FASTA (.fasta/.fa/.faa/.fna, optionally .gz), parquet or CSV file")
    parser.add_argument("-o", "--output", required=True, help="OUT.parquet or OUT.npy (+ OUT.ids.txt)")
    parser.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                        help="mean over residues (special tokens excluded) or the <cls> token")  # fmt: skip
    parser.add_argument("--per-residue", action="store_true", help="also write one vector per residue")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="token budget per forward")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context in tokens incl. special tokens (default: the model's, ESM-2: 1024)")  # fmt: skip
    parser.add_argument("--long-sequences", choices=("window", "truncate", "error"), default="window",
                        help="policy for sequences longer than the context (default: overlapping windows)")  # fmt: skip
    parser.add_argument("--window-overlap", type=int, default=None, help="residues shared by consecutive windows")
    parser.add_argument("--batching", choices=("auto", "packed", "padded"), default="auto")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the blocks for packed batches (auto: on CUDA for inputs of 8M+ tokens)")  # fmt: skip
    parser.add_argument("--no-prefetch", action="store_true",
                        help="collate batches inline instead of in a background thread (default on CUDA)")  # fmt: skip
    parser.add_argument("--sequence-column", default=None, help="parquet/CSV column holding sequences")
    parser.add_argument("--id-column", default=None, help="parquet/CSV column holding ids")
    cells = parser.add_argument_group("single cells (Geneformer; INPUT an .h5ad of counts or a tokenized parquet)")
    cells.add_argument("--gene-medians", default=None,
                       help="gene medians of the pretraining corpus (.json/.tsv; default: the model dir's "
                       "gene_medians.json, else computed from INPUT with a warning)")  # fmt: skip
    cells.add_argument("--layer", default=None, help="AnnData layer with the raw counts (default: X)")
    cells.add_argument("--gene-id-column", default=None, help="AnnData var column with Ensembl ids (default: var_names)")
    cells.add_argument("--cell-id-column", default=None, help="obs / parquet column with cell ids (default: obs_names)")
    cells.add_argument("--obsm-key", default="X_geneformer", help="with -o OUT.h5ad: the .obsm key (default X_geneformer)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_args(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from bioscale.use.embed import embed, write_embeddings
        from bioscale.use.embed_cells import embed_cells, is_cell_input, is_cell_model, write_embeddings_to_anndata

        from bioscale.use.embed_images import embed_images, is_image_model, is_image_path

        if is_image_model(args.model) or is_image_path(args.input):  # a folder / image file, or a ViT: images
            if not args.output.lower().endswith((".parquet", ".npy")):
                raise ValueError(f"--output {args.output!r} must end in .parquet or .npy")
            if args.pooling != "mean":
                print("bioscale embed: note: --pooling does not apply to images (the model's own pooling is used)",
                      file=sys.stderr)  # fmt: skip
            result = embed_images(args.model, args.input, per_patch=args.per_residue,
                                  image_column=args.sequence_column or "image", device=args.device,
                                  dtype=_dtype(args.dtype), progress=not args.no_progress)  # fmt: skip
            written = write_embeddings(result, args.output)
            print(f"embedded {len(result)} images (dim {result.pooled.shape[1]}, pooling {result.pooling}; "
                  f"{result.num_left_out} left out) -> {', '.join(map(str, written))}", file=sys.stderr)  # fmt: skip
            return 0
        if is_cell_input(args.input) or args.output.lower().endswith(".h5ad") or is_cell_model(args.model):
            if not args.output.lower().endswith((".parquet", ".npy", ".h5ad")):
                raise ValueError(f"--output {args.output!r} must end in .parquet, .npy or .h5ad (into .obsm)")
            result = embed_cells(
                args.model, args.input, pooling=args.pooling, gene_medians=args.gene_medians, layer=args.layer,
                gene_id_column=args.gene_id_column, cell_id_column=args.cell_id_column or args.id_column,
                input_ids_column=args.sequence_column or "input_ids", max_length=args.max_length,
                max_tokens_per_batch=args.max_tokens_per_batch, batching=args.batching, device=args.device,
                dtype=_dtype(args.dtype), progress=not args.no_progress,
            )  # fmt: skip
            if args.output.lower().endswith(".h5ad"):
                written = [write_embeddings_to_anndata(result, args.input, args.output, key=args.obsm_key,
                                                       cell_id_column=args.cell_id_column)]  # fmt: skip
            else:
                written = write_embeddings(result, args.output)
            print(
                f"embedded {len(result)} cells (dim {result.pooled.shape[1]}; {result.num_truncated} truncated, "
                f"{result.num_left_out} without a known gene left out) -> {', '.join(map(str, written))}",
                file=sys.stderr,
            )
            return 0
        if not args.output.lower().endswith((".parquet", ".npy")):
            raise ValueError(f"--output {args.output!r} must end in .parquet or .npy")
        result = embed(
            args.model,
            args.input,
            pooling=args.pooling,
            per_residue=args.per_residue,
            max_tokens_per_batch=args.max_tokens_per_batch,
            max_length=args.max_length,
            long_sequences=args.long_sequences,
            window_overlap=args.window_overlap,
            batching=args.batching,
            device=args.device,
            dtype=_dtype(args.dtype),
            sequence_column=args.sequence_column,
            id_column=args.id_column,
            progress=not args.no_progress,
            compile={"auto": None, "on": True, "off": False}[args.compile],
            prefetch=False if args.no_prefetch else None,
        )
        written = write_embeddings(result, args.output)
        print(
            f"embedded {len(result)} sequences ({int(result.lengths.sum())} residues, dim {result.pooled.shape[1]}; "
            f"{result.num_windowed} windowed, {result.num_truncated} truncated) -> {', '.join(map(str, written))}",
            file=sys.stderr,
        )
        return 0

    return _run("embed", body)


def finetune_main(argv: list[str]) -> int:
    """``bioscale finetune --task TASK --model DIR --data FILE [--lora] [key=value ...]``."""
    from bioscale.use.finetune import TASKS, list_finetune_recipes

    recipes = list_finetune_recipes()
    parser = argparse.ArgumentParser(
        prog="bioscale finetune",
        description="Fine-tune an ESM-2 head (full or LoRA) on labelled sequences; metrics on a held-out split.",
        epilog="recipes:\n" + "\n".join(f"  {name}: {text}" for name, text in recipes.items())
        + "\n\nany config key can be overridden as key=value, e.g. num_train_steps=200 optimizer.lr=1e-3 lora.r=16 label_set=dssp3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--task", choices=TASKS, default=None, help="picks the recipe of the same name")
    parser.add_argument("--recipe", default=None, help="a shipped recipe name or a YAML file (default: --task's)")
    parser.add_argument("--model", default=None, help="ESM-2 checkpoint directory or Hub id")
    parser.add_argument("--data", default=None, help="parquet/CSV with sequence and label columns")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    def body() -> int:
        import dataclasses

        from bioscale.use.finetune import finetune, load_finetune_config

        recipe = args.recipe or args.task
        if recipe is None:
            raise ValueError(
                "give --task (token_classification, sequence_classification, sequence_regression) or --recipe"
            )
        overrides = list(args.overrides)
        for key, value in (("task", args.task), ("model", args.model), ("data", args.data),
                           ("output_dir", args.output_dir), ("num_train_steps", args.max_steps), ("device", args.device)):  # fmt: skip
            if value is not None:
                overrides.append(f"{key}={value}")
        if args.lora:
            overrides.append("lora.enabled=true")
        config = load_finetune_config(recipe, overrides)
        if args.print_config:
            print(json.dumps(dataclasses.asdict(config), indent=2))
            return 0
        _setup_logging()
        result = finetune(config)
        print(json.dumps({"output_dir": str(result.output_dir), "metrics": result.metrics}, indent=2))
        return 0

    return _run("finetune", body)


def generate_main(argv: list[str]) -> int:
    """``bioscale generate MODEL --prompt ACGT... --max-new-tokens N``; prints JSON."""
    parser = argparse.ArgumentParser(
        prog="bioscale generate",
        description="Continue DNA prompts with a causal (Llama 3) model; prints JSON with the generated bases.",
    )
    parser.add_argument("model", help="checkpoint directory (bioscale or transformers Llama) or Hub id")
    parser.add_argument("--prompt", action="append", required=True,
                        help="DNA prompt (repeat for a batch of prompts; '' starts from <bos>)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bases")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default unless sampling options)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stop-at-eos", action="store_true", help="forbid <eos>: exactly max-new-tokens bases")
    parser.add_argument("--engine", choices=("auto", "static", "transformers"), default="auto",
                        help="static KV cache + CUDA graphs (default for bioscale models), or the model's generate()")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="samples decoded at once; more wait and refill finished slots (static engine)")  # fmt: skip
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly (static engine)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the decode step (static engine, CUDA): ~20 s once per batch shape, then "
                             "~2x tokens/s (auto: on CUDA for jobs of 20,000+ decode steps, where it pays)")  # fmt: skip
    parser.add_argument("--log-probs", action="store_true", help="also print each new token's log-probability")
    _add_device_args(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from bioscale.use.generate import generate_dna

        sampling = any(v is not None for v in (args.temperature, args.top_k, args.top_p)) or args.num_samples > 1
        if args.greedy and sampling:
            raise ValueError("--greedy cannot be combined with --temperature/--top-k/--top-p/--num-samples > 1")
        result = generate_dna(
            args.model,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            do_sample=sampling,
            temperature=args.temperature if args.temperature is not None else 1.0,
            top_k=args.top_k,
            top_p=args.top_p,
            num_samples=args.num_samples,
            seed=args.seed,
            stop_at_eos=not args.no_stop_at_eos,
            device=args.device,
            dtype=_dtype(args.dtype),
            engine=args.engine,
            max_batch_size=args.max_batch_size,
            cuda_graphs=False if args.no_cuda_graphs else None,
            compile_step={"auto": None, "on": True, "off": False}[args.compile],
        )
        report = {
            "model": args.model,
            "decoding": "sample" if sampling else "greedy",
            "engine": result.engine,
            "samples": [s.as_dict(log_probs=args.log_probs) for s in result.samples],
            "num_new_tokens": result.num_new_tokens,
            "elapsed_s": round(result.elapsed_s, 4),
            "tokens_per_s": round(result.tokens_per_s, 1),
        }
        print(json.dumps(report, indent=2))
        return 0

    return _run("generate", body)


def export_main(argv: list[str]) -> int:
    """``bioscale export MODEL -o DIR``."""
    parser = argparse.ArgumentParser(
        prog="bioscale export",
        description="Write a bioscale model (or a fine-tuning output, LoRA merged) as a plain transformers "
        "checkpoint that loads without bioscale (EsmForMaskedLM, LlamaForCausalLM, ...).",
    )
    parser.add_argument("model", help="bioscale checkpoint directory, fine-tuning output directory, or Hub id")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    args = parser.parse_args(argv)

    def body() -> int:
        from bioscale.use.hf_export import export_model

        out = export_model(args.model, args.output)
        config = json.loads((out / "config.json").read_text())
        print(
            f"exported {config.get('architectures', ['?'])[0]} ({config.get('model_type')}) to {out}", file=sys.stderr
        )
        return 0

    return _run("export", body)


def tokenize_cells_main(argv: list[str]) -> int:
    """``bioscale tokenize-cells COUNTS.h5ad -o CELLS.parquet``: rank-value encode cells for Geneformer."""
    parser = argparse.ArgumentParser(
        prog="bioscale tokenize-cells",
        description="Rank-value encode the cells of a raw-count matrix (.h5ad or a wide parquet with one column per "
        "Ensembl id) for Geneformer: OUT.parquet (cell_id, input_ids, length), OUT.gene_medians.json and "
        "OUT.tokenization.json (convention, files, counts) beside it.",
    )
    parser.add_argument("input", help=".h5ad (AnnData, raw counts) or .parquet count matrix")
    parser.add_argument("-o", "--output", required=True, help="OUT.parquet")
    parser.add_argument("--convention", choices=("v1", "v2"), default="v1",
                        help="v1: top 2,048 genes; v2: <cls> top 4,094 genes <eos>")  # fmt: skip
    parser.add_argument("--vocab", default=None, help="gene vocabulary .txt/.json (default: the shared V1 vocabulary)")
    parser.add_argument("--gene-medians", default=None, help="medians file (default: computed from INPUT and saved)")
    parser.add_argument("--model-input-size", type=int, default=None, help="tokens per cell incl. special tokens")
    parser.add_argument("--layer", default=None, help="AnnData layer with the raw counts (default: X)")
    parser.add_argument("--gene-id-column", default=None, help="AnnData var column with Ensembl ids")
    parser.add_argument("--cell-id-column", default=None, help="obs column with cell ids (default: obs_names)")
    parser.add_argument("--keep-obs", default="", help="comma-separated obs columns to keep (e.g. cell_type)")
    parser.add_argument("--non-ensembl", choices=("error", "count"), default="error",
                        help="gene ids that are not Ensembl ids: fail (default) or count and skip them")  # fmt: skip
    args = parser.parse_args(argv)

    def body() -> int:
        from bioscale.use.embed_cells import tokenize_cells  # the data layer's, through this package (lazy: --help)

        if not args.output.lower().endswith(".parquet"):
            raise ValueError(f"--output {args.output!r} must end in .parquet")
        result = tokenize_cells(
            args.input, vocabulary=args.vocab, convention=args.convention, gene_medians=args.gene_medians,
            model_input_size=args.model_input_size, layer=args.layer, gene_id_column=args.gene_id_column,
            cell_id_column=args.cell_id_column, obs_columns=[c for c in args.keep_obs.split(",") if c],
            non_ensembl=args.non_ensembl,
        )  # fmt: skip
        written = result.write(args.output)
        print(json.dumps({"written": [str(p) for p in written], "stats": result.stats.as_dict()}, indent=2))
        return 0

    return _run("tokenize-cells", body)
