"""Inference benchmark: embedding throughput (ESM-2 650M) and DNA generation throughput (Llama 3 1B).

    python benchmarks/bench_use.py                       # on a GPU: the full measurement (~5 minutes on an H200)
    python benchmarks/bench_use.py --quick --device cpu  # smoke test of the same code path (debug-size models)

1. Embedding, ESM-2 650M (random init; throughput does not depend on the weights) in bf16 over
   ``../shared/data/uniref90_sample.parquet`` (9,000 proteins, 12–8,001 residues), three ``bioscale.use.embed``
   configurations — the previous one (packed batches of 32k tokens through the varlen kernel, inline collation), the
   default one (budget from free GPU memory, background collation into pinned buffers, no per-batch host syncs) and
   the default with compiled blocks (``compile=True``, compile time excluded: warmed up first) — against
   ``transformers`` ``EsmModel`` (sdpa) with padded batches of ``--hf-batch-size`` sequences, in file order and sorted
   by length. Same weights (``to_hf``), same work: sequences truncated to 1,022 residues (+ ``<cls>``/``<eos>``), mean
   pooling over residues, embeddings copied to the host; tokenisation included in every timing. Reports sequences/s,
   real tokens/s and the largest difference between each implementation's embeddings and the first row's.
2. Generation, Llama 3 1B (random init, 20-token nucleotide vocabulary) in bf16, greedy, exactly ``--new-tokens``
   bases per sample, at batch 1 and 32, prompts cut from ``evo2_dna_prompts.csv`` (256–512 bases, different
   lengths): ``bioscale.use.generate_dna`` with the static engine (KV cache preallocated, decode step compiled and
   replayed as a CUDA graph: the default; the uncompiled step as a CUDA graph; the step run eagerly), with the
   previous path (``engine="transformers"``: the model's own ``generate()``, left padding) and stock ``transformers``
   ``LlamaForCausalLM.generate`` on the same weights, in the same run. Each is warmed up with the identical call
   first (compile and graph capture excluded from the rate; the first call's seconds are reported). Reports new
   tokens/s and how many samples equal ``transformers``' greedy output token for token (bf16: near-ties may break
   differently).

3. ``--profile-decode``: what one decode step launches, per batch size — the step the engine captures (compiled on
   CUDA), run without the graph under ``torch.profiler``; a prefill-only call is subtracted, so the row is the decode
   step's own kernels, device time and costliest kernels (on CPU: operators and their self time).

4. ``--decode-variants [NAME ...]``: the engine's compiled, graphed decode step under each ``torch.compile`` setting
   of ``DECODE_VARIANTS`` (Inductor defaults, coordinate-descent tuning, max-autotune): tokens/s, the first call's
   compile time, and whether the greedy tokens equal the first variant's.

Prints a markdown table and writes ``<out-dir>/<date>-<device>-use.md`` with the command, versions and hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("BIOSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for short in ("h200", "h100", "a100", "l40s", "l4", "b200", "gb200", "a10"):
        if short in name:
            return short
    return name.replace(" ", "_")


def _read_uniref(data_dir: Path, num_sequences: int | None) -> tuple[list[str], list[str]]:
    from bioscale.use.inputs import read_sequences

    path = data_dir / "uniref90_sample.parquet"
    if not path.is_file():
        raise SystemExit(f"bench_use: {path} not found (pass --data DIR)")
    ids, seqs = read_sequences(path)
    if num_sequences is not None:
        ids, seqs = ids[:num_sequences], seqs[:num_sequences]
    return ids, seqs


def _hf_padded_embed(
    hf_model: torch.nn.Module,
    tokenizer,
    seqs: list[str],
    *,
    batch_size: int,
    max_length: int,
    sort: bool,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """Mean-pooled residue embeddings with padded batches (the usual ``transformers`` loop); returns (pooled, tokens)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) if sort else list(range(len(seqs)))
    pooled = np.zeros((len(seqs), hf_model.config.hidden_size), dtype=np.float32)
    real_tokens = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([seqs[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt", return_special_tokens_mask=True)  # fmt: skip
            input_ids = enc["input_ids"].to(device, non_blocking=True)
            mask = enc["attention_mask"].to(device, non_blocking=True)
            residues = (mask.bool() & ~enc["special_tokens_mask"].to(device).bool()).unsqueeze(-1)
            hidden = hf_model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            means = (hidden * residues).sum(1) / residues.sum(1).clamp(min=1)
            pooled[idx] = means.cpu().numpy()
            real_tokens += int(enc["attention_mask"].sum())
    return pooled, real_tokens


def bench_embedding(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    from bioscale.data.tokenizers import protein_tokenizer
    from bioscale.models import build_config, build_model, to_hf
    from bioscale.use import embed
    from bioscale.use.embed import auto_max_tokens, resolve_batching

    size = "debug" if args.quick else "esm2_t33_650M"
    ids, seqs = _read_uniref(args.data, args.num_sequences)
    torch.manual_seed(0)
    config = build_config("esm2", size, attn_backend="sdpa")
    model = build_model(config, task="base", device=device).to(dtype).eval()
    tokenizer = protein_tokenizer()
    hf_model = to_hf(model).eval()
    try:
        hf_model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError):  # transformers 4.x: sdpa is already the default where supported
        pass
    max_length = args.max_length
    common = {"tokenizer": tokenizer, "long_sequences": "truncate", "max_length": max_length, "device": device,
              "dtype": dtype, "progress": False}  # fmt: skip
    batching = resolve_batching("auto", device, dtype)
    kernel = f"{batching}{', varlen' if batching == 'packed' else ''}"
    auto_budget = args.max_tokens or auto_max_tokens(model, device, dtype)
    variants = [
        (f"bioscale embed ({kernel}, 32k-token batches, inline collation: the previous default)",
         {"max_tokens_per_batch": 32768 if device.type == "cuda" else 2048, "prefetch": False, "compile": False}),
        (f"bioscale embed ({kernel}, {auto_budget:,}-token batches, prefetch thread)",
         {"max_tokens_per_batch": auto_budget, "prefetch": None, "compile": False}),
    ]  # fmt: skip
    if not args.skip_compile and device.type == "cuda":
        variants.append((f"bioscale embed ({kernel}, {auto_budget:,}-token batches, prefetch thread, compiled blocks)",
                         {"max_tokens_per_batch": auto_budget, "prefetch": None, "compile": True}))  # fmt: skip

    import warnings

    rows = []
    warnings.filterwarnings("ignore", message=".*truncated.*")
    first = None
    for label, options in variants:
        # Warm-up: kernel selection, allocator growth, lazy CUDA init, and (compiled) the compile itself, on a slice
        # big enough for a few batch shapes.
        embed(model, list(zip(ids[:512], seqs[:512])), **common, **options)
        gc.collect()
        _sync(device)
        start = time.perf_counter()
        ours = embed(model, list(zip(ids, seqs)), **common, **options)
        _sync(device)
        elapsed = time.perf_counter() - start
        first = ours.pooled if first is None else first
        tokens = int(ours.lengths.sum()) + 2 * len(ids)
        rows.append({"what": label, "seconds": elapsed, "seqs_per_s": len(ids) / elapsed,
                     "tokens_per_s": tokens / elapsed, "max_abs_diff": float(np.abs(ours.pooled - first).max())})  # fmt: skip
    _hf_padded_embed(hf_model, tokenizer, seqs[:64], batch_size=args.hf_batch_size, max_length=max_length, sort=False,
                     device=device)  # fmt: skip
    for sort in (False, True):
        gc.collect()
        _sync(device)
        start = time.perf_counter()
        pooled, hf_tokens = _hf_padded_embed(hf_model, tokenizer, seqs, batch_size=args.hf_batch_size,
                                             max_length=max_length, sort=sort, device=device)  # fmt: skip
        _sync(device)
        elapsed = time.perf_counter() - start
        assert hf_tokens == tokens, (hf_tokens, tokens)
        label = f"transformers EsmModel padded, batch {args.hf_batch_size}, " + (
            "length-sorted" if sort else "file order"
        )
        rows.append({"what": label, "seconds": elapsed, "seqs_per_s": len(ids) / elapsed, "tokens_per_s": hf_tokens / elapsed,
                         "max_abs_diff": float(np.abs(pooled - first).max())})  # fmt: skip
    del model, hf_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for row in rows:
        row.update(model=f"ESM-2 {size}", sequences=len(ids), tokens=tokens)
    return rows


def _dna_prompts(data_dir: Path, batch_size: int, quick: bool) -> list[str]:
    import pyarrow.csv as pa_csv

    path = data_dir / "evo2_dna_prompts.csv"
    if path.is_file():
        sources = [s.upper() for s in pa_csv.read_csv(path).column("Sequence").to_pylist()]
    else:
        rng = np.random.default_rng(0)
        sources = ["".join(rng.choice(list("ACGT"), 8192)) for _ in range(4)]
    lo, hi = (16, 32) if quick else (256, 512)
    lengths = np.linspace(hi, lo, batch_size).astype(int) if batch_size > 1 else [hi]
    return [sources[i % len(sources)][i * 97 : i * 97 + n] for i, n in enumerate(lengths)]


def _dna_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The generation rows' model (Llama 3 1B, or debug with --quick; random init, seed 0), its nucleotide tokenizer
    and the size's name."""
    from bioscale.data.tokenizers import nucleotide_tokenizer
    from bioscale.models import build_config, build_model

    size = "debug" if args.quick else "1B"
    tokenizer = nucleotide_tokenizer()
    torch.manual_seed(0)
    config = build_config("llama3", size, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = build_model(config, task="causal_lm", device=device).to(dtype).eval()
    return model, tokenizer, size


def bench_generation(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    from bioscale.models import to_hf
    from bioscale.use import generate_dna

    model, tokenizer, size = _dna_model(args, device, dtype)
    hf_model = to_hf(model).eval()
    new_tokens = 8 if args.quick else args.new_tokens
    graphs = device.type == "cuda"
    implementations = [
        (f"bioscale generate_dna, static engine{', compiled step, CUDA graphs' if graphs else ''}", model,
         {"engine": "static", "cuda_graphs": graphs or None, "compile_step": graphs or None}),
        ("bioscale generate_dna, static engine, uncompiled step, CUDA graphs", model,
         {"engine": "static", "cuda_graphs": True, "compile_step": False}),
        ("bioscale generate_dna, static engine, eager step", model,
         {"engine": "static", "cuda_graphs": False, "compile_step": False}),
        ("bioscale Llama3ForCausalLM.generate (engine=transformers: the previous path)", model,
         {"engine": "transformers"}),
        ("transformers LlamaForCausalLM.generate", hf_model, {}),
    ]  # fmt: skip
    if not graphs:  # CPU: the eager step is the static engine's only step
        implementations = [implementations[0], *implementations[3:]]
    rows = []
    for batch_size in args.gen_batch_sizes:
        prompts = _dna_prompts(args.data, batch_size, args.quick)
        kwargs = {"max_new_tokens": new_tokens, "tokenizer": tokenizer, "stop_at_eos": False, "device": device,
                  "dtype": dtype, "max_batch_size": max(64, batch_size)}  # fmt: skip
        results = []
        for name, impl, options in implementations:
            extra = {k: v for k, v in options.items() if v is not None}
            if impl is hf_model:
                kw = {k: v for k, v in kwargs.items() if k != "max_batch_size"}
            else:
                kw = kwargs
            # Warm-up with the identical call (the static engine captures its graph for this shape here); the
            # transformers loops get a short one (their first call only pays CUDA and cuBLAS initialisation).
            warm = kw if extra.get("engine") == "static" else {**kw, "max_new_tokens": 4}
            warm_start = time.perf_counter()
            generate_dna(impl, prompts, **warm, **extra)
            warm_s = time.perf_counter() - warm_start
            result = generate_dna(impl, prompts, **kw, **extra)
            assert result.num_new_tokens == batch_size * new_tokens
            results.append((name, result, warm_s))
        reference = [s.generated for s in results[-1][1].samples]
        for name, result, warm_s in results:
            agree = sum(s.generated == r for s, r in zip(result.samples, reference))
            rows.append({"what": name, "model": f"Llama 3 {size}", "batch": batch_size, "new_tokens": new_tokens,
                         "prompt_tokens": f"{min(map(len, prompts))}–{max(map(len, prompts))}",
                         "seconds": result.elapsed_s, "tokens_per_s": result.tokens_per_s, "first_call_s": warm_s,
                         "agree": f"{agree}/{len(reference)}"})  # fmt: skip
    del model, hf_model
    return rows


# Decode-step settings that --decode-variants compares: GenerationEngine keyword arguments (compile_options: the
# torch.compile arguments, {} = Inductor's defaults; decode_attention: "dense" masked matmuls over the whole cache or
# "flex", FlexAttention over each slot's own blocks), plus "blas": the cuBLAS flavour preferred while the step is
# compiled and captured (torch.backends.cuda.preferred_blas_library; the graph keeps the kernels it captured).
DECODE_VARIANTS = {
    "default": {"compile_options": {}, "decode_attention": "dense"},
    "coordinate descent": {"compile_options": {"options": {"coordinate_descent_tuning": True}},
                           "decode_attention": "dense"},
    "max-autotune-no-cudagraphs": {"compile_options": {"mode": "max-autotune-no-cudagraphs"},
                                   "decode_attention": "dense"},
    "max-autotune + coordinate descent": {
        "compile_options": {"options": {"max_autotune": True, "coordinate_descent_tuning": True}},
        "decode_attention": "dense"},
    "cublaslt": {"compile_options": {}, "decode_attention": "dense", "blas": "cublaslt"},
    "flex": {"compile_options": {}, "decode_attention": "flex"},
    "flex + cublaslt": {"compile_options": {}, "decode_attention": "flex", "blas": "cublaslt"},
    "flex + max-autotune": {"compile_options": {"mode": "max-autotune-no-cudagraphs"}, "decode_attention": "flex"},
    # FlashAttention-2 varlen over each (slot, KV head)'s keys up to its position: one kernel instead of two GEMVs
    # and a softmax over the whole cache (~32% of the batch-32 step's device time, 2026-12-03).
    "varlen": {"compile_options": {}, "decode_attention": "varlen"},
    "varlen + max-autotune": {"compile_options": {"mode": "max-autotune-no-cudagraphs"}, "decode_attention": "varlen"},
    "varlen + combo kernels": {"compile_options": {"options": {"combo_kernels": True}}, "decode_attention": "varlen"},
    # Inductor's horizontal fusion of independent kernels (e.g. a layer's K and V cache writes): fewer launches
    # per step, each of which costs ~1 us of graph gap (223 kernels per step at batch 32, 2026-12-03).
    "combo kernels": {"compile_options": {"options": {"combo_kernels": True}}, "decode_attention": "dense"},
    # Every linear as a float32 multiply-and-sum that Inductor fuses with its neighbours (RMSNorm scaling, SwiGLU,
    # residual adds) instead of a cuBLAS GEMV between elementwise kernels (decode_linear="reduction").
    "reduction linears": {"compile_options": {}, "decode_attention": "dense", "decode_linear": "reduction"},
    "reduction linears + coordinate descent": {
        "compile_options": {"options": {"coordinate_descent_tuning": True}}, "decode_attention": "dense",
        "decode_linear": "reduction"},
    "reduction linears + max-autotune": {"compile_options": {"mode": "max-autotune-no-cudagraphs"},
                                         "decode_attention": "dense", "decode_linear": "reduction"},
    "reduction linears + varlen": {"compile_options": {}, "decode_attention": "varlen", "decode_linear": "reduction"},
    "engine defaults": {},  # what GenerationEngine(compile_step=True) picks for the session (decode_compile_options,
    # decode_attention_mode)
}  # fmt: skip


def _engine_settings(variant: str) -> dict[str, object]:
    """The variant's GenerationEngine keyword arguments; a variant that names its attention but not its linears runs
    them as GEMMs (so it keeps meaning the same thing when the engine's rule changes)."""
    settings = dict(DECODE_VARIANTS[variant])
    if "decode_attention" in settings:
        settings.setdefault("decode_linear", "gemm")
    return settings


@contextlib.contextmanager
def _preferred_blas(name: str | None, device: torch.device):
    if name is None or device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def bench_decode_variants(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    """The engine's compiled, graphed step under each of :data:`DECODE_VARIANTS`: new tokens/s of the second call,
    the first call's time (compile + capture), and whether the greedy tokens equal the first variant's."""
    from bioscale.use.generation_engine import GenerationEngine

    model, tokenizer, size = _dna_model(args, device, dtype)
    new_tokens = 8 if args.quick else args.new_tokens
    names = args.decode_variants or list(DECODE_VARIANTS)
    rows = []
    for batch_size in args.gen_batch_sizes:
        prompts = _dna_prompts(args.data, batch_size, args.quick)
        ids = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        keys = [(0, i) for i in range(len(ids))]
        reference = None
        for name in names:
            settings = _engine_settings(name)
            blas = settings.pop("blas", None)
            engine = GenerationEngine(model, max_batch_size=max(64, batch_size), cuda_graphs=device.type == "cuda",
                                      compile_step=True, **settings)  # fmt: skip
            times = []
            for _ in range(3):  # the first: compile and capture; then the best of two
                with _preferred_blas(blas, device):
                    _sync(device)
                    start = time.perf_counter()
                    outputs = engine.generate(ids, max_new_tokens=new_tokens, keys=keys, eos_token_id=None)
                    _sync(device)
                times.append(time.perf_counter() - start)
            tokens = [o.token_ids for o in outputs]
            reference = reference if reference is not None else tokens
            seconds = min(times[1:])
            rows.append({"variant": name, "model": f"Llama 3 {size}", "batch": batch_size, "new_tokens": new_tokens,
                         "seconds": seconds, "tokens_per_s": batch_size * new_tokens / seconds,
                         "first_call_s": times[0],
                         "agree": f"{sum(t == r for t, r in zip(tokens, reference))}/{len(tokens)}"})  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
            del engine
    del model
    return rows


def _kernel_totals(prof, device: torch.device) -> dict[str, tuple[int, float]]:
    """name -> (calls, microseconds) of the trace's device kernels (CPU: its operators' self time)."""
    totals = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        totals[event.key] = (event.count, micros)
    return totals


def profile_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    """What one decode step launches: the step the engine captures as a CUDA graph (compiled on CUDA, the fast path),
    run without the graph under ``torch.profiler``. A call of ``1 + steps`` new tokens minus a prefill-only call of
    the same prompts leaves exactly ``steps`` decode steps; per step: kernels, device time, the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    from bioscale.use.generation_engine import GenerationEngine

    model, tokenizer, size = _dna_model(args, device, dtype)
    steps = 4 if args.quick else 32
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    rows = []
    for batch_size in args.gen_batch_sizes:
        prompts = _dna_prompts(args.data, batch_size, args.quick)
        ids = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        keys = [(0, i) for i in range(len(ids))]
        for variant in args.profile_variants:
            settings = _engine_settings(variant)
            blas = settings.pop("blas", None)
            engine = GenerationEngine(model, max_batch_size=max(64, batch_size), cuda_graphs=False,
                                      compile_step=device.type == "cuda", poll_every=10**6, **settings)  # fmt: skip
            totals = []
            for new_tokens in (1, 1 + steps):
                with _preferred_blas(blas, device):
                    engine.generate(ids, max_new_tokens=new_tokens, keys=keys, eos_token_id=None)  # warm-up (compile)
                    _sync(device)
                    with profile(activities=[activity]) as prof:
                        engine.generate(ids, max_new_tokens=new_tokens, keys=keys, eos_token_id=None)
                        _sync(device)
                totals.append(_kernel_totals(prof, device))
            prefill, full = totals
            per_step = {}
            for name, (count, micros) in full.items():
                extra = count - prefill.get(name, (0, 0.0))[0]
                if extra > 0:  # the decode steps' calls, at this kernel's mean time per call (a difference of two
                    # timed runs would carry their noise, and can go negative on a busy CPU)
                    per_step[name] = (extra / steps, extra * micros / count / steps)
            top = sorted(per_step.items(), key=lambda item: -item[1][1])[:6]
            rows.append({
                "batch": batch_size, "model": f"Llama 3 {size}", "variant": variant,
                "kernels_per_step": sum(c for c, _ in per_step.values()),
                "device_ms_per_step": sum(t for _, t in per_step.values()) / 1e3,
                "top": "; ".join(f"{name[:60]} ×{c:.0f} {t:.0f} µs" for name, (c, t) in top),
            })  # fmt: skip
            del engine
    del model
    return rows


def _table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            "| " + " | ".join(format(row[key], fmt) if fmt else str(row[key]) for key, _, fmt in columns) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="debug-size models and a small slice (smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--num-sequences", type=int, default=None, help="UniRef90 sequences (default: all 9,000)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence incl. <cls>/<eos>")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="bioscale token budget per batch of the default rows (default: from free GPU memory)")
    parser.add_argument("--skip-compile", action="store_true", help="no compiled-blocks embedding row")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--decode-variants", nargs="*", default=None, choices=list(DECODE_VARIANTS),
                        help="compare torch.compile settings of the decode step (all when given without names)")
    parser.add_argument("--profile-decode", action="store_true",
                        help="also profile one decode step per batch size: kernels, device time, the costliest")
    parser.add_argument("--profile-variants", nargs="+", default=["engine defaults"], choices=list(DECODE_VARIANTS),
                        help="the decode-step settings --profile-decode profiles")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        args.num_sequences = args.num_sequences or 24
        args.gen_batch_sizes = [min(b, 4) for b in args.gen_batch_sizes]
        args.max_length = min(args.max_length, 128)
        args.max_tokens = min(args.max_tokens or 2048, 2048)
        args.hf_batch_size = min(args.hf_batch_size, 8)

    import transformers

    sections = []
    if not args.skip_embed:
        rows = bench_embedding(args, device, dtype)
        sections.append("## Embedding (mean pooling, sequences truncated to "
                        f"{args.max_length - 2} residues)\n\n" + _table(rows, [
            ("what", "implementation", ""), ("model", "model", ""), ("sequences", "sequences", ""),
            ("tokens", "tokens", ""), ("seconds", "s", ".2f"), ("seqs_per_s", "sequences/s", ",.0f"),
            ("tokens_per_s", "tokens/s", ",.0f"), ("max_abs_diff", "max |Δ| vs first row", ".2e")]))  # fmt: skip
    if not args.skip_generate:
        rows = bench_generation(args, device, dtype)
        sections.append("## DNA generation (greedy, KV cache)\n\n" + _table(rows, [
            ("what", "implementation", ""), ("model", "model", ""), ("batch", "batch", ""),
            ("prompt_tokens", "prompt bases", ""), ("new_tokens", "new tokens / sample", ""),
            ("seconds", "s", ".2f"), ("tokens_per_s", "new tokens/s", ",.0f"),
            ("first_call_s", "first call s (compile, capture)", ".1f"),
            ("agree", "samples = transformers greedy", "")]))  # fmt: skip

    if args.decode_variants is not None:
        rows = bench_decode_variants(args, device, dtype)
        sections.append("## Decode step compile settings (engine, compiled step, CUDA graph on CUDA)\n\n" + _table(rows, [
            ("variant", "torch.compile of the step", ""), ("model", "model", ""), ("batch", "batch", ""),
            ("new_tokens", "new tokens / sample", ""), ("seconds", "s", ".3f"), ("tokens_per_s", "new tokens/s", ",.0f"),
            ("first_call_s", "first call s", ".1f"), ("agree", "tokens = first variant", "")]))  # fmt: skip

    if args.profile_decode:
        rows = profile_decode(args, device, dtype)
        what = "kernels" if device.type == "cuda" else "operators (CPU: self time)"
        sections.append(f"## One decode step's {what} (the captured step, compiled on CUDA, profiled unrolled)\n\n"
                        + _table(rows, [("model", "model", ""), ("variant", "decode step", ""), ("batch", "batch", ""),
                                        ("kernels_per_step", "per step", ".0f"),
                                        ("device_ms_per_step", "ms per step", ".3f"),
                                        ("top", "costliest (calls and µs per step)", "")]))  # fmt: skip

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    command = "python benchmarks/bench_use.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"# bench_use: inference throughput ({'quick smoke test' if args.quick else 'full'})\n\n"
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}\n- hardware: {hardware}\n"
        f"- torch {torch.__version__}, transformers {transformers.__version__}, dtype {str(dtype).replace('torch.', '')}\n"
        f"- command: `{command.strip()}`\n"
    )
    report = header + "\n" + "\n\n".join(sections) + "\n"
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{dt.date.today().isoformat()}-{_device_name(device)}-use.md"
    out.write_text(report)
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
