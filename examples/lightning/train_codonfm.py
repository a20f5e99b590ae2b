"""Masked-LM training of CodonFM (EnCodon) with PyTorch Lightning on bioscale's packed, resumable data.

    python examples/lightning/train_codonfm.py --accelerator cpu --devices 2 --max-steps 20 --output-dir /tmp/codonfm-pl

Two CPU processes (DDP) on the offline demo corpus (the genes pyrodigal predicts on the genome its wheel ships); on
GPUs, ``--accelerator gpu --devices 8 --strategy fsdp --precision bf16-mixed --size 600M``. The pieces are bioscale's
(``bioscale.integrations.lightning``): ``BioscaleLightningModule`` (the model, a loss normalised by the label tokens on
every rank, AdamW + warmup-cosine, ``save_pretrained`` at the end of ``fit``), ``BioscaleDataModule`` (bioscale's
loader for each rank: masking, packing, exact resume) and ``fsdp_strategy`` (one FSDP unit per block). Lightning
checkpoints land in ``OUTPUT/checkpoints``; ``--resume OUTPUT/checkpoints/last.ckpt`` continues a run where it stopped
(model, optimizer, schedule and every rank's data stream). The trained model is ``OUTPUT/final_model``, a directory
``AutoModelForMaskedLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from bioscale.integrations.lightning import BioscaleDataModule, BioscaleLightningModule, fsdp_strategy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="debug", help="a CodonFM size: debug, 80M, 600M, 1B, 5B")
    parser.add_argument("--source", default="demo:cds", help="coding sequences: FASTA, parquet or demo:cds")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on GPUs")
    parser.add_argument("--max-steps", type=int, default=20, help="length of the run (and of its LR schedule)")
    parser.add_argument("--stop-at-step", type=int, help="stop early at this step (as a preempted job would)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of a packed micro-batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="model initialisation (the data streams have their own)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints")
    parser.add_argument("--resume", help="a Lightning checkpoint to continue from (OUTPUT/checkpoints/last.ckpt)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/codonfm-lightning"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    L.seed_everything(args.seed)  # the same initial weights in every process and every run
    data = {"source": args.source, "tokenizer": "codon", "objective": "mlm", "max_seq_length": 256,
            "use_sequence_packing": True, "max_tokens_per_batch": args.max_tokens}  # fmt: skip
    datamodule = BioscaleDataModule(train=data, val={**data, "seed": 1})
    module = BioscaleLightningModule(
        "codonfm", args.size, learning_rate=args.lr, warmup_steps=max(1, args.max_steps // 10),
        max_steps=args.max_steps, save_pretrained_dir=str(args.output_dir / "final_model"),
        # Packed batches run the flash varlen kernel on GPUs, which has no attention dropout (the model refuses a
        # non-zero rate there); hidden dropout stays 0.1, as in the L1 recipes.
        config_overrides={"attention_probs_dropout_prob": 0.0},
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        strategy=fsdp_strategy(module.model) if args.strategy == "fsdp" else args.strategy,
        precision=args.precision,
        max_steps=args.stop_at_step or args.max_steps,
        # bioscale's loaders iterate forever: validation runs every half of the run, on a few batches.
        val_check_interval=max(1, args.max_steps // 2),
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, args.max_steps // 10),
        callbacks=[ModelCheckpoint(dirpath=args.output_dir / "checkpoints", every_n_train_steps=args.checkpoint_every,
                                   save_last=True, save_top_k=-1)],  # fmt: skip
        default_root_dir=args.output_dir,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.resume)
    if trainer.is_global_zero:
        print(f"trained {trainer.global_step} steps on {trainer.world_size} processes; model in "
              f"{args.output_dir / 'final_model'}")  # fmt: skip


if __name__ == "__main__":
    main()
