"""Does a short pretraining run learn biology? ESM-2 8M on the UniRef90 sample; perplexity and Q3/Q8 vs random init.

One script, the three pipeline stages called as Python functions (the same code as ``bioscale pipeline``)::

    python benchmarks/bench_eval.py                          # H100: curate, pretrain 8M for a fixed budget, evaluate
    python benchmarks/bench_eval.py --steps 3000 --lr 1e-3   # another budget
    python benchmarks/bench_eval.py --quick --device cpu     # a one-minute smoke test of the whole script

1. ``curate`` the UniRef90 sample (9,000 sequences) into train / validation by sequence hash (10% validation).
2. ``train_stage``: ESM-2 ``esm2_t6_8M`` from random init, masked LM, bf16, packed batches of ``--tokens`` tokens,
   AdamW with linear warmup and decay, for ``--steps`` steps (a fixed token budget: steps x tokens).
3. ``evaluate``: masked-LM perplexity on the whole validation split under fixed seeded masking, and the
   secondary-structure linear probe on all 2,000 Porter6 proteins (split by sequence), for the trained model, a
   randomly initialised model of the same shape, the residue identity alone and the majority class.

Writes ``benchmarks/results/<date>-<gpu>-eval.md`` (table, environment, exact command) with the training-curve PNG next
to it, and leaves the three artifacts under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("bioscale") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))
DEFAULT_DATA_DIR = Path(os.environ.get("BIOSCALE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def environment(device: torch.device) -> dict[str, str]:
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "host": platform.node(),
    }


def train_overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.quick:
        return [
            "model.size=debug", f"num_train_steps={args.steps}", "scheduler.warmup_steps=5", f"optimizer.lr={args.lr}",
            "data.max_seq_length=128", "data.micro_batch_size=16", f"device={device.type}", "dtype=fp32",
            "checkpoint.save_every_n_steps=0", "logging.log_every_n_steps=5",
        ]
    gpu = device.type == "cuda"
    return [
        "model.size=esm2_t6_8M",
        f"num_train_steps={args.steps}",
        f"optimizer.lr={args.lr}",
        f"scheduler.warmup_steps={args.warmup}",
        "scheduler.min_lr_ratio=0.1",
        "data.max_seq_length=1024",
        "use_sequence_packing=true",
        f"data.max_tokens_per_batch={args.tokens}",
        "data.pad_to_multiple_of=16",
        f"data.num_workers={2 if gpu else 0}",
        f"data.pin_memory={'true' if gpu else 'false'}",
        f"device={device.type}",
        f"dtype={'bf16' if gpu else 'fp32'}",
        f"compile={'true' if args.compile else 'false'}",
        "checkpoint.save_every_n_steps=0",
        "logging.log_every_n_steps=25",
    ]


def _row(name: str, lm: dict[str, Any] | None, ss: dict[str, Any] | None) -> str:
    ppl = f"{lm['perplexity']:.2f}" if lm else "–"
    acc = f"{100 * lm['accuracy']:.1f}%" if lm else "–"
    q3 = f"{100 * ss['q3']:.1f}%" if ss else "–"
    q8 = f"{100 * ss['q8']:.1f}%" if ss else "–"
    return f"| {name} | {ppl} | {acc} | {q3} | {q8} |"


def write_results(args: argparse.Namespace, env: dict[str, str], artifacts: dict, timings: dict[str, float]) -> Path:
    model_meta, eval_meta = artifacts["model"].metadata, artifacts["eval"].metadata
    lm = eval_meta.metrics["language_model"]
    ss = eval_meta.metrics["secondary_structure"] or {}
    train = model_meta.metrics
    data = artifacts["data"].metadata.metrics
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    stem = f"{env['date']}-{slug}-eval" + ("-quick" if args.quick else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_eval.py", *sys.argv[1:]])
    tokens_seen = model_meta.config["num_train_steps"] * (args.tokens if not args.quick else 0)
    lines = [
        f"# ESM-2 {'debug' if args.quick else '8M'} pretrained on the UniRef90 sample: what did it learn? "
        f"— {env['date']}",
        "",
        f"- device: {env['device']}; python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        f"- command: `{command}`",
        f"- data: `{args.data_dir / 'uniref90_sample.parquet'}` → {data['train_sequences']} train / "
        f"{data['validation_sequences']} validation sequences (split by sequence hash, seed {args.seed}; "
        f"{data['duplicates']} exact duplicates removed)",
        f"- training: {model_meta.config['model']['name']} `{model_meta.config['model']['size']}` "
        f"({train.get('num_parameters', 0) / 1e6:.1f}M parameters) from random init, "
        f"{model_meta.config['num_train_steps']} steps"
        + (f" of {args.tokens} packed tokens ({tokens_seen / 1e6:.0f}M tokens)" if not args.quick else "")
        + f", lr {args.lr}, {model_meta.config['dtype']}; "
        f"final training loss {train.get('final_loss', float('nan')):.3f}, "
        f"{(train.get('real_tokens_per_sec_per_gpu') or 0) / 1e3:.0f}k real tokens/s, "
        f"{train.get('wall_time_s', 0):.0f} s",
        f"- evaluation: masked-LM perplexity on {lm['trained']['num_sequences']} validation sequences "
        f"({lm['trained']['num_masked_tokens']} masked tokens, fixed seeded 15% masking, 80/10/10); "
        + (
            f"secondary-structure linear probe (L-BFGS logistic regression on frozen last-layer embeddings) trained "
            f"on {ss['num_train_proteins']} Porter6 proteins ({ss['num_train_residues']} residues), tested on "
            f"{ss['num_test_proteins']} ({ss['num_test_residues']} residues), split by sequence"
            if ss else "secondary-structure probe skipped (Porter6 parquet not found)"
        ),
        f"- wall time: curate {timings['curate']:.0f} s, train {timings['train']:.0f} s, "
        f"evaluate {timings['evaluate']:.0f} s",
        "",
        "| model | validation perplexity | masked-token accuracy | SS Q3 | SS Q8 |",
        "|---|---:|---:|---:|---:|",
        _row(f"ESM-2 {model_meta.config['model']['size']}, trained here", lm.get("trained"), ss.get("trained")),
        _row("same shape, random init", lm.get("random_init"), ss.get("random_init")),
        _row("residue identity only (one-hot)", None, ss.get("residue_identity")),
        _row("majority class", None, ss.get("majority")),
        "",
        "Perplexity of a uniform guess over the 20 canonical amino acids is 20; the random-init row shows what the "
        "architecture alone gives. The probe rows under the model rows are the floors: a Q3/Q8 gain over "
        "'random init' and 'residue identity' is structure the model learned from sequence alone.",
        "",
        f"Artifacts: `{artifacts['eval'].path}` (report.md / report.html), lineage "
        f"eval {eval_meta.id[:12]} ← model {model_meta.id[:12]} ← dataset {artifacts['data'].metadata.id[:12]}.",
    ]
    curves = artifacts["eval"].path / "training_curves.png"
    if curves.is_file():
        shutil.copyfile(curves, out_dir / f"{stem}-curves.png")
        lines += ["", f"![training curves]({stem}-curves.png)"]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"environment": env, "command": command, "timings_s": timings, "train": train,
         "evaluation": eval_meta.metrics, "dataset": data}, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="debug model, a few steps, small slices (smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with the UniRef90 and Porter6 files")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1000; --quick: 20)")
    parser.add_argument("--tokens", type=int, default=32768, help="packed tokens per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; --quick: 4e-3)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (adds ~1 min of compile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the artifacts go (default: outputs/bench_eval/<time>)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the result .md goes (default: benchmarks/results; --quick: the work dir)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 1000
    if args.lr is None:
        args.lr = 4e-3 if args.quick else 1e-3

    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from bioscale.eval.scoring_inputs import resolve_device
    from bioscale.pipeline import curate, evaluate, train_stage

    device = resolve_device(args.device)
    uniref = args.data_dir / "uniref90_sample.parquet"
    porter6 = args.data_dir / "porter6_secondary_structure_sample.parquet"
    if not uniref.is_file():
        raise SystemExit(f"bench_eval: {uniref} not found (set --data-dir or BIOSCALE_SHARED_DATA)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.work_dir or REPO_ROOT / "outputs" / "bench_eval" / f"{stamp}{'-quick' if args.quick else ''}"
    if args.out_dir is None:
        args.out_dir = work if args.quick else REPO_ROOT / "benchmarks" / "results"
    env = environment(device)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    dataset = curate(uniref, out=work / "data", scale="full", seed=args.seed, max_records=400 if args.quick else None)
    timings["curate"] = time.perf_counter() - start

    start = time.perf_counter()
    model = train_stage(dataset, out=work / "model", scale="full", seed=args.seed,
                        overrides=train_overrides(args, device))
    timings["train"] = time.perf_counter() - start

    start = time.perf_counter()
    evaluation = evaluate(
        model, out=work / "eval", scale="full", seed=args.seed, device=device.type,
        secondary_structure=porter6 if porter6.is_file() else None,
        max_sequences=16 if args.quick else None, ss_max_proteins=40 if args.quick else None,
        probe_max_iter=20 if args.quick else 500,
    )
    timings["evaluate"] = time.perf_counter() - start

    path = write_results(args, env, {"data": dataset, "model": model, "eval": evaluation}, timings)
    print(path.read_text())
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main()
