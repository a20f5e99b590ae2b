"""Zero-shot variant-scoring throughput: :func:`bioscale.use.variants.score_variants` against one forward per variant.

    python benchmarks/bench_variants.py --model codonfm --size 1B --records 64 --positions 16   # one H200
    python benchmarks/bench_variants.py --model codonfm --size debug --records 4 --positions 4 --device cpu

Both paths score the same substitutions with the same model (randomly initialised: the speed does not depend on
the weights) on the offline demo CDS corpus (the genes ``pyrodigal`` predicts on the genome its wheel ships), each
CDS cropped to the model's context. At each of ``--positions`` random codons per gene three alternative codons are
scored: ``score_variants`` masks each distinct position once, packs the masked copies under a token budget and runs
the head at the masked positions only; the baseline is what a user writes without it: for each substitution, mask
the position, run the model on that one sequence, read the two log-probabilities. The scores must agree (printed as
the largest difference); the rows are substitutions per second. Results go to ``--out`` as JSON when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bioscale.data import demo_corpus, get_tokenizer, read_fasta
from bioscale.models import build_config, build_model
from bioscale.use.variants import Substitution, score_variants

CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]


def _substitutions(sequence: str, positions: int, rng: np.random.Generator) -> list[Substitution]:
    num_codons = len(sequence) // 3
    chosen = rng.choice(np.arange(2, num_codons), size=min(positions, num_codons - 2), replace=False)
    result = []
    for position in sorted(int(p) for p in chosen):
        ref = sequence[3 * (position - 1) : 3 * position]
        alts = [c for c in CODONS if c != ref and c not in ("TAA", "TAG", "TGA")]
        for alt in rng.choice(alts, size=3, replace=False):
            result.append(Substitution(position, ref, str(alt)))
    return result


@torch.inference_mode()
def one_forward_per_variant(model, tokenizer, items) -> list[float]:
    """The loop a user writes without ``score_variants``: one masked sequence per substitution, batch size 1."""
    device = next(model.parameters()).device
    scores = []
    for _, sequence, substitutions in items:
        ids = tokenizer(sequence, add_special_tokens=True)["input_ids"]
        for substitution in substitutions:
            masked = list(ids)
            index = substitution.position  # <CLS> first: codon p (1-based) sits at token p
            masked[index] = tokenizer.mask_token_id
            input_ids = torch.tensor([masked], device=device)
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, index]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            ref_id = tokenizer.convert_tokens_to_ids(substitution.ref)
            alt_id = tokenizer.convert_tokens_to_ids(substitution.alt)
            scores.append(float(log_probs[alt_id] - log_probs[ref_id]))
    return scores


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="codonfm")
    parser.add_argument("--size", default="1B")
    parser.add_argument("--records", type=int, default=64, help="genes of the demo CDS corpus")
    parser.add_argument("--positions", type=int, default=16, help="random codon positions per gene (3 alts each)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per CDS (crop)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = build_config(args.model, args.size)
    model = build_model(config, "masked_lm", device="meta")
    model.to_empty(device=device)
    model.init_weights()
    model.to(dtype).eval()
    tokenizer = get_tokenizer("codon")

    rng = np.random.default_rng(args.seed)
    items = []
    max_codons = args.max_length - 2
    for record_id, sequence in read_fasta(demo_corpus("cds")):
        sequence = sequence.upper()[: 3 * max_codons]
        if len(sequence) // 3 < 8:
            continue
        items.append((record_id, sequence, _substitutions(sequence, args.positions, rng)))
        if len(items) == args.records:
            break
    num_variants = sum(len(s) for _, _, s in items)
    num_tokens = sum(len(s) // 3 + 2 for _, s, _ in items)

    score_variants(model, tokenizer, items[:2], max_tokens_per_batch=args.max_tokens_per_batch)  # warm-up
    one_forward_per_variant(model, tokenizer, [(items[0][0], items[0][1], items[0][2][:2])])
    batched, batched_s = _timed(
        lambda: score_variants(model, tokenizer, items, max_tokens_per_batch=args.max_tokens_per_batch)
    )
    looped, looped_s = _timed(lambda: one_forward_per_variant(model, tokenizer, items))
    max_diff = max(abs(a.score - b) for a, b in zip(batched, looped, strict=True))

    result = {
        "model": f"{args.model}/{args.size}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "records": len(items),
        "substitutions": num_variants,
        "positions": sum(len({s.position for s in subs}) for _, _, subs in items),
        "sequence_tokens": num_tokens,
        "score_variants_per_s": num_variants / batched_s,
        "one_forward_per_variant_per_s": num_variants / looped_s,
        "speedup": looped_s / batched_s,
        "max_score_difference": max_diff,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"| model | substitutions | score_variants subst/s | one forward per variant subst/s | speed-up | max |Δscore| |\n"
        f"|---|---:|---:|---:|---:|---:|\n"
        f"| {result['model']} | {num_variants:,} | {result['score_variants_per_s']:,.0f} | "
        f"{result['one_forward_per_variant_per_s']:,.1f} | {result['speedup']:.1f}x | {max_diff:.2e} |"
    )
    print(json.dumps(result), file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
