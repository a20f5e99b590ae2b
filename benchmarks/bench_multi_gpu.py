"""Multi-GPU benchmarks: FSDP2 scaling 1 → 2 GPUs, and the longest Llama 3 1B DNA context with context parallelism.

One command runs everything on a 2-GPU machine and writes ``<out-dir>/<YYYY-MM-DD>-2x<gpu>-multigpu.md`` (and a
``.json`` of the rows)::

    python benchmarks/bench_multi_gpu.py                      # the full report on 2 GPUs (about 7 minutes)
    python benchmarks/bench_multi_gpu.py --phases context --context-ac full
    python benchmarks/bench_multi_gpu.py --smoke              # CPU, gloo, tiny models: checks the script in ~1 min

The driver (this file without ``--worker``) launches ``torchrun --standalone --nproc_per_node=N`` on itself for each
phase and number of GPUs, with a wall-clock limit, and collects the JSON lines rank 0 appends after every
measurement, so a phase that crashes or hangs still reports what it measured before.

- ``fsdp`` (ESM-2 650M and 3B, masked LM): FSDP2 as the trainer applies it (``bioscale.distributed.apply_fsdp``: each
  block then the root, bf16 compute with fp32 master weights and fp32 gradient reduction), on 1 GPU and on 2 GPUs, the
  same packed micro-batch size per GPU (random protein-like lengths 100–1,024, 15 % masked, masked-only LM head). The
  1-GPU run uses FSDP2 over one rank too, so the ratio isolates what the second GPU costs (communication, not a
  different code path). Scaling efficiency = (tokens/s per GPU on 2 GPUs) / (tokens/s on 1 GPU).
- ``context`` (Llama 3 1B shape, causal LM on one DNA sequence per step): on 1 GPU without CP, and on 2 GPUs with CP=2
  plus FSDP2 over both, the sequence length is doubled from ``--context-start`` until a step runs out of memory, then
  bisected (``--context-refine`` times) between the longest length that trained and the shortest that did not.
  Each length trains ``--context-steps`` timed steps after one warm-up step; tokens/s per GPU counts the sequence's
  tokens divided by the number of GPUs; MFU uses the model spec's FLOPs per token at that length (PaLM's convention,
  non-causal attention term) against the GPU's dense bf16 peak. After an out-of-memory step the model and optimizer
  are rebuilt, so the next length starts from a clean allocator and fresh FSDP2 state. Activation checkpointing is
  off by default (``--context-ac``): the limit is then activation memory, which CP divides by the number of GPUs.

No ``torch.compile`` unless ``--compile`` (compile time would dominate short runs; the comparison is like for like).
Synthetic tokens: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100

# key -> (family, size, packed tokens per GPU per micro-batch)
FSDP_MODELS: dict[str, tuple[str, str, int]] = {
    "esm2_650M": ("esm2", "esm2_t33_650M", 16384),
    "esm2_3B": ("esm2", "esm2_t36_3B", 8192),
    # 15B: ~240 GB of fp32 weights, gradients and AdamW state: sharded over 4+ GPUs (one GPU runs out of memory, and the
    # scaling is then taken against the smallest GPU count that trained).
    "esm2_15B": ("esm2", "esm2_t48_15B", 4096),
}
SMOKE_FSDP_MODELS: dict[str, tuple[str, str, int]] = {"esm2_debug": ("esm2", "debug", 1024)}


# ---- worker: one torchrun rank --------------------------------------------------------------------------------------


def _log(record: dict[str, Any], result_file: str, rank: int) -> None:
    """Rank 0 appends one JSON line per measurement (flushed, so a later crash loses nothing already measured)."""
    if rank == 0:
        with open(result_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _build(
    family: str,
    size: str,
    task: str,
    *,
    device: torch.device,
    ac: str,
    cp_group: Any,
    compile_blocks: bool,
    prefetch: int = 0,
    strategy: str = "fsdp2",
    fp8: bool = False,
    **overrides: Any,
) -> tuple[torch.nn.Module, Any, Any]:
    """Model on meta → (CP) → (FP8) → AC → (compile) → FSDP2 over every rank → materialise; plus fused AdamW.

    ``fp8``: torchao tensorwise FP8 on the blocks' linears with FP8 all-gathers under FSDP2, as the trainer applies
    ``fp8_config.enabled=true`` (emulated on CPU, for the smoke run). ``strategy="mfsdp"``: materialise first, then
    Megatron-FSDP over every rank (bf16 compute, fp32 main weights and gradients), as the trainer does it
    (``bioscale.distributed.megatron_fsdp``).
    """
    from bioscale.distributed import apply_ac, apply_compile, apply_fsdp
    from bioscale.distributed.context_parallel import apply_context_parallel
    from bioscale.models import build_config, build_model

    config = build_config(family, size, **overrides)
    model = build_model(config, task=task, device="meta")
    if cp_group is not None:
        apply_context_parallel(model, cp_group)
    if fp8:
        if strategy != "fsdp2":
            raise ValueError(
                f"FP8 runs with fsdp2 only (Megatron-FSDP quantises TransformerEngine weights); got {strategy}"
            )
        from bioscale.precision.fp8 import apply_fp8

        apply_fp8(model, recipe="tensorwise", fsdp_float8_all_gather=True, emulate=device.type != "cuda")
    apply_ac(model, ac)
    if compile_blocks:
        apply_compile(model)
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    if strategy == "fsdp2":
        # prefetch > 0: issue the all-gathers of the next `prefetch` blocks (forward) / previous ones (backward)
        # early, beyond FSDP2's implicit one-block lookahead; helps when the CPU cannot run far enough ahead.
        apply_fsdp(model, param_dtype=bf16, reduce_dtype=torch.float32, prefetch=prefetch)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    model.train()
    if strategy == "mfsdp":
        from bioscale.distributed.megatron_fsdp import apply_megatron_fsdp, shard_optimizer

        model = apply_megatron_fsdp(model, device=device, compute_dtype=bf16, reduce_dtype=torch.float32)
        optimizer = shard_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
        return model, optimizer, config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, optimizer, config


def _protein_batch(num_tokens: int, rng: np.random.Generator, config: Any) -> tuple[dict[str, Any], float]:
    """A packed MLM micro-batch of exactly ``num_tokens`` tokens; also returns sum(L^2) for the MFU's mean length."""
    lengths: list[int] = []
    while sum(lengths) < num_tokens:
        lengths.append(int(min(rng.integers(100, 1025), num_tokens - sum(lengths))))
    ids = rng.integers(4, 24, size=num_tokens)  # amino-acid ids of the ESM alphabet
    ids[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 0  # <cls>
    masked = rng.random(num_tokens) < 0.15
    labels = np.where(masked, ids, IGNORE_INDEX)
    ids = np.where(masked, config.mask_token_id, ids)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.arange(num_tokens) - np.repeat(cu[:-1], lengths)
    batch = {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "labels": torch.from_numpy(labels)[None],
        "cu_seq_lens_q": torch.from_numpy(cu),
        "cu_seq_lens_k": torch.from_numpy(cu.copy()),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    return batch, float(np.sum(np.square(lengths, dtype=np.float64)))


def _dna_batch(length: int, rng: np.random.Generator) -> dict[str, Any]:
    """One DNA sequence of ``length`` tokens, packed (``[1, L]``), with causal-LM labels (unshifted)."""
    ids = rng.choice(np.array([5, 6, 7, 8]), size=length)  # A, C, G, T in bioscale's nucleotide tokenizer
    ids[0] = 0  # <bos>
    labels = ids.copy()
    labels[0] = IGNORE_INDEX
    cu = torch.tensor([0, length], dtype=torch.int32)
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.arange(length)[None],
        "labels": torch.from_numpy(labels)[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": length,
        "max_length_k": length,
    }


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train_step(
    model: torch.nn.Module,
    optimizer: Any,
    batch: dict[str, Any],
    *,
    device: torch.device,
    world_size: int,
    cp: Any = None,
    after_step: Any = None,
) -> float:
    """One optimizer step on ``batch`` as the trainer does it (loss summed, normalised by the global label count)."""
    import torch.distributed as dist

    from bioscale.distributed.context_parallel import context_parallel, shard_batch_for_cp

    extra: dict[str, Any] = {"loss_reduction": "sum"}
    context: Any = contextlib.nullcontext()
    if cp is not None:
        _, cp_rank, cp_size = cp
        shard = shard_batch_for_cp(batch, cp_rank, cp_size, shift_labels=True)
        batch, context = shard.batch, context_parallel(model, shard.layout)
    if not _is_causal(model):
        extra["logits_on_labels_only"] = True
    batch = _to(batch, device)
    labels = batch.get("shift_labels", batch.get("labels"))
    num_labels = (labels != IGNORE_INDEX).sum().float()
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(num_labels)
    with context:
        loss_sum = model(**batch, **extra).loss
    (loss_sum * world_size / num_labels.clamp(min=1)).backward()
    from bioscale.distributed.megatron_fsdp import clip_grad_norm, is_megatron_fsdp

    if is_megatron_fsdp(model):
        clip_grad_norm(model, 1.0)  # its empty shards have no .grad: torch's clip would desynchronise the ranks
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if after_step is not None:
        after_step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_sum.detach().float()
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(loss)
    return (loss / num_labels.clamp(min=1)).item()


def _is_causal(model: torch.nn.Module) -> bool:
    return "Llama" in type(model).__name__


def run_fsdp_phase(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> None:
    """ESM-2 throughput with FSDP2 over ``world_size`` GPUs, the same micro-batch size per GPU."""
    from bioscale.models import get_model_spec
    from bioscale.train.metrics import compute_mfu, effective_seq_len, gpu_peak_flops

    peak = gpu_peak_flops(device)
    models = SMOKE_FSDP_MODELS if args.smoke else FSDP_MODELS
    keys = args.fsdp_models.split(",") if args.fsdp_models else list(models)
    strategies = ["fsdp2"] if args.smoke else args.fsdp_strategies.split(",")
    precisions = args.fsdp_precisions.split(",")
    for key, strategy, precision in [(k, s, p) for k in keys for s in strategies for p in precisions]:
        family, size, tokens = models[key]
        tokens = args.fsdp_tokens or tokens
        record: dict[str, Any] = {
            "phase": "fsdp",
            "model": key,
            "strategy": strategy,
            "precision": precision,
            "gpus": world_size,
            "tokens_per_gpu": tokens,
            "ac": args.fsdp_ac,
            "prefetch": args.fsdp_prefetch,
        }
        model = optimizer = None
        try:
            _free(device)
            model, optimizer, config = _build(
                family,
                size,
                "masked_lm",
                device=device,
                ac=args.fsdp_ac,
                cp_group=None,
                compile_blocks=args.compile,
                prefetch=args.fsdp_prefetch,
                strategy=strategy,
                fp8=precision == "fp8",
            )
            after_step = None
            if precision == "fp8":
                from bioscale.precision.fp8 import fp8_layer_names, precompute_fp8_scales

                after_step = functools.partial(precompute_fp8_scales, model)
                record["fp8_linears"] = len(fp8_layer_names(model))
            rng = np.random.default_rng(1000 + rank)
            times, losses, sq_sum = [], [], 0.0
            for step in range(args.warmup + args.steps):
                batch, step_sq = _protein_batch(tokens, rng, config)
                _synchronize(device)
                start = time.perf_counter()
                losses.append(
                    _train_step(model, optimizer, batch, device=device, world_size=world_size, after_step=after_step)
                )
                _synchronize(device)
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
                    sq_sum += step_sq
            step_time = float(np.median(times))
            tokens_per_sec = tokens / step_time
            seq_len = effective_seq_len(sq_sum, tokens * len(times))
            flops = get_model_spec(family).flops_per_token(config, seq_len)
            record.update(
                ok=True,
                step_time=step_time,
                tokens_per_sec_per_gpu=tokens_per_sec,
                mfu=compute_mfu(flops, tokens_per_sec, peak),
                peak_mem_gb=_peak_gb(device),
                effective_seq_len=seq_len,
                final_loss=losses[-1],
                num_params=sum(p.numel() for p in model.parameters()),
            )
        except Exception as err:  # noqa: BLE001 — one model's failure must not hide the other's numbers
            record.update(ok=False, oom=_is_oom(err), error=f"{type(err).__name__}: {str(err)[:300]}")
            if not _is_oom(err):
                traceback.print_exc()
        finally:
            del model, optimizer
            _free(device)
        _log(record, args.result_file, rank)


def run_context_phase(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> None:
    """Longest Llama 3 DNA sequence that trains: CP over all ``world_size`` ranks (none on one rank)."""
    import torch.distributed as dist

    from bioscale.distributed.cp_mesh import build_parallel_mesh
    from bioscale.models import get_model_spec
    from bioscale.train.metrics import compute_mfu, gpu_peak_flops

    size = "debug" if args.smoke else args.context_size
    peak = gpu_peak_flops(device)
    mesh = build_parallel_mesh(device.type, cp_size=world_size)
    cp = (mesh.cp_group, mesh.cp_rank, mesh.cp) if world_size > 1 else None
    deadline = time.monotonic() + args.phase_budget
    # Lengths are multiples of 2 * cp (no CP padding) and of 128 (kernel tiles).
    quantum = 128 * 2 * world_size
    lengths = _doubling(args.context_start, args.context_max)
    fitted: int | None = None
    failed: int | None = None
    refinements = 0
    model = optimizer = config = None
    last_step_time = 0.0
    while lengths:
        length = lengths.pop(0)
        # Attention work grows ~quadratically with length: skip a trial that cannot finish before the deadline.
        predicted = last_step_time * (length / max(fitted or length, 1)) ** 2 * (args.context_steps + 1)
        if fitted is not None and time.monotonic() + predicted > deadline:
            _log(
                {
                    "phase": "context",
                    "gpus": world_size,
                    "cp": world_size,
                    "length": length,
                    "ok": False,
                    "skipped": "time budget",
                },
                args.result_file,
                rank,
            )
            break
        record: dict[str, Any] = {
            "phase": "context",
            "gpus": world_size,
            "cp": world_size,
            "length": length,
            "ac": args.context_ac,
            "model": f"llama3/{size}",
        }
        oom = False
        try:
            if model is None:
                _free(device)
                model, optimizer, config = _build(
                    "llama3",
                    size,
                    "causal_lm",
                    device=device,
                    ac=args.context_ac,
                    cp_group=mesh.cp_group if cp else None,
                    compile_blocks=args.compile,
                    vocab_size=20,
                )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if args.smoke_oom_above and length / world_size > args.smoke_oom_above:
                raise torch.OutOfMemoryError(f"simulated: more than {args.smoke_oom_above} tokens per rank")
            rng = np.random.default_rng(7)  # the same sequence on every rank of the CP group
            times = []
            for step in range(1 + args.context_steps):
                batch = _dna_batch(length, rng)
                _synchronize(device)
                start = time.perf_counter()
                loss = _train_step(model, optimizer, batch, device=device, world_size=world_size, cp=cp)
                _synchronize(device)
                if step >= 1:
                    times.append(time.perf_counter() - start)
            step_time = float(np.median(times))
            tokens_per_sec = length / step_time / world_size
            flops = get_model_spec("llama3").flops_per_token(config, length)
            record.update(
                ok=True,
                step_time=step_time,
                tokens_per_sec_per_gpu=tokens_per_sec,
                mfu=compute_mfu(flops, tokens_per_sec, peak),
                peak_mem_gb=_peak_gb(device),
                loss=loss,
            )
            last_step_time = step_time
        except Exception as err:  # noqa: BLE001 — recorded; out-of-memory ends the search, anything else is printed
            oom = _is_oom(err)
            record.update(ok=False, oom=oom, error=f"{type(err).__name__}: {str(err)[:300]}")
            if not oom:
                traceback.print_exc()
        # Every rank must agree before the next trial (a rank that failed alone would leave the others in a collective).
        status = torch.tensor([0.0 if record["ok"] else 1.0], device=device)
        if world_size > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        ok = status.item() == 0.0
        if not ok:
            record["ok"] = False
            # FSDP2 state after an exception mid-step is not trustworthy: rebuild for the next length.
            model = optimizer = None
            _free(device)
        _log(record, args.result_file, rank)
        if ok:
            fitted = max(fitted or 0, length)
        else:
            failed = length if failed is None else min(failed, length)
            if not (oom or "out of memory" in record.get("error", "").lower()):
                break  # not a memory limit: stop rather than misreport
            lengths = []
        # Bisect between the longest length that trained and the shortest that did not.
        if not lengths and refinements < args.context_refine and fitted is not None and failed is not None:
            refinements += 1
            middle = (fitted + failed) // 2 // quantum * quantum
            if fitted < middle < failed:
                lengths = [middle]
    _log(
        {
            "phase": "context",
            "gpus": world_size,
            "cp": world_size,
            "summary": True,
            "max_length": fitted,
            "first_failed": failed,
        },
        args.result_file,
        rank,
    )


def _doubling(start: int, maximum: int) -> list[int]:
    out = []
    length = start
    while length <= maximum:
        out.append(length)
        length *= 2
    return out


def worker_main(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from bioscale.distributed import destroy_distributed, init_distributed

    device_name = "cpu" if args.smoke else "cuda"
    info = init_distributed(device_name, timeout=timedelta(seconds=args.collective_timeout))
    torch.manual_seed(0)
    try:
        if args.worker == "fsdp":
            run_fsdp_phase(args, info.device, info.rank, info.world_size)
        else:
            run_context_phase(args, info.device, info.rank, info.world_size)
    finally:
        destroy_distributed()


# ---- driver ---------------------------------------------------------------------------------------------------------


def environment(smoke: bool) -> dict[str, Any]:
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else f"CPU ({platform.machine()})"
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": gpu,
        "num_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def _launch(phase: str, nproc: int, args: argparse.Namespace, result_file: Path, budget: float) -> dict[str, Any]:
    """Run one phase under torchrun; returns how it ended (the measurements are in ``result_file``)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--worker",
        phase,
        "--result-file",
        str(result_file),
        "--phase-budget",
        str(budget),
        *args.passthrough,
    ]
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment the allocator
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    print(f"[bench_multi_gpu] {phase} on {nproc} rank(s): {shlex.join(command)}", flush=True)
    start = time.monotonic()
    try:
        # Grace beyond the phase's own budget for start-up, the last trial and the collective timeout.
        proc = subprocess.run(command, env=env, timeout=budget + args.collective_timeout + 90, check=False)
        status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = "killed at the time limit"
    return {"phase": phase, "nproc": nproc, "status": status, "wall_s": time.monotonic() - start}


def _read(result_file: Path) -> list[dict[str, Any]]:
    if not result_file.exists():
        return []
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def render_report(
    rows: list[dict[str, Any]], runs: list[dict[str, Any]], env: dict[str, Any], command: str, args: argparse.Namespace
) -> str:
    md = [
        f"# Multi-GPU: FSDP2 scaling and context parallelism, {env['num_gpus']}× {env['gpu']}, {env['date']}",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, Python {env['python']}.",
        "",
        "```bash",
        command,
        "```",
        "",
        (
            "Method: see the docstring of `benchmarks/bench_multi_gpu.py` (FSDP2 as `bioscale.distributed.apply_fsdp` "
            "applies it: bf16 compute, fp32 master weights and gradient reduction; synthetic tokens; median of the "
            f"timed steps; {'torch.compile per block' if args.compile else 'no torch.compile'}; explicit FSDP2 "
            f"prefetch depth {args.fsdp_prefetch})."
        ),
    ]
    fsdp = [r for r in rows if r.get("phase") == "fsdp"]
    if fsdp:
        counts = sorted({r["gpus"] for r in fsdp})
        md += [
            "",
            f"## FSDP2 (and Megatron-FSDP) scaling over {' / '.join(map(str, counts))} GPUs (ESM-2, masked LM, packed)",
            "",
            (
                "| model | strategy | precision | GPUs | tokens / GPU / step | AC | tokens/s per GPU | scaling efficiency "
                "| MFU | peak mem (GB) |"
            ),
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for group in dict.fromkeys(map(_fsdp_group, fsdp)):
            model, strategy, precision = group
            mine = sorted((r for r in fsdp if _fsdp_group(r) == group), key=lambda r: r["gpus"])
            # Efficiency against the fewest GPUs that trained (1 unless the model does not fit one GPU).
            base = next((r for r in mine if r.get("ok")), None)
            for r in mine:
                if base is None or not r.get("ok"):
                    eff = "–"
                elif r is base:
                    eff = f"base ({base['gpus']} GPU{'s' if base['gpus'] > 1 else ''})"
                else:
                    eff = _pct(r["tokens_per_sec_per_gpu"] / base["tokens_per_sec_per_gpu"])
                md.append(
                    f"| {model} | {strategy} | {precision} | {r['gpus']} | {r.get('tokens_per_gpu')} | {r.get('ac')} "
                    f"| {_fmt(r.get('tokens_per_sec_per_gpu'), ',.0f', _why(r))} | {eff} | {_pct(r.get('mfu'))} "
                    f"| {_fmt(r.get('peak_mem_gb'), '.1f')} |"
                )
        md += [
            "",
            "Target: scaling efficiency ≥ 95 % (tokens/s per GPU at N GPUs over that at the fewest GPUs that trained). "
            "`fsdp2`: `bioscale.distributed.apply_fsdp`; `mfsdp`: Megatron-FSDP (`bioscale.distributed.megatron_fsdp`, "
            "ZeRO-3, bf16 compute, fp32 main weights and gradients); `fp8`: torchao tensorwise FP8 linears in the blocks "
            "with FP8 all-gathers (`bioscale.precision.apply_fp8`); all on the same synthetic batches.",
        ]
    context = [r for r in rows if r.get("phase") == "context" and not r.get("summary")]
    summaries = {r["gpus"]: r for r in rows if r.get("phase") == "context" and r.get("summary")}
    if context:
        md += [
            "",
            "## Longest Llama 3 1B DNA context: 1 GPU vs context parallelism over all GPUs (CP = GPUs)",
            "",
            "| GPUs | CP | AC | sequence length | trains? | step time (s) | tokens/s per GPU | MFU | peak mem (GB) |",
            "|---:|---:|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in context:
            verdict = (
                "yes"
                if r.get("ok")
                else ("skipped (time)" if r.get("skipped") else ("OOM" if r.get("oom") else "error"))
            )
            md.append(
                f"| {r['gpus']} | {r['cp']} | {r.get('ac', '')} | {r['length']:,} | {verdict} "
                f"| {_fmt(r.get('step_time'), '.2f')} | {_fmt(r.get('tokens_per_sec_per_gpu'), ',.0f')} "
                f"| {_pct(r.get('mfu'))} | {_fmt(r.get('peak_mem_gb'), '.1f')} |"
            )
        one = summaries.get(1, {}).get("max_length")
        longest = []
        for gpus in sorted(summaries):
            length = summaries[gpus].get("max_length")
            ratio = f" ({length / one:.2f}× 1 GPU)" if gpus > 1 and one and length else ""
            longest.append(
                f"{gpus} GPU{'s' if gpus > 1 else ''}{f' with CP={gpus}' if gpus > 1 else ''} "
                f"{_fmt(length, ',d')}{ratio}"
            )
        md += [
            "",
            (
                f"Longest trained: {'; '.join(longest)} tokens (target with CP=2: ≥ 1.8×). Lengths are doubled until a "
                "step runs out of memory, then bisected, so the true maxima lie between the longest length that trained "
                "and the shortest that did not."
            ),
        ]
        errors = [r for r in context if not r.get("ok") and not r.get("oom") and not r.get("skipped")]
        for r in errors:
            md.append(f"\nError at {r['gpus']} GPU(s), length {r['length']}: `{r.get('error')}`")
    md += ["", "## Runs", "", "| phase | ranks | ended | wall (s) |", "|---|---:|---|---:|"]
    md += [f"| {r['phase']} | {r['nproc']} | {r['status']} | {r['wall_s']:.0f} |" for r in runs]
    return "\n".join(md) + "\n"


def _fsdp_group(record: dict[str, Any]) -> tuple[str, str, str]:
    # Rows written before strategies / precisions were recorded are FSDP2 in bf16.
    return record["model"], record.get("strategy", "fsdp2"), record.get("precision", "bf16")


def _why(record: dict[str, Any]) -> str:
    if not record:
        return "not run"
    return "OOM" if record.get("oom") else ("error" if not record.get("ok") else "–")


def driver_main(args: argparse.Namespace) -> Path:
    env = environment(args.smoke)
    most = max(int(n) for n in args.nprocs.split(","))
    if not args.smoke and env["num_gpus"] < max(most, 2):
        raise SystemExit(
            f"bench_multi_gpu --nprocs {args.nprocs} needs {max(most, 2)} GPUs (found {env['num_gpus']}); "
            "use --smoke for a CPU check"
        )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "", env["gpu"].replace("NVIDIA", "")) if not args.smoke else "cpu"
    stem = f"{env['date']}-{most}x{gpu_slug}-multigpu" + ("-smoke" if args.smoke else "")
    result_file = out_dir / f".{stem}.jsonl"
    result_file.unlink(missing_ok=True)
    runs = []
    start = time.monotonic()
    for phase in args.phases.split(","):
        for nproc in (int(n) for n in args.nprocs.split(",")):
            budget = args.fsdp_budget if phase == "fsdp" else args.context_budget
            runs.append(_launch(phase, nproc, args, result_file, budget))
    # Rows of an earlier (partial) run, e.g. the 1-GPU half measured in another call, in the same report.
    merged = [json.loads(line) for path in args.merge for line in Path(path).read_text().splitlines() if line.strip()]
    rows = merged + _read(result_file)
    command = shlex.join(["python", "benchmarks/bench_multi_gpu.py", *args.argv])
    report = render_report(rows, runs, env, command, args)
    path = out_dir / f"{stem}.md"
    path.write_text(report)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"environment": env, "command": command, "runs": runs, "rows": rows}, indent=1) + "\n"
    )
    result_file.unlink(missing_ok=True)
    print(report)
    print(f"[bench_multi_gpu] wrote {path} in {time.monotonic() - start:.0f} s", flush=True)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phases", default="fsdp,context", help="comma-separated: fsdp, context")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated numbers of GPUs to run each phase on")
    parser.add_argument(
        "--merge", action="append", default=[], help="JSON-lines rows of an earlier run to include in the report"
    )
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU + gloo + tiny models, to check the script")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--fsdp-models", default=None, help=f"comma-separated subset of {list(FSDP_MODELS)}")
    parser.add_argument(
        "--fsdp-tokens", type=int, default=None, help="packed tokens per GPU per step (default per model)"
    )
    parser.add_argument("--fsdp-ac", default="none", choices=("none", "selective", "full"))
    parser.add_argument(
        "--fsdp-prefetch",
        type=int,
        default=1,
        help="explicit FSDP2 prefetch depth in blocks, default 1 as the trainer (0: FSDP2's implicit prefetch only)",
    )
    parser.add_argument(
        "--fsdp-strategies",
        default="fsdp2",
        help="comma-separated: fsdp2, mfsdp (Megatron-FSDP, needs the megatron-fsdp package)",
    )
    parser.add_argument(
        "--fsdp-precisions",
        default="bf16",
        help="comma-separated: bf16, fp8 (torchao tensorwise, FP8 all-gathers; emulated in --smoke)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--context-size", default="1B", help="llama3 size for the context phase")
    parser.add_argument("--context-ac", default="none", choices=("none", "selective", "full"))
    parser.add_argument("--context-start", type=int, default=16384)
    parser.add_argument("--context-max", type=int, default=1 << 20)
    parser.add_argument("--context-steps", type=int, default=2, help="timed steps per length (after 1 warm-up)")
    parser.add_argument(
        "--context-refine",
        type=int,
        default=2,
        help="bisection steps after the doubling search (2: the maximum to within 1.25x)",
    )
    parser.add_argument("--fsdp-budget", type=float, default=60.0, help="seconds per fsdp run (guide, not a cut)")
    parser.add_argument(
        "--context-budget",
        type=float,
        default=120.0,
        help="seconds per context search: no new length starts that would end after it",
    )
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=120.0,
        help="NCCL timeout: a rank stuck in a collective aborts after it",
    )
    # Internal: set by the driver for the torchrun workers.
    parser.add_argument("--worker", choices=("fsdp", "context"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase-budget", type=float, default=600.0, help=argparse.SUPPRESS)
    # Smoke tests of the search: lengths above this many tokens per rank raise a simulated out-of-memory error.
    parser.add_argument("--smoke-oom-above", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.smoke:
        args.context_start = min(args.context_start, 256)
        args.context_max = min(args.context_max, 2048)
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    # What the workers need from the driver's command line (everything but the driver-only options).
    args.passthrough = [a for a in _strip(argv, ("--phases", "--out-dir", "--nprocs", "--merge"))]
    return args


def _strip(argv: list[str], options: tuple[str, ...]) -> Iterator[str]:
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(option + "=") for option in options):
            continue
        yield arg


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    else:
        driver_main(parsed)
