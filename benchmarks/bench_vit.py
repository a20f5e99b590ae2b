"""ViT training (or inference) throughput: timm's ``VisionTransformer`` vs bioscale's ViT, same weights, same images.

For each batch size, each variant runs ``--warmup`` untimed then ``--steps`` timed steps of forward + backward + AdamW
(``--mode train``; ``--mode infer``: forward only, no grad) on random pixels and labels, and reports images/s, ms per
step, MFU and peak memory, plus the largest logit difference from bioscale eager on one batch (both sides hold
exactly the same weights: the timm model is ``bioscale.models.vit.to_timm`` of the bioscale one). Variants:

- ``timm`` / ``timm_compiled``: ``timm.models.vision_transformer.VisionTransformer`` eager / ``torch.compile`` of the
  whole model (what timm's ``train.py --torchcompile`` does), channels-last model and inputs (timm's
  ``--channels-last``) unless ``--no-channels-last``;
- ``bioscale`` / ``bioscale_compiled``: ``VitForImageClassification`` eager / with each block compiled
  (``bioscale.distributed.parallelize.apply_compile``, what ``bioscale train compile.enabled=true`` does), fed the
  same channels-last pixels.

``--dtype bf16`` runs under bf16 autocast (fp32 weights, as ``bioscale train`` on one GPU). MFU counts
``bioscale.models.vit.flops_per_image`` (training FLOPs; a third of it for ``--mode infer``) against the GPU's dense
bf16 peak (``bioscale.train.metrics.GPU_PEAK_BF16_FLOPS``; none on CPU). Peak memory is CUDA's allocator peak per
row on GPU, the process's peak RSS on CPU (monotonic over the run). Writes ``<out-dir>/<date>-<device>-vit-<size>.md``
and ``.json``::

    python benchmarks/bench_vit.py --size base --batch-sizes 64,128,256 --dtype bf16          # on a GPU
    python benchmarks/bench_vit.py --device cpu --size debug --batch-sizes 8 --steps 3        # smoke run

A variant that cannot run (timm not installed, compile unavailable) is a row with its reason, never a silent gap.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bioscale.distributed.parallelize import apply_compile
from bioscale.models import build_config, build_model
from bioscale.models.vit import flops_per_image, to_timm
from bioscale.train.metrics import compute_mfu, gpu_peak_flops, peak_memory_gb

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("timm", "timm_compiled", "bioscale", "bioscale_compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", default="base", help="bioscale ViT size: debug, small, base, large (default base)")
    parser.add_argument("--batch-sizes", default="64,128,256", help="comma-separated images per step")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compiles happen here)")
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW pixels and weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.argv_echo = list(sys.argv[1:] if argv is None else argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


def _timm_available() -> str | None:
    """Why timm cannot run here (``None`` when it can)."""
    try:
        import timm.models.vision_transformer  # noqa: F401
    except Exception as err:  # noqa: BLE001  (ImportError, or torchvision's RuntimeError against a CPU torch)
        return f"timm unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return None


def build_variant(name: str, bioscale_model: torch.nn.Module, *, channels_last: bool) -> torch.nn.Module:
    """The module a variant runs: a copy of the bioscale model, or timm's with the same weights."""
    if name.startswith("timm"):
        model = to_timm(bioscale_model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if name.endswith("_compiled") else model
    model = build_model(bioscale_model.config, device="meta")
    model.to_empty(device=next(bioscale_model.parameters()).device)
    model.load_state_dict(bioscale_model.state_dict())
    if name.endswith("_compiled"):
        apply_compile(model, dynamic=False)
    return model


def _logits(model: torch.nn.Module, name: str, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixels) if name.startswith("timm") else model(pixel_values=pixels).logits


def run_row(
    name: str, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, *, mode: str, steps: int,
    warmup: int, autocast_dtype: torch.dtype | None, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Time ``steps`` steps after ``warmup``; images/s, ms per step, peak memory."""
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None
    model.train(mode == "train")

    def step() -> None:
        if optimizer is None:
            with torch.no_grad(), autocast:
                _logits(model, name, pixels)
            return
        with autocast:
            loss = torch.nn.functional.cross_entropy(_logits(model, name, pixels).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    return {"images_per_sec": pixels.shape[0] * steps / elapsed, "step_ms": 1e3 * elapsed / steps,
            "peak_mem_gb": peak_memory_gb(device)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    channels_last = not args.no_channels_last
    torch.manual_seed(args.seed)
    config = build_config("vit", args.size, num_labels=args.num_labels)
    reference = build_model(config, device=device).eval()
    flops = flops_per_image(config) / (1.0 if args.mode == "train" else 3.0)
    peak = gpu_peak_flops(device)
    timm_missing = _timm_available() if any(v.startswith("timm") for v in args.variants) else None
    rows: list[dict[str, Any]] = []
    for batch_size in args.batch_sizes:
        generator = torch.Generator(device="cpu").manual_seed(args.seed + batch_size)
        pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator).to(device)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, args.num_labels, (batch_size,), generator=generator).to(device)
        with torch.no_grad():
            baseline = reference(pixel_values=pixels).logits.float()
        for name in args.variants:
            row: dict[str, Any] = {"variant": name, "batch_size": batch_size, "status": "ok"}
            model = None
            if name.startswith("timm") and timm_missing is not None:
                rows.append({**row, "status": timm_missing})
                continue
            try:
                model = build_variant(name, reference, channels_last=channels_last)
                with torch.no_grad():
                    logits = _logits(model.eval(), name, pixels).float()
                    row["max_abs_logit_diff"] = float((logits - baseline).abs().max())
                row.update(run_row(name, model, pixels, labels, mode=args.mode, steps=args.steps, warmup=args.warmup,
                                   autocast_dtype=autocast_dtype, device=device))  # fmt: skip
                row["mfu"] = compute_mfu(flops, row["images_per_sec"], peak)
            except Exception as err:  # noqa: BLE001  (a variant that cannot run is reported, not fatal)
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return _write(args, rows, device=device, dtype=dtype, config=config, flops=flops, channels_last=channels_last)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], *, device: torch.device, dtype: str, config: Any,
           flops: float, channels_last: bool) -> int:  # fmt: skip
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    slug = "cpu" if device.type == "cpu" else device_name.split()[-1].lower()
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{date}-{slug}-vit-{args.size}.md"
    header = (f"# ViT-{args.size} {args.mode}: timm vs bioscale ({date}, {device_name})\n\n"
              f"`python benchmarks/bench_vit.py {' '.join(args.argv_echo)}`\n\n"
              f"{config.image_size}x{config.image_size} images, patch {config.patch_size}, {config.num_hidden_layers} "
              f"blocks x {config.hidden_size}, {config.num_register_tokens} registers, qk_norm={config.qk_norm}, "
              f"pool={config.global_pool}; {dtype}, channels-last={channels_last}, {args.steps} timed steps after "
              f"{args.warmup}; {flops / 1e9:.3f} GFLOP per image ({args.mode}); "
              f"torch {torch.__version__}.\n\n")  # fmt: skip
    table = ["| variant | batch | images/s | ms / step | MFU | peak mem GB | max abs logit diff | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        table.append(
            f"| {row['variant']} | {row['batch_size']} | {_fmt(row.get('images_per_sec'), '.1f')} | "
            f"{_fmt(row.get('step_ms'), '.2f')} | {_fmt(row.get('mfu'), '.3f')} | "
            f"{_fmt(row.get('peak_mem_gb'), '.2f')} | {_fmt(row.get('max_abs_logit_diff'), '.2e')} | {row['status']} |"
        )
    path.write_text(header + "\n".join(table) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"device": device_name, "dtype": dtype, "size": args.size,
                                                      "mode": args.mode, "flops_per_image": flops, "rows": rows},
                                                     indent=2) + "\n")  # fmt: skip
    print(path)
    return 0 if all(row["status"] == "ok" or row["status"].startswith("timm unavailable") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
