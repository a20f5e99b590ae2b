"""Masked-LM training of a bioscale protein model (ESM-2 or AMPLIFY) with transformers' Trainer, under accelerate.

    accelerate launch --config_file examples/hf_trainer/accelerate/ddp.yaml examples/hf_trainer/train_mlm.py \
        --model esm2 --size debug --packed --max-steps 20 --output-dir /tmp/esm2-trainer

The accelerate config picks the parallelism (``ddp.yaml``, ``fsdp2.yaml``, ``fp8.yaml`` beside this file); this
script is the same for all three. What bioscale brings to the stock Trainer recipe: the model (``build_model``, or
``--from-pretrained`` a bioscale or stock ``EsmForMaskedLM`` directory), and the collator (``MLMDataCollator``: masks
each sequence, then pads it or packs the micro-batch into one row with ``cu_seq_lens``). Everything else is plain
``Trainer``: the model honours its loss, label and checkpointing contract (``bioscale.models.hf_contract``). The end
of the run writes the bioscale checkpoint (``save_model``) and the stock ``transformers`` one (``to_hf``) beside it.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, Trainer, TrainingArguments

from bioscale.data import get_tokenizer
from bioscale.data.demo import demo_corpus
from bioscale.data.hf_collators import MLMDataCollator
from bioscale.data.sources import read_fasta
from bioscale.models import build_config, build_model, from_hf, get_model_spec, is_bioscale_config, to_hf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["esm2", "amplify"], default="esm2")
    parser.add_argument("--size", default="debug", help="a size of the family's registry entry (debug: tiny, CPU)")
    parser.add_argument("--from-pretrained", help="start from this checkpoint directory instead of a fresh init")
    parser.add_argument("--fasta", type=Path, help="training sequences (default: bioscale's demo protein corpus)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence, specials included")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--packed", dest="packed", action="store_true", default=True, help="packed rows (default)")
    layout.add_argument("--padded", dest="packed", action="store_false", help="padded [B, S] batches")
    parser.add_argument("--pad-to-multiple-of", type=int, help="round S (padded) or T (packed) up: 16 for FP8")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per device and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf-trainer-mlm"))
    return parser.parse_args()


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.from_pretrained is None:
        return build_model(build_config(args.model, args.size), device="cpu")
    model = AutoModelForMaskedLM.from_pretrained(args.from_pretrained)
    return model if is_bioscale_config(model.config) else from_hf(model)  # a stock EsmForMaskedLM: convert exactly


def sequences(args: argparse.Namespace, tokenizer) -> tuple[list[dict], list[dict]]:
    """Tokenised training and held-out examples (5%, a seeded split). Plain lists of dicts: Trainer takes any
    sized, indexable dataset, so the recipe needs no `datasets` install."""
    path = args.fasta or demo_corpus("protein")
    records = [seq.upper().rstrip("*") for _, seq in read_fasta(path)]
    encoded = tokenizer(records, truncation=True, max_length=args.max_length)["input_ids"]
    examples = [{"input_ids": ids} for ids in encoded]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, len(examples) // 20)
    return [examples[i] for i in order[num_test:]], [examples[i] for i in order[:num_test]]


def convert_for_fp8(model: torch.nn.Module) -> bool:
    """Under ``fp8.yaml`` (accelerate's ``mixed_precision: fp8``): convert the model's block linears to torchao
    ``Float8Linear`` with bioscale's converter and let accelerate run bf16 autocast around them. Returns whether it did.

    Why not accelerate's own torchao path: it needs an ``AORecipeKwargs`` handler that Trainer has no way to pass, and
    accelerate versions that do not create one from the config file stop in ``prepare`` (the H200's, 2026-12-03:
    ``AttributeError: 'NoneType' object has no attribute 'config'``); where it runs it converts every linear that is
    not first or last, which for these models includes the LM head's dense layer. bioscale's converter
    (``bioscale.precision.apply_fp8``, as ``bioscale train fp8.enabled=true``) converts the transformer blocks only.
    """
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() != "fp8":
        return False
    from bioscale.precision import apply_fp8

    apply_fp8(model)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # the rest of the model (norms, attention, head) in bf16
    for key in [key for key in os.environ if key.startswith("ACCELERATE_FP8_")]:
        del os.environ[key]  # ACCELERATE_FP8_BACKEND=AO alone sends prepare() down the torchao path, even in bf16
    return True


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """transformers >= 5.2x names it ``activation_checkpointing``; earlier 5.x (e.g. 5.17) ``gradient_checkpointing``."""
    parameters = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in parameters else "gradient_checkpointing"
    return {name: enabled}


def main() -> None:
    args = parse_args()
    tokenizer = get_tokenizer(get_model_spec(args.model).tokenizer)
    model = load_model(args)
    fp8 = convert_for_fp8(model)
    train_examples, test_examples = sequences(args, tokenizer)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=min(10, args.max_steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),  # on a machine without CUDA, accelerate's processes train on CPU (gloo)
        **checkpointing_argument(args.activation_checkpointing),
        logging_steps=max(1, args.max_steps // 10),
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 2),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator reads input_ids itself
        dataloader_drop_last=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_examples,
        eval_dataset=test_examples,
        data_collator=MLMDataCollator(tokenizer, packed=args.packed, pad_to_multiple_of=args.pad_to_multiple_of,
                                      seed=training_args.seed),
    )
    trainer.train()
    metrics = trainer.evaluate()
    final = args.output_dir / "final_model"
    trainer.save_model(str(final))  # the bioscale checkpoint (gathered under FSDP2): AutoModelForMaskedLM loads it
    if trainer.is_world_process_zero():
        # The stock transformers checkpoint (EsmForMaskedLM) or the published format (AMPLIFY), from the saved one.
        to_hf(AutoModelForMaskedLM.from_pretrained(final)).save_pretrained(args.output_dir / "final_model_hf")
        print(f"eval_loss {metrics['eval_loss']:.4f} after {trainer.state.global_step} steps on "
              f"{training_args.world_size} processes{' (FP8 block linears)' if fp8 else ''}; "
              f"checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
