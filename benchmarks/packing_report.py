"""How full the packed micro-batches are, on CPU: bench_train.py's step plans and the real training loader.

Throughput counts real tokens, so every padded position and every half-empty micro-batch is lost GPU time. This
script needs no GPU and no model: it plans bench_train.py's steps (``--models``, same syntax) and iterates the
training loader of a recipe (``--config``, with ``data.<key>=<value>`` overrides, any rank / world size), and prints
for each

- ``pad %``: padded positions / computed positions (``bioscale.data.count_tokens``; the loader pads only to
  ``data.pad_to_multiple_of``, so its pad % stays small even when micro-batches are nearly empty), and
- ``fill %``: real tokens / (micro-batches * token budget): what a fixed-shape step (the benchmark, or the trainer
  with ``data.pad_to_multiple_of=<max_tokens_per_batch>``) computes for real.

::

    python benchmarks/packing_report.py --models llama3_1B,llama3_1B:packing=greedy
    python benchmarks/packing_report.py --config L1_llama3_1B
    python benchmarks/packing_report.py --config L1_llama3_1B data.crop=random --world-size 8 --rank 1
    python benchmarks/packing_report.py --config L1_llama3_1B data.crop=window data.packing_buffer_size=64
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bench_train() -> Any:
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def bench_plan_report(models: str, num_steps: int, data_dir: Path | None) -> list[str]:
    """One line per ``--models`` entry: pad % and sequences per micro-batch of its first ``num_steps`` steps."""
    bench = _bench_train()
    lines = []
    examples_cache: dict[tuple[str, int], list[Any]] = {}
    for text in bench.expand_models(models):
        case = bench.parse_model(text)
        key = (case.data, case.max_length)
        if key not in examples_cache:
            examples_cache[key] = bench.load_examples(
                case.data, case.max_length, data_dir or bench.DEFAULT_DATA_DIR, seed=0, limit=None
            )
        plans = bench.plan_steps(examples_cache[key], case, num_steps)
        packs = [pack for plan in plans for pack in plan.packs]
        real = sum(len(e) for pack in packs for e in pack)
        computed = case.tokens * len(packs)  # every packed micro-batch is padded to the budget
        lines.append(
            f"bench {case.label} (packing={case.packing}, {case.tokens} tokens): {len(packs)} micro-batches, "
            f"pad {100 * (1 - real / computed):.1f}%, sequences/micro-batch {sum(map(len, packs)) / len(packs):.1f}"
        )
    return lines


def loader_report(config: str, overrides: Sequence[str], *, rank: int, world_size: int, num_batches: int) -> str:
    """pad % and fill % of the first ``num_batches`` micro-batches the recipe's loader gives ``rank``."""
    from omegaconf import OmegaConf

    from bioscale.data import DataConfig, build_dataloader, count_tokens, get_tokenizer

    path = REPO_ROOT / "src" / "bioscale" / "configs" / f"{config}.yaml"
    recipe = OmegaConf.load(path)
    bad = [item for item in overrides if not item.startswith("data.") or "=" not in item]
    if bad:
        raise ValueError(f"overrides {bad}: expected data.<key>=<value>")
    recipe = OmegaConf.merge(recipe, OmegaConf.from_dotlist(list(overrides)))  # values parsed as YAML, as Hydra does
    data = OmegaConf.to_container(recipe.get("data", {}), resolve=False)
    data.setdefault("use_sequence_packing", False)  # the recipe's data section holds the switch
    data["pin_memory"] = False  # CPU only
    cfg = DataConfig.from_dict(data)
    tokenizer = get_tokenizer(cfg.tokenizer)  # as the trainer builds it
    loader = build_dataloader(cfg, tokenizer, rank=rank, world_size=world_size)
    budget = cfg.max_tokens_per_batch
    num_tokens = num_real = num_sequences = small = 0
    for batch in itertools.islice(loader, num_batches):
        counts = count_tokens(batch, pad_token_id=tokenizer.pad_token_id)
        num_tokens += counts["num_tokens"]
        num_real += counts["num_real_tokens"]
        num_sequences += counts["num_sequences"]
        small += counts["num_real_tokens"] < budget // 2
    where = " ".join(overrides) or "as shipped"
    return (
        f"loader {config} [{where}] rank {rank}/{world_size}, num_workers={cfg.num_workers}: {num_batches} batches, "
        f"pad {100 * (1 - num_real / num_tokens):.2f}%, fill {100 * num_real / (num_batches * budget):.1f}%, "
        f"real tokens/batch {num_real / num_batches:,.0f} of {budget:,}, sequences/batch "
        f"{num_sequences / num_batches:.1f}, batches under half full {small}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="data.<key>=<value> overrides of the recipe's data section")
    parser.add_argument("--models", default=None, help="bench_train.py --models entries whose step plans to report")
    parser.add_argument("--steps", type=int, default=15, help="bench steps to plan (bench_train's default 5 + 10)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--config", default=None, help="a recipe in src/bioscale/configs, e.g. L1_llama3_1B")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=80, help="loader micro-batches to count")
    args = parser.parse_args(argv)
    if not args.models and not args.config:
        parser.error("give --models and/or --config")
    if args.models:
        print("\n".join(bench_plan_report(args.models, args.steps, args.data_dir)), flush=True)
    if args.config:
        print(loader_report(args.config, args.overrides, rank=args.rank, world_size=args.world_size,
                            num_batches=args.batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
