"""Which attention kernels a compiled Geneformer / ViT training step runs (SDPA's own choice).

Run on the device 2026-12-06 (``benchmarks/results/2026-12-06-trainer-late-read-cudnn-attention.md``): builds the model
as the L1 recipe does (blocks compiled like the trainer, dynamic shapes as the trainer passes them for padded
batches), runs forward + backward under bf16 autocast on the recipe's shape, and prints the step time and the top
CUDA kernels (cuDNN's attention kernels are named ``cudnn_generated_fort_native_sdpa_*``, FA2's ``pytorch_flash::*``).

    python benchmarks/probe_attention_route.py --model geneformer   # or --model vit
"""

from __future__ import annotations

import argparse
import time

import torch

from bioscale.distributed.parallelize import apply_compile
from bioscale.models import build_config, build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["geneformer", "vit"], default="geneformer")
    parser.add_argument("--dynamic", choices=["none", "true"], default="none")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "geneformer":
        config = build_config("geneformer", "V2_104M", vocab_size=25428, attention_probs_dropout_prob=0.0)
        model = build_model(config, device="cuda")
        ids = torch.randint(5, 25428, (32, 2048), device="cuda")
        labels = torch.where(torch.rand_like(ids, dtype=torch.float) < 0.15, ids, -100)
        # As the trainer calls it (bioscale.train.step): the LM head only at the ~15% scored positions.
        batch = {"input_ids": ids, "labels": labels, "logits_on_labels_only": True}
    else:
        model = build_model(build_config("vit", "base"), device="cuda")
        batch = {"pixel_values": torch.randn(256, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last),
                 "labels": torch.randint(0, 2, (256,), device="cuda")}  # fmt: skip
    apply_compile(model, dynamic=None if args.dynamic == "none" else True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f"{args.model} dynamic={args.dynamic}: {ms:.1f} ms per step")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=70))


if __name__ == "__main__":
    main()
