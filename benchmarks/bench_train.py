"""Single-GPU training throughput: stock ``transformers`` against bioscale padded, packed and packed + FP8.

One process trains the same optimizer steps of real sequences through every variant of every model and prints one
table (unpadded tokens/s, step time, MFU, peak memory, final loss), then writes it with the GPU, the library versions
and the exact command to ``<out-dir>/<YYYY-MM-DD>-<gpu>.md`` (plus a ``.json`` of the rows)::

    python benchmarks/bench_train.py                                        # the full table on one GPU (~8 min)
    python benchmarks/bench_train.py --models esm2_650M --variants packed,packed_fp8 --profile
    python benchmarks/bench_train.py --models esm2_3B:tokens=4096:ac=none --loss-compare-steps 500 \
        --variants packed,packed_fp8 --lr 2e-4 --lr-warmup-steps 100    # FP8 vs bf16 loss (predicted ~4 min, H100)
    python benchmarks/bench_train.py --models esm2_650M --variants packed,packed:params=bf16-master,packed:params=fsdp
    python benchmarks/bench_train.py --quick --device cpu --models esm2_debug    # a 10-second smoke test
    python benchmarks/bench_train.py --quick --device cpu --models esm2_debug --variants packed,packed:params=fsdp
    python benchmarks/bench_train.py --models @tokens-esm2 --variants packed:params=bf16   # a named suite

What is compared. Sequences come from ``../shared/data``: the UniRef90 sample for ESM-2 (lengths as they come,
cropped to 1,022 residues + <cls>/<eos>, masked once per sequence with ESM's 15% / 80-10-10 recipe) and the
OpenGenome2 metagenomic contigs for Llama 3 (8,192-token windows, causal LM); CodonFM EnCodon reads the offline demo
CDS corpus (the genes pyrodigal predicts on the genome its wheel ships, ``bioscale.data.cds.demo_cds_corpus``) through
the CDS policy, cropped to 2,046 codons + <CLS>/<SEP>, masked 15% / 80-10-10 with random codons; Geneformer reads the
shared Genecorpus cells (``genecorpus_500_samples.parquet``, rank-value encoded, :func:`load_cell_examples`), each
truncated to its top genes (V2 cases: ``<cls>`` genes ``<eos>``), masked 15% / 80-10-10 with random genes. Steps are
planned packed-first: the stream is packed in order into micro-batches of ``tokens`` tokens, ``grad_acc`` of them per
optimizer step (see :func:`plan_steps`: ESM-2 starts a new micro-batch when a protein does not fit; Llama cuts the DNA
window that overflows and continues it in the next micro-batch, so every micro-batch is full); the padded variants
train exactly the sequences of each step in micro-batches of at most ``mb`` sequences, padded to the longest (a
multiple of 16), as ``transformers`` users do. Every variant therefore sees the same tokens, masks and labels per
step, starts from the same weights (the ``transformers`` model is converted from the bioscale init with
``bioscale.models.to_hf``), and its losses can be compared across the row (EnCodon's rows: up to its hidden dropout).

- ``hf_padded``: ``transformers`` ``EsmForMaskedLM`` / ``LlamaForCausalLM`` / ``BertForMaskedLM`` (Geneformer) with
  SDPA, eager, bf16 autocast.
- ``ref_padded``: the family's published reference implementation (:data:`REFERENCE_BASELINES`: AMPLIFY's
  chandar-lab ``AMPLIFY``, CodonFM's ``EnCodon``, from ``--reference-dir``) with the bioscale init's weights, padded,
  eager, bf16 autocast,
  the same stock loop as ``hf_padded``. For families without a stock ``transformers`` class this is the baseline.
- ``padded``: bioscale, SDPA, padded batches, blocks compiled with dynamic shapes, bf16 autocast.
- ``packed``: bioscale, ``varlen`` attention on packed batches padded to the fixed budget (static shapes, one compile),
  masked-only LM head, per-block ``torch.compile``, bf16 autocast.
- ``packed_fp8``: ``packed`` with torchao FP8 linears (``--fp8-recipe``, ``--fp8-layers``, ``--fp8-min-features``).

Weights and optimizer (``--param-dtype`` or per variant ``packed:params=bf16``; the row's variant says which unless
it is the default ``fp32``):

- ``fp32``: fp32 weights, bf16 autocast, fp32 AdamW states (the trainer's single-GPU setting).
- ``bf16``: bf16 weights *and* bf16 AdamW states, no fp32 master copy, no autocast. Fastest, but not a training
  recipe as it stands: updates smaller than half a bf16 ulp of a weight (lr * update < ~2**-9 * |w|) are lost, so
  late in a run with a decayed lr the weights stop moving. Use it as an upper bound for what bf16 weights can gain.
- ``bf16-master``: bf16 weights for compute, fp32 master weights and fp32 AdamW states in the optimizer
  (:class:`MasterWeightAdamW`: gradients cast to fp32, fused AdamW on the masters, masters copied back), the
  numerically safe way to get bf16 weights on one GPU (Megatron / apex O2 style).
- ``fsdp``: FSDP2 over a one-rank process group (:func:`one_rank_process_group`), applied to the meta model as the
  trainer does (AC -> compile -> ``apply_fsdp(param_dtype=bf16, reduce_dtype=fp32)`` -> ``to_empty``): fp32 sharded
  master weights and AdamW states, bf16 compute through FSDP2's all-gather cast, fp32 gradient reduce-scatter, no
  autocast. The same bf16-over-fp32-master recipe as ``bf16-master``, the way the trainer gets it on one GPU
  (``parallelism.single_gpu_fsdp=true``). On CPU FSDP2 keeps fp32 (``param_dtype=None``), like the trainer.

What ``bioscale train`` would do: the bioscale variants build their model through the trainer's own pieces (the
precision plan of ``bioscale.distributed.plan_parallelism``, see :func:`variant_plan`; ``parallelize``) and train
every step through the trainer's ``bioscale.train.step.train_step`` (:class:`TrainerSteps`: gradient accumulation
with sync on the last micro-batch, loss normalised by the step's label count, clipping, non-finite skipping, the FP8
scale refresh of FSDP2's FP8 all-gather) with the trainer's ``LambdaLR``. The ``hf_padded`` baseline keeps a stock
loop (:func:`stock_step`), as a ``transformers`` user writes it. All variants use fused AdamW (foreach on CPU).

Learning rate: the trainer's ``linear_warmup_linear_decay`` (ESM-2) over the whole run, ``--lr`` the peak,
``--lr-warmup-steps`` of linear warm-up, then linear decay to ``--lr-min-ratio`` x peak at the last step; gradients
clipped to ``--max-grad-norm`` as the trainer does. Defaults: with ``--loss-compare-steps N``, 10% of N warm-up steps,
decay to 10% and clipping at 1.0 (the trainer's); without it (throughput runs), warm-up over the untimed
``--warmup`` steps, then a constant lr, clipping at 1.0 (the timed steps pay for the norm as training does; a short
run's final loss is only a coarse check, Llama 3 1B spikes at a constant 4e-4: compare losses with
``--loss-compare-steps``). The loss comparison
(:func:`render_loss_compare`) reports, per variant against ``packed``, the mean loss of the last 10% of steps,
its relative difference, the largest per-step difference over those steps, and every loss spike
(:func:`find_spikes`) of either run. Throughput counts real (unpadded) tokens; MFU uses the model spec's
training FLOPs per token at the token-weighted mean sequence length, against 989 TFLOP/s (H100 SXM dense bf16) and
789 TFLOP/s (the bf16 GEMM rate measured on the lent H100). Warm-up steps (compilation included) are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from bioscale.data import (
    CLMCollator,
    demo_corpus,
    InputPolicy,
    MLMCollator,
    canonical_token_ids,
    collate_packed,
    get_tokenizer,
    nucleotide_tokenizer,
    read_fasta,
    read_parquet,
    record_affixes,
)
from bioscale.data.cds import CdsPolicy
from bioscale.data.singlecell import (
    CellPolicy,
    GeneTokenEncoder,
    gene_token_ids,
    read_tokenized_cells,
    vocabulary_of_tokenizer,
)
from bioscale.distributed import ParallelPlan, apply_data_parallel, parallelize, plan_parallelism
from bioscale.distributed.parallelize import COMPILE_PRESETS
from bioscale.models import build_config, build_model, get_model_spec, input_validation, set_input_validation, to_hf
from bioscale.models.flash_impl import flash_impl
from bioscale.precision import QuantStats, apply_fp8, fp8_layer_names
from bioscale.train.schedulers import build_lr_scheduler, lr_multiplier
from bioscale.train.step import StepResult, TrainState, model_loss, train_step
from bioscale.train.step import clip_grad_norm as trainer_clip_grad_norm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("BIOSCALE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# The published implementations the ref_padded rows run (../shared/reference/README.md); never imported by bioscale.
DEFAULT_REFERENCE_DIR = Path(os.environ.get("BIOSCALE_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16 datasheet peak
MEASURED_GEMM_FLOPS = 789e12  # large bf16 GEMMs measured on the lent H100
VARIANTS = ("hf_padded", "ref_padded", "padded", "packed", "packed_fp8")
STOCK_VARIANTS = ("hf_padded", "ref_padded")  # stepped by the stock loop, not bioscale's train_step
IGNORE_INDEX = -100


# ---- what runs ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model of the table and how it is fed.

    Attributes:
        key: name on the command line and in the table.
        family / size: ``bioscale.models.build_config(family, size)``.
        data: ``"uniref"`` (masked LM on proteins), ``"dna"`` (causal LM on DNA windows) or ``"cds"`` (masked LM on
            codons of coding sequences).
        max_length: longest sequence in tokens, special tokens included (also the fixed ``max_length`` given to the
            varlen kernel, so its value never changes between steps and never triggers a recompile).
        mb: sequences per padded micro-batch.
        tokens: token budget of a packed micro-batch (every packed micro-batch is padded to exactly this).
        grad_acc: packed micro-batches per optimizer step.
        ac: activation checkpointing of the bioscale variants: ``none``, ``selective`` or ``full``.
        packing: how :func:`plan_steps` fills a micro-batch: ``greedy`` (a sequence that does not fit opens the next
            one) or ``split`` (it is cut, and its tail opens the next one, so every micro-batch is exactly full).
    """

    key: str
    family: str
    size: str
    data: str
    max_length: int
    mb: int
    tokens: int
    grad_acc: int = 1
    ac: str = "none"
    packing: str = "greedy"

    @property
    def tokenizer(self) -> str:
        """The bioscale tokenizer of the family (``protein`` for ESM-2, ``amplify``, ``nucleotide``); Geneformer V2
        cases (data ``genecorpus_v2``) read the V2 convention of the gene vocabulary."""
        if self.data == "genecorpus_v2":
            return "geneformer_v2"
        return get_model_spec(self.family).tokenizer

    @property
    def pad_token_id(self) -> int:
        return _tokenizer(self.tokenizer).pad_token_id

    @property
    def label(self) -> str:
        """Name in the table: the key plus every option that differs from its registered default, spelled as on the
        command line (``esm2_650M:tokens=32768``), so several budgets of one model fit in one report."""
        default = MODEL_CASES.get(self.key)
        if default is None:
            return self.key
        changed = [name for name in CASE_OPTIONS if getattr(self, name) != getattr(default, name)]
        return ":".join([self.key, *(f"{name}={getattr(self, name)}" for name in changed)])


# --models options: field -> parser
CASE_OPTIONS: dict[str, type] = {
    "tokens": int,
    "mb": int,
    "grad_acc": int,
    "ac": str,
    "packing": str,
    "max_length": int,
}


MODEL_CASES: dict[str, ModelCase] = {
    case.key: case
    for case in (
        ModelCase("esm2_debug", "esm2", "debug", "uniref", 1024, 4, 2048),
        ModelCase("esm2_8M", "esm2", "esm2_t6_8M", "uniref", 1024, 16, 16384),
        ModelCase("esm2_35M", "esm2", "esm2_t12_35M", "uniref", 1024, 16, 16384),
        ModelCase("esm2_150M", "esm2", "esm2_t30_150M", "uniref", 1024, 16, 16384),
        ModelCase("esm2_650M", "esm2", "esm2_t33_650M", "uniref", 1024, 16, 16384),
        # 80 GB: fp32 weights + AdamW take ~46 GB, so the H100 needs a smaller budget and selective AC; on an H200
        # use esm2_3B:tokens=16384:ac=none.
        ModelCase("esm2_3B", "esm2", "esm2_t36_3B", "uniref", 1024, 4, 8192, ac="selective"),
        # The OpenGenome2 sample's contigs are all 8,192 bp: 8,190-nt windows (+ <bos>/<eos>) make an 8,192-token
        # window and a 4-token tail per contig. Greedy packing of [8192, 4, 8192, 4, ...] into 16,384 tokens puts one
        # window and one tail per micro-batch (50% padding, measured 2026-11-22); split packing fills every one.
        ModelCase("llama3_debug", "llama3", "debug", "dna", 1024, 2, 2048, packing="split"),
        ModelCase("llama3_1B", "llama3", "1B", "dna", 8192, 2, 16384, packing="split"),
        # AMPLIFY trains stage 1 on 512-token crops (<bos> and <eos> included); 32 sequences per padded micro-batch.
        ModelCase("amplify_debug", "amplify", "debug", "uniref", 512, 4, 2048),
        ModelCase("amplify_120M", "amplify", "120M", "uniref", 512, 32, 16384),
        ModelCase("amplify_350M", "amplify", "350M", "uniref", 512, 32, 16384),
        # CodonFM EnCodon: CDSs cropped to 2,048 tokens (CodonFM's context); the reference measured padded batches of
        # 100-1,000-codon sequences. Attention-probability dropout is 0 in every row (the packed kernel has none).
        ModelCase("encodon_debug", "codonfm", "debug", "cds", 512, 4, 2048),
        ModelCase("encodon_80M", "codonfm", "80M", "cds", 2048, 16, 16384),
        ModelCase("encodon_600M", "codonfm", "600M", "cds", 2048, 16, 16384),
        ModelCase("encodon_1B", "codonfm", "1B", "cds", 2048, 16, 16384),
        # Geneformer: the shared Genecorpus cells (~2,048 ranked genes each), truncated to their top genes; 16 cells
        # x 2,048 tokens per micro-batch, the shape of the issue's BertForMaskedLM baseline. V2 cases wrap each cell
        # as <cls> genes <eos> over the corpus's V1 vocabulary (+2 tokens). Attention dropout is 0 in every row.
        ModelCase("geneformer_debug", "geneformer", "debug", "genecorpus", 256, 4, 2048),
        ModelCase("geneformer_10M", "geneformer", "V1_10M", "genecorpus", 2048, 16, 32768),
        ModelCase("geneformer_104M", "geneformer", "V2_104M", "genecorpus_v2", 2048, 16, 32768),
        ModelCase("geneformer_316M", "geneformer", "V2_316M", "genecorpus_v2", 2048, 16, 32768),
    )
}
DEFAULT_MODELS = ("esm2_8M", "esm2_150M", "esm2_650M", "esm2_3B", "llama3_1B")

# Named lists of --models entries (``--models @tokens-esm2``): micro-batch token budgets worth measuring next. A
# bigger budget amortises the per-step costs that do not grow with tokens (fused AdamW: 5.2 ms of a 175 ms ESM-2 650M
# step; the weight casts of autocast; kernel launches) and gives the GEMMs more rows. Peak memory grows ~linearly with
# the budget: 650M at 65,536 and 3B at 32,768 need an H200 (the row says OOM on an H100). Each suite fits one
# 10-minute device call with one or two variants, --steps 8 --warmup 4.
MODEL_SUITES: dict[str, tuple[str, ...]] = {
    "tokens-esm2": (
        "esm2_650M",
        "esm2_650M:tokens=32768",
        "esm2_650M:tokens=65536",
        "esm2_3B:tokens=16384:ac=none",
        "esm2_3B:tokens=32768:ac=selective",
    ),
    "tokens-llama": ("llama3_1B", "llama3_1B:tokens=32768", "llama3_1B:tokens=8192:grad_acc=2"),
}
PARAM_DTYPES = ("fp32", "bf16", "bf16-master", "fsdp")
PARAM_NOTES = {
    "bf16": "bf16 weights + bf16 AdamW states, no fp32 master",
    "bf16-master": "bf16 weights, fp32 master weights + AdamW states",
    "fsdp": "bf16 compute over fp32 master weights via FSDP2 on one rank",
}
# Loss spikes (find_spikes): a step whose loss exceeds SPIKE_FACTOR x the mean of the SPIKE_WINDOW steps before it.
SPIKE_WINDOW = 20
SPIKE_FACTOR = 1.2


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """A column of the comparison: ``name`` from :data:`VARIANTS`, FP8 options for ``packed_fp8``."""

    name: str
    fp8_recipe: str = "tensorwise"
    fp8_layers: tuple[int, ...] | None = None
    fp8_min_features: int = 0
    fp8_modules: tuple[str, ...] | None = None  # apply_fp8(modules=...): linears by name / prefix inside a block
    quant_stats_freq: int = 0  # attach bioscale.precision.QuantStats recording every this many steps (0: off)
    params: str = "fp32"  # weights / optimizer: one of PARAM_DTYPES (see the module docstring)
    compile_mode: str | None = None  # torch.compile mode of the blocks (None: default; e.g. max-autotune-no-cudagraphs)
    # Packed only: pad cu_seq_lens with empty segments to a multiple of this length (None: off), so CUDA graphs
    # (compile=reduce-overhead) see a few cu_seq_lens shapes instead of one per sequence count.
    cu_pad: int | None = None
    attn_impl: str | None = None  # flash kernels behind varlen_attn: None (torch's built-in FA2), "FA3" or "FA4"
    # Names from bioscale.distributed.parallelize.COMPILE_PRESETS (Inductor settings), merged over compile_mode.
    compile_presets: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = []
        if self.name == "packed_fp8":
            parts.append(self.fp8_recipe)
            if self.fp8_min_features:
                parts.append(f"min{self.fp8_min_features}")
            if self.fp8_modules is not None:
                parts.append("modules=" + "+".join(self.fp8_modules))
            if self.fp8_layers is not None:
                parts.append("L" + _format_ranges(self.fp8_layers))
            if self.quant_stats_freq:
                parts.append(f"qstats/{self.quant_stats_freq}")
        if self.params != "fp32":
            parts.append(f"params={self.params}")
        if self.compile_mode:
            parts.append(f"compile={self.compile_mode}")
        if self.compile_presets:
            parts.append("inductor=" + "+".join(self.compile_presets))
        if self.attn_impl:
            parts.append(f"attn={self.attn_impl}")
        if self.cu_pad:
            parts.append(f"cu_pad={self.cu_pad}")
        return f"{self.name}[{','.join(parts)}]" if parts else self.name


def quant_stats_step_offset(warmup: int, freq: int) -> int:
    """What to add to the step number the quant-stats recorder sees (it records where ``step % freq == 0``).

    The first recording compiles the blocks' statistics variant (seconds). With this offset the last warm-up step
    (index ``warmup - 1``) records, so that compile happens in the warm-up and the timed steps hold only steady-state
    recordings, every ``freq``-th step, as in a long run; with ``warmup == 0`` there is nothing to hide it in and the
    offset is 0.
    """
    return (-warmup) % freq if warmup > 0 else 0


def _parse_options(text: str, what: str) -> tuple[str, dict[str, str]]:
    """``name:key=value:key=value`` -> (name, {key: value}); ``ValueError`` naming ``what`` when malformed."""
    name, *pairs = text.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} {text!r}: options are key=value pairs after ':', got {pair!r}")
        options[key] = value
    return name, options


def _parse_ranges(text: str) -> tuple[int, ...]:
    """``"1-4,7"`` -> (1, 2, 3, 4, 7)."""
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        start, sep, end = part.partition("-")
        try:
            out.extend(range(int(start), int(end) + 1) if sep else [int(start)])
        except ValueError:
            raise ValueError(f"layer list {text!r}: expected e.g. '1-4,7'") from None
    return tuple(out)


def _format_ranges(values: Sequence[int]) -> str:
    groups = []
    for _, run in itertools.groupby(enumerate(values), key=lambda pair: pair[1] - pair[0]):
        items = [value for _, value in run]
        groups.append(str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}")
    return ",".join(groups)


def expand_models(text: str) -> list[str]:
    """The comma-separated ``--models`` value with every ``@suite`` replaced by its entries (:data:`MODEL_SUITES`)."""
    entries: list[str] = []
    for item in filter(None, text.split(",")):
        if item.startswith("@"):
            if item[1:] not in MODEL_SUITES:
                suites = ", ".join("@" + name for name in MODEL_SUITES)
                raise ValueError(f"unknown model suite {item!r}; choose from {suites}")
            entries.extend(MODEL_SUITES[item[1:]])
        else:
            entries.append(item)
    return entries


def parse_model(text: str) -> ModelCase:
    """``esm2_3B`` or ``esm2_3B:tokens=16384:ac=none:mb=8:grad_acc=2:packing=split``."""
    key, options = _parse_options(text, "--models entry")
    if key not in MODEL_CASES:
        raise ValueError(f"unknown model {key!r}; choose from {', '.join(MODEL_CASES)}")
    case = MODEL_CASES[key]
    unknown = sorted(set(options) - set(CASE_OPTIONS))
    if unknown:
        raise ValueError(f"--models {text!r}: unknown options {unknown}; valid: {sorted(CASE_OPTIONS)}")
    case = dataclasses.replace(case, **{k: CASE_OPTIONS[k](v) for k, v in options.items()})
    if case.ac not in ("none", "selective", "full"):
        raise ValueError(f"--models {text!r}: ac must be none, selective or full")
    if case.packing not in ("greedy", "split"):
        raise ValueError(f"--models {text!r}: packing must be greedy or split")
    if case.tokens % 16 or case.tokens < case.max_length:
        raise ValueError(
            f"--models {text!r}: tokens={case.tokens} must be a multiple of 16 (FP8 GEMMs) and >= max_length="
            f"{case.max_length} (a packed micro-batch must hold the longest sequence)"
        )
    return case


def parse_variant(text: str, defaults: argparse.Namespace) -> VariantSpec:
    """``packed_fp8`` or ``packed_fp8:recipe=rowwise:min_features=2048:layers=2-33:qstats=10:params=bf16``
    (``modules=mlp+attention.qkv_proj``: the linears of each block to convert, ``+``-separated).

    Every variant takes ``params`` (:data:`PARAM_DTYPES`; default ``--param-dtype``); the bioscale ones also
    ``compile`` (a ``torch.compile`` mode, default ``--compile-mode``) and ``inductor`` (``+``-separated names from
    ``bioscale.distributed.parallelize.COMPILE_PRESETS``, e.g. ``inductor=coordinate_descent``); the packed ones
    ``attn`` (``FA3`` / ``FA4``: see :func:`flash_attention_impl`) and ``cu_pad`` (pad ``cu_seq_lens`` with empty
    segments to a multiple of it, for CUDA graphs: ``packed:cu_pad=64:compile=reduce-overhead``); ``packed_fp8`` also
    the FP8 options.
    """
    name, options = _parse_options(text, "--variants entry")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    valid = {"params"} | ({"compile", "inductor"} if name not in STOCK_VARIANTS else set())
    if "packed" in name:
        valid |= {"attn", "cu_pad"}
    if name == "packed_fp8":
        valid |= {"recipe", "min_features", "layers", "modules", "qstats"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"--variants {text!r}: unknown options {unknown}; valid for {name}: {sorted(valid)}")
    layers = options.get("layers", defaults.fp8_layers)
    recipe = options.get("recipe", defaults.fp8_recipe)
    if recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"--variants {text!r}: recipe must be tensorwise or rowwise")
    params = options.get("params", defaults.param_dtype)
    if params not in PARAM_DTYPES:
        raise ValueError(f"--variants {text!r}: params must be one of {', '.join(PARAM_DTYPES)}")
    if params == "fsdp" and name in STOCK_VARIANTS:
        raise ValueError(f"--variants {text!r}: params=fsdp needs a bioscale model (FSDP2 shards model.layers)")
    compile_mode = options.get("compile", defaults.compile_mode if name not in STOCK_VARIANTS else None)
    compile_presets = tuple(options["inductor"].split("+")) if "inductor" in options else ()
    unknown_presets = sorted(set(compile_presets) - set(COMPILE_PRESETS))
    if unknown_presets:
        raise ValueError(
            f"--variants {text!r}: unknown inductor presets {unknown_presets}; choose from {sorted(COMPILE_PRESETS)}"
        )
    attn_impl = options.get("attn")
    if attn_impl not in (None, "FA3", "FA4"):
        raise ValueError(f"--variants {text!r}: attn must be FA3 or FA4 (torch's built-in FA2 is the default)")
    return VariantSpec(
        name=name,
        fp8_recipe=recipe,
        fp8_layers=None if layers in (None, "all") else _parse_ranges(layers),
        fp8_min_features=int(options.get("min_features", defaults.fp8_min_features)),
        fp8_modules=tuple(options["modules"].split("+")) if "modules" in options else None,
        quant_stats_freq=int(options.get("qstats", 0)),
        params=params,
        compile_mode=compile_mode or None,
        attn_impl=attn_impl,
        cu_pad=int(options["cu_pad"]) if "cu_pad" in options else None,
        compile_presets=compile_presets,
    )


# ---- data ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One training sequence: model inputs (masked for MLM) and labels, aligned, special tokens included."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


@functools.lru_cache(maxsize=None)
def _tokenizer(kind: str) -> Any:
    return get_tokenizer(kind)


def load_examples(
    kind: str, max_length: int, data_dir: Path, *, seed: int, limit: int | None, tokenizer_kind: str = "protein"
) -> list[Example]:
    """Tokenised, cropped and labelled sequences, in file order (the same for every variant and model).

    ``tokenizer_kind``: the family's tokenizer for ``uniref`` (``protein`` for ESM-2, ``amplify``)."""
    if kind in ("genecorpus", "genecorpus_v2"):
        return load_cell_examples(max_length, data_dir, seed=seed, limit=limit, tokenizer_kind=tokenizer_kind)
    policy: Any
    if kind == "cds":  # no file in the shared folder: the demo CDS corpus, generated from a pyrodigal wheel file
        path = demo_corpus("cds")
        records = read_fasta(path)
        tokenizer = _tokenizer("codon")
        policy = CdsPolicy(max_length=max_length - 2, crop="random")
    elif kind == "uniref":
        path = data_dir / "uniref90_sample.parquet"
        records: Iterator[tuple[str, str | None]] = read_parquet(path) if path.exists() else iter(())
        tokenizer = _tokenizer(tokenizer_kind)
        policy = InputPolicy(tokenizer_kind, max_length=max_length - 2, crop="random")
    elif kind == "dna":
        path = data_dir / "opengenome2_metagenomics_sample.fasta"
        records = read_fasta(path) if path.exists() else iter(())
        tokenizer = nucleotide_tokenizer(model_max_length=max_length)
        policy = InputPolicy("nucleotide", max_length=max_length - 2, crop="window")
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    if not path.exists():
        raise ValueError(f"benchmark data {path} not found; pass --data-dir (the shared data folder)")
    rng = np.random.default_rng(seed)
    sequences: list[str] = []
    for record_id, sequence in records:
        sequences.extend(policy(record_id, sequence, rng))
        if limit is not None and len(sequences) >= limit:
            break
    if kind == "dna":
        # The special tokens the training pipeline puts around each record (record_affixes): they include the <eos>
        # that the DNA tokenizers no longer append themselves (so that a prompt never ends in one).
        prefix, suffix = record_affixes(tokenizer)
        encoded = [prefix + ids + suffix for ids in tokenizer(sequences, add_special_tokens=False)["input_ids"]]
    else:
        encoded = tokenizer(sequences, add_special_tokens=True)["input_ids"]
    examples = []
    if kind in ("uniref", "cds"):
        mlm = MLMCollator(tokenizer, random_token_ids=canonical_token_ids(tokenizer, "codon" if kind == "cds" else
                                                                          tokenizer_kind))  # fmt: skip
        for index, ids in enumerate(encoded):
            batch = mlm.apply({"input_ids": torch.tensor(ids)[None]}, rng=np.random.default_rng([seed, index]))
            examples.append(Example(batch["input_ids"][0].numpy(), batch["labels"][0].numpy()))
    else:
        clm = CLMCollator(tokenizer)
        for ids in encoded:
            batch = clm.apply({"input_ids": torch.tensor(ids)[None], "attention_mask": torch.ones(1, len(ids))})
            examples.append(Example(batch["input_ids"][0].numpy(), batch["labels"][0].numpy()))
    return examples


def load_cell_examples(
    max_length: int, data_dir: Path, *, seed: int, limit: int | None, tokenizer_kind: str = "geneformer"
) -> list[Example]:
    """The shared Genecorpus cells (``genecorpus_500_samples.parquet``, rank-value-encoded) as the training loader
    feeds them: each cell's top genes (:class:`bioscale.data.singlecell.CellPolicy`), the convention's special tokens
    (V2: ``<cls> … <eos>``), masked once per cell 15% / 80-10-10 with random genes only."""
    path = data_dir / "genecorpus_500_samples.parquet"
    if not path.exists():
        raise ValueError(f"benchmark data {path} not found; pass --data-dir (the shared data folder)")
    tokenizer = _tokenizer(tokenizer_kind)
    vocabulary = vocabulary_of_tokenizer(tokenizer)
    encoder = GeneTokenEncoder(vocabulary)
    policy = CellPolicy(vocabulary, max_genes=max_length - encoder.num_special)
    mlm = MLMCollator(tokenizer, random_token_ids=gene_token_ids(tokenizer))
    examples = []
    for index, (cell_id, genes) in enumerate(read_tokenized_cells(path, vocab_size=len(vocabulary))):
        for piece in policy(cell_id, genes):
            ids = torch.from_numpy(encoder.encode(piece))[None]
            batch = mlm.apply({"input_ids": ids}, rng=np.random.default_rng([seed, index]))
            examples.append(Example(batch["input_ids"][0].numpy(), batch["labels"][0].numpy()))
        if limit is not None and len(examples) >= limit:
            break
    return examples


@dataclasses.dataclass
class StepPlan:
    """The sequences of one optimizer step, as packed micro-batches (each a list of training sequences)."""

    packs: list[list[Example]]

    @property
    def sequences(self) -> list[Example]:
        return [example for pack in self.packs for example in pack]


def cut_example(example: Example, at: int, *, causal: bool) -> tuple[Example, Example]:
    """``example`` cut into ``[:at]`` and ``[at:]``, two sequences of their own.

    The tail becomes a new attention segment, so under a causal objective nothing precedes its first token: that label
    becomes -100, as ``CLMCollator`` marks the first token of every sequence (one label per cut is lost). Masked-LM
    labels need no change.
    """
    assert 0 < at < len(example), (at, len(example))
    tail_labels = example.labels[at:].copy()
    if causal:
        tail_labels[0] = IGNORE_INDEX
    return Example(example.input_ids[:at], example.labels[:at]), Example(example.input_ids[at:], tail_labels)


def plan_steps(examples: Sequence[Example], case: ModelCase, num_steps: int) -> list[StepPlan]:
    """In-order packing of the (cycled) examples into ``num_steps`` steps of ``grad_acc`` micro-batches of at most
    ``case.tokens`` tokens.

    ``case.packing="greedy"``: a sequence that does not fit opens the next micro-batch; the rest of this one is padding.
    ``"split"``: it is cut (:func:`cut_example`): its head fills this micro-batch exactly and its tail opens the next,
    the way genomic pretraining streams DNA (Megatron-style GPT data, Evo 2: concatenate, then chunk to the context),
    except that attention stays within each piece. Every micro-batch is then full: on the OpenGenome2 sample
    (``[8192, 4, 8192, 4, ...]`` tokens into 16,384) greedy pads 50% of each micro-batch, split 0%. First-fit with a
    lookahead would not help there: two windows fill the budget exactly, so a tail can never join them and could
    only be put off until the lookahead holds nothing but tails.
    """
    causal = case.data == "dna"
    stream = (examples[i] for i in itertools.cycle(range(len(examples))))
    steps: list[StepPlan] = []
    pending: Example | None = None
    for _ in range(num_steps):
        packs = []
        for _ in range(case.grad_acc):
            pack: list[Example] = []
            used = 0
            while used < case.tokens:
                example = pending if pending is not None else next(stream)
                pending = None
                space = case.tokens - used
                if len(example) > space:
                    if case.packing == "split":
                        head, pending = cut_example(example, space, causal=causal)
                        pack.append(head)
                    else:
                        pending = example  # opens the next micro-batch
                    break
                pack.append(example)
                used += len(example)
            packs.append(pack)
        steps.append(StepPlan(packs))
    return steps


def packed_batch(pack: Sequence[Example], case: ModelCase, segments_multiple_of: int | None = None) -> dict[str, Any]:
    """A THD micro-batch of exactly ``case.tokens`` tokens: the sequences, then one ``<pad>`` segment (label -100);
    ``segments_multiple_of``: see :func:`bioscale.data.collate_packed` (variant option ``cu_pad``)."""
    batch = collate_packed(
        [e.input_ids for e in pack],
        pad_to_multiple_of=case.tokens,
        pad_token_id=case.pad_token_id,
        segments_multiple_of=segments_multiple_of,
    )
    labels = np.concatenate([e.labels for e in pack])
    padded_labels = np.full(batch["input_ids"].shape[1], IGNORE_INDEX, dtype=np.int64)
    padded_labels[: len(labels)] = labels
    batch["labels"] = torch.from_numpy(padded_labels)[None]
    # A fixed max_length: the real maximum changes every step and would recompile the blocks each time. The padding
    # segment (greedy packing only) is shorter than the next sequence, which did not fit, so it never exceeds
    # max_length either; split pieces are never longer than the sequence they came from.
    max_length = max(case.max_length, int(batch["max_length_q"]))
    batch["max_length_q"] = batch["max_length_k"] = max_length
    assert int(batch["input_ids"][0, len(labels) :].ne(case.pad_token_id).sum()) == 0
    return batch


def padded_batches(sequences: Sequence[Example], case: ModelCase) -> list[dict[str, Any]]:
    """BSHD micro-batches of at most ``case.mb`` sequences, right-padded to the longest, rounded up to 16.

    The step's sequences are split into as few micro-batches as ``mb`` allows, of near-equal size (they differ by at
    most one sequence), so a step ends with a one-sequence micro-batch only when it must (3 sequences at ``mb=2``, as
    split Llama steps often have): batch size 1 is specialised by Dynamo, one more compile, during the warm-up.
    """
    batches = []
    num_chunks = -(-len(sequences) // case.mb)
    for chunk_indices in np.array_split(np.arange(len(sequences)), num_chunks):
        chunk = [sequences[int(i)] for i in chunk_indices]
        width = max(len(e) for e in chunk)
        width += (-width) % 16
        input_ids = np.full((len(chunk), width), case.pad_token_id, dtype=np.int64)
        labels = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(chunk), width), dtype=np.int64)
        for row, example in enumerate(chunk):
            input_ids[row, : len(example)] = example.input_ids
            labels[row, : len(example)] = example.labels
            attention_mask[row, : len(example)] = 1
        batches.append(
            {
                "input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels),
            }
        )
    return batches


# ---- models and one variant's run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One row of the table (``status`` is ``ok``, ``OOM`` or an error message)."""

    model: str
    variant: str
    status: str = "ok"
    tokens_per_s: float | None = None
    step_ms: float | None = None
    mfu_peak: float | None = None
    mfu_gemm: float | None = None
    peak_mem_gb: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    pad_share: float | None = None
    num_timed_steps: int = 0
    real_tokens_per_step: float | None = None
    seconds: float | None = None  # wall time of the whole variant (build + compile + steps)
    notes: str = ""
    losses: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)  # per step, before clipping (when clipping)
    profile: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    profile_categories: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # summarize_kernels


def _model_config(case: ModelCase, attn_backend: str) -> Any:
    overrides: dict[str, Any] = {"attn_backend": attn_backend}
    if case.data == "cds":
        # EnCodon trains with attention-probability dropout 0.1, which the packed varlen kernel does not have: 0 in
        # every row, the reference's included, so all rows compute the same function. The decoder is padded to 128.
        overrides.update(attention_probs_dropout_prob=0.0, padded_vocab_size=128)
    if case.data in ("genecorpus", "genecorpus_v2"):
        # Geneformer's attention dropout (0.02) does not exist in the packed varlen kernel: 0 in every row, as in the
        # L1 recipes; hidden dropout stays 0.02. The vocabulary is the corpus's (V1, or V1 + <cls>/<eos> for V2: the
        # published V2 vocabulary of 20,275 genes would not hold the corpus's token ids).
        vocabulary = vocabulary_of_tokenizer(_tokenizer(case.tokenizer))
        overrides.update(
            attention_probs_dropout_prob=0.0,
            vocab_size=len(vocabulary),
            pad_token_id=vocabulary.pad_id,
            mask_token_id=vocabulary.mask_id,
            cls_token_id=vocabulary.cls_id,
            eos_token_id=vocabulary.eos_id,
        )
    if case.data == "dna":
        tokenizer = nucleotide_tokenizer()
        overrides.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=max(case.max_length, 8192),
        )
    return build_config(case.family, case.size, **overrides)


class MasterWeightAdamW:
    """AdamW over fp32 master copies of a model's bf16 weights.

    The model computes with bf16 weights (no autocast, no per-forward weight casts, bf16 residual stream); ``step()``
    casts their gradients to fp32, runs (fused) AdamW on the fp32 masters with fp32 moments, and copies the masters
    back into the bf16 weights. Bytes per parameter: 2 (weight) + 2 (grad) + 4 (master) + 8 (moments), plus a transient
    fp32 grad during the step. The casts run one kernel per tensor; a flat buffer would make them one each.
    """

    def __init__(self, params: Any, masters: Sequence[torch.Tensor], **adamw_kwargs: Any) -> None:
        self.params = [p for p in params]
        if len(masters) != len(self.params):
            raise ValueError(f"{len(masters)} master tensors for {len(self.params)} parameters")
        self.masters = [m.detach().float().requires_grad_(p.requires_grad) for p, m in zip(self.params, masters)]
        self.optimizer = torch.optim.AdamW([m for m in self.masters if m.requires_grad], **adamw_kwargs)
        self.param_groups = self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for param, master in zip(self.params, self.masters):
            master.grad = None if param.grad is None else param.grad.float()
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.masters)  # rounds to bf16

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none  # gradients are always dropped: the fp32 ones are rebuilt every step
        for tensor in itertools.chain(self.params, self.masters):
            tensor.grad = None


@contextlib.contextmanager
def flash_attention_impl(impl: str | None) -> Iterator[None]:
    """Routes torch's flash-attention ops (``varlen_attn`` included) to ``impl`` for the block, then back to FA2:
    :func:`bioscale.models.flash_impl.flash_impl` (``FA3`` needs ``flash_attn_interface``, ``FA4`` ``flash_attn.cute``
    from PyPI ``flash-attn-4``; carry their wheels to the device)."""
    with flash_impl(impl):
        yield


@contextlib.contextmanager
def one_rank_process_group(device: torch.device) -> Iterator[None]:
    """A default process group of world size 1 for the block (NCCL with a gloo side on CUDA, as the trainer's; gloo
    on CPU), created only if none exists and destroyed after; FSDP2 needs one even to "shard" over a single rank."""
    import socket

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError(f"params=fsdp is single-GPU: this process is one of {dist.get_world_size()} ranks")
        yield
        return
    with socket.socket() as sock:  # a free port on the loopback interface
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """The learning rate of optimizer step ``step`` (0-based): the trainer's ``linear_warmup_linear_decay`` over
    the run's ``warmup + steps`` steps, ``--lr`` the peak (constant with 0 warm-up steps and ``--lr-min-ratio 1``)."""
    return args.lr * lr_multiplier(
        step,
        kind="linear_warmup_linear_decay",
        warmup_steps=args.lr_warmup_steps,
        total_steps=args.warmup + args.steps,
        min_lr_ratio=args.lr_min_ratio,
    )


def build_optimizer(
    model: torch.nn.Module, masters: Sequence[torch.Tensor] | None, device: torch.device, args: argparse.Namespace
) -> Any:
    """Fused AdamW on CUDA (foreach on CPU), over the model's weights or, given ``masters``, fp32 master copies."""
    kwargs = {"lr": args.lr, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}
    kwargs["fused"] = device.type == "cuda" or None
    if masters is not None:
        return MasterWeightAdamW(model.parameters(), masters, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


def reference_init(case: ModelCase, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """The initial weights every variant starts from: a plain bioscale model of ``case`` materialised on ``device``
    and initialised after ``torch.manual_seed(seed)``, as :func:`build_variant_model` does for the unsharded ones."""
    model = build_model(_model_config(case, "sdpa"), device="meta")
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model.state_dict()


def variant_plan(variant: VariantSpec, device: torch.device) -> ParallelPlan:
    """The precision plan ``bioscale train`` would choose for ``variant`` on this one device (``plan_parallelism``).

    ``params=fp32`` is the trainer's ``dtype=bf16`` on a GPU (bf16 autocast over fp32 weights); on CPU the smoke test
    asks for ``dtype=fp32`` (CPUs without bf16 matrix units run bf16 slower than fp32). ``params=fsdp`` is
    ``parallelism.single_gpu_fsdp=true`` (bf16 compute over fp32 master shards, no autocast) under
    :func:`one_rank_process_group`. ``params=bf16`` / ``bf16-master`` are not trainer settings: the benchmark casts the
    weights itself, so their plan is ``dtype=fp32`` (no autocast) and the weights decide the compute dtype.
    """
    fsdp = variant.params == "fsdp"
    bf16 = device.type == "cuda" and variant.params in ("fp32", "fsdp")
    plan = plan_parallelism(
        strategy="fsdp2",
        dtype="bf16" if bf16 else "fp32",
        device_type=device.type,
        world_size=1,
        is_distributed=fsdp,
        single_gpu_fsdp=fsdp,
        fp8=variant.name == "packed_fp8",
        fp8_recipe=variant.fp8_recipe,
    )
    if fsdp and not plan.use_fsdp:
        # The trainer never shards a single CPU rank (its sharded path stays fp32 there, nothing to gain); the smoke
        # test does, so that the FSDP2 path of the benchmark runs on CPU too. The dtypes stay the plan's (fp32), and
        # FP8 weights are not all-gathered in FP8 (the trainer refuses FP8 on CPU: there is nothing to mirror).
        plan = dataclasses.replace(plan, use_fsdp=True)
    return plan


def lr_scheduler(optimizer: Any, args: argparse.Namespace) -> Any:
    """The trainer's ``LambdaLR`` over :func:`lr_at`'s schedule (step ``i`` runs at ``lr_at(i, args)``).

    :class:`MasterWeightAdamW` is not a ``torch.optim.Optimizer``; its inner AdamW shares its ``param_groups``.
    """
    inner = optimizer.optimizer if isinstance(optimizer, MasterWeightAdamW) else optimizer
    return build_lr_scheduler(
        inner,
        kind="linear_warmup_linear_decay",
        warmup_steps=args.lr_warmup_steps,
        total_steps=args.warmup + args.steps,
        min_lr_ratio=args.lr_min_ratio,
    )


def _import_reference(reference_dir: Path, *subfolders: str) -> None:
    """Put ``reference_dir`` (and its ``subfolders``, e.g. the xformers shim) first on ``sys.path``."""
    if not reference_dir.is_dir():
        raise ValueError(f"reference implementations not found at {reference_dir}; pass --reference-dir")
    for folder in reversed([reference_dir, *(reference_dir / sub for sub in subfolders)]):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def amplify_reference(model: torch.nn.Module, reference_dir: Path) -> torch.nn.Module:
    """chandar-lab's ``AMPLIFY`` (its Hugging Face remote code; xformers replaced by the folder's pure-PyTorch shim,
    whose attention is SDPA) with exactly ``model``'s weights, converted through the published tensor names."""
    _import_reference(reference_dir, "shims")
    from amplify_reference.amplify_hf import AMPLIFY, AMPLIFYConfig

    from bioscale.models.amplify.convert import reference_config_dict, to_reference_state_dict

    config = {k: v for k, v in reference_config_dict(model.config).items() if k not in ("auto_map", "architectures")}
    reference = AMPLIFY(AMPLIFYConfig(**config))
    reference.load_state_dict(to_reference_state_dict(model), strict=True)
    return reference


class _EnCodonReferenceLoss(torch.nn.Module):
    """CodonFM's ``EnCodon`` (which returns logits only) with the loss its Lightning module computes: cross-entropy
    over the labels != -100 (``EncodonPL.model_step``)."""

    def __init__(self, encodon: torch.nn.Module) -> None:
        super().__init__()
        self.encodon = encodon

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        logits = self.encodon(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return argparse.Namespace(loss=loss, logits=logits)


def encodon_reference(model: torch.nn.Module, reference_dir: Path) -> torch.nn.Module:
    """CodonFM's ``EnCodon`` (the architecture of the released checkpoints, ``codonfm_reference``; its attention is
    SDPA with an additive mask and asserts padded lengths that are multiples of 8, which padded_batches gives) with
    exactly ``model``'s weights, converted through the released tensor names (RoPE buffers included)."""
    _import_reference(reference_dir)
    import inspect

    from codonfm_reference.encodon import EnCodon
    from codonfm_reference.encodon_config import EnCodonConfig

    from bioscale.models.codonfm.convert import reference_config_dict, to_reference_state_dict

    fields = inspect.signature(EnCodonConfig.__init__).parameters
    config = {k: v for k, v in reference_config_dict(model.config).items() if k in fields}
    reference = EnCodon(EnCodonConfig(**config))
    reference.load_state_dict(to_reference_state_dict(model), strict=True)
    return _EnCodonReferenceLoss(reference)


# family -> (bioscale model with the init weights, --reference-dir) -> the published implementation with them, whose
# forward(input_ids=, attention_mask=, labels=) returns an output with the mean masked-LM ``loss`` (ref_padded rows).
REFERENCE_BASELINES: dict[str, Callable[[torch.nn.Module, Path], torch.nn.Module]] = {
    "amplify": amplify_reference,
    "codonfm": encodon_reference,
}


def missing_baseline(case: ModelCase, variant: VariantSpec) -> str | None:
    """Why ``variant`` cannot run for ``case``'s family (a stock row without its stock model), else ``None``."""
    if variant.name == "hf_padded" and not get_model_spec(case.family).hf_classes:
        return f"{case.family} has no stock transformers class (its baseline is ref_padded)"
    if variant.name == "ref_padded" and case.family not in REFERENCE_BASELINES:
        return f"no reference implementation for {case.family} (its baseline is hf_padded)"
    return None


def build_variant_model(
    case: ModelCase, variant: VariantSpec, device: torch.device, args: argparse.Namespace
) -> tuple[torch.nn.Module, list[str], list[torch.Tensor] | None]:
    """The model of ``variant``, initialised from ``args.seed`` (identical weights for every variant), its notes and,
    for ``params=bf16-master``, fp32 copies of the initial weights (the optimizer's masters).

    The meta model is built as the trainer builds it, under the same plan (:func:`variant_plan`): FP8 linears ->
    ``bioscale.distributed.parallelize`` (activation checkpointing -> per-block compile -> FSDP2 for ``params=fsdp``,
    under :func:`one_rank_process_group`) -> ``to_empty`` + ``init_weights`` -> ``apply_data_parallel`` (nothing on
    one rank). FSDP2's sharded init draws its random numbers differently, so an FSDP2 model then loads
    :func:`reference_init`.
    """
    plan = variant_plan(variant, device)
    notes: list[str] = []
    packed = variant.name.startswith("packed")
    config = _model_config(case, "varlen" if packed else "sdpa")
    model = build_model(config, device="meta")
    if variant.name == "packed_fp8":
        emulate = device.type != "cuda"
        apply_fp8(
            model,
            recipe=variant.fp8_recipe,
            layers=list(variant.fp8_layers) if variant.fp8_layers is not None else None,
            min_features=variant.fp8_min_features,
            modules=variant.fp8_modules,
            emulate=emulate,
            fsdp_float8_all_gather=plan.fp8_all_gather,
        )
        notes.append(f"{len(fp8_layer_names(model))} FP8 linears" + (" (emulated GEMMs on CPU)" if emulate else ""))
    if variant.name not in STOCK_VARIANTS:
        # Padded batches change shape every step: compile once with dynamic shapes instead of recompiling.
        parallelize(
            model,
            plan,
            activation_checkpointing=case.ac,
            compile_blocks=args.compile,
            compile_dynamic=None if packed else True,
            compile_mode=variant.compile_mode,
            compile_presets=variant.compile_presets,
        )
        if case.ac != "none":
            notes.append(f"AC {case.ac}")
    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.init_weights()  # also fills the buffers (rotary tables) that no state dict carries
    if plan.use_fsdp:
        reference = reference_init(case, device, args.seed)
        set_model_state_dict(model, reference, options=StateDictOptions(full_state_dict=True, strict=True))
        del reference
        notes.append(
            PARAM_NOTES["fsdp"] if plan.param_dtype is not None else "fp32 weights and compute via FSDP2 on one rank"
        )
    model = apply_data_parallel(model, plan, device=device)
    if variant.name == "hf_padded":
        hf_model = to_hf(model)
        del model
        if hasattr(hf_model, "set_attn_implementation"):
            hf_model.set_attn_implementation("sdpa")
        else:  # transformers 4.x before set_attn_implementation
            hf_model.config._attn_implementation = "sdpa"
        notes.append(f"transformers {type(hf_model).__name__}, attn={hf_model.config._attn_implementation}")
        model = hf_model
    elif variant.name == "ref_padded":
        if case.family not in REFERENCE_BASELINES:
            raise ValueError(f"no reference implementation for {case.family}; known: {sorted(REFERENCE_BASELINES)}")
        reference = REFERENCE_BASELINES[case.family](model, args.reference_dir).to(device)
        del model
        notes.append(f"reference {type(reference).__module__}.{type(reference).__name__}, padded, eager")
        model = reference
    masters = None
    if variant.params in ("bf16", "bf16-master"):
        if variant.params == "bf16-master":
            masters = [p.detach().clone() for p in model.parameters()]  # the fp32 init, before rounding
        model.to(torch.bfloat16)
        notes.append(PARAM_NOTES[variant.params])
    model.train()
    return model, notes, masters


# One prepared optimizer step: its micro-batches on the device, their label counts, the step's label count.
DeviceStep = tuple[list[dict[str, Any]], list[int], int]


class TrainerSteps:
    """The steps of bioscale's rows: ``bioscale.train.step.train_step``, the trainer's own step (accumulation with
    gradient sync on the last micro-batch, global label-count normalisation, clipping, non-finite skipping, the FP8
    scale refresh of FSDP2's FP8 all-gather), under the variant's :class:`ParallelPlan`, with the trainer's scheduler.

    Like the trainer, the model checks the values of its inputs on the first step only (a host sync per forward).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, *, plan: ParallelPlan, task: str,
                 device: torch.device, args: argparse.Namespace) -> None:  # fmt: skip
        self.model, self.optimizer, self.plan, self.task, self.device = model, optimizer, plan, task, device
        self.scheduler = lr_scheduler(optimizer, args)
        self.max_grad_norm = args.max_grad_norm or None  # 0: no clipping
        self.state = TrainState()

    def __call__(self, step: DeviceStep) -> tuple[float, float | None]:
        micro, _, step_labels = step
        validate = self.state.step == 0
        result: StepResult = train_step(
            self.model,
            self.optimizer,
            self.scheduler,
            micro,
            state=self.state,
            loss_fn=self._loss,
            num_label_tokens=step_labels,
            device=self.device,
            max_grad_norm=self.max_grad_norm,
            forward_context=lambda _: self._forward(validate),
            fp8_all_gather=self.plan.fp8_all_gather,
        )
        return result.loss, result.grad_norm if self.max_grad_norm is not None else None

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return model_loss(self.model, batch, task=self.task)  # the trainer's forward (masked-only LM head for MLM)

    @contextlib.contextmanager
    def _forward(self, validate: bool) -> Iterator[None]:
        with self.plan.autocast(self.device.type), input_validation(validate):
            yield


def stock_step(
    step: DeviceStep, *, loss_fn: Callable[[Any, int], torch.Tensor], optimizer: Any, autocast: Any,
    clip: Callable[[], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One step of the ``transformers`` baseline as its users write it, deliberately not bioscale's ``train_step``:
    each micro-batch's mean loss re-weighted by its label count and divided by the step's, clipping, the update (no
    skipping of non-finite steps). Returns the step's loss and gradient norm as tensors: no host sync."""
    micro, counts, step_labels = step
    step_loss: torch.Tensor | None = None
    for batch, count in zip(micro, counts):
        with autocast:
            loss_sum = loss_fn(batch, count)
        (loss_sum / step_labels).backward()
        detached = loss_sum.detach().float()
        step_loss = detached if step_loss is None else step_loss + detached
    grad_norm = clip() if clip is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert step_loss is not None, "a step without micro-batches"
    return step_loss / step_labels, grad_norm


class StockSteps:
    """The ``hf_padded`` rows' steps: :func:`stock_step` at :func:`lr_at`'s learning rate, set by hand each step."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, *, plan: ParallelPlan, device: torch.device,
                 args: argparse.Namespace, bf16_only: bool = False) -> None:  # fmt: skip
        self.model, self.optimizer = model, optimizer
        self.autocast = plan.autocast(device.type)  # bf16 autocast over fp32 weights on GPU, as the trainer's
        if bf16_only:  # a reference published for bf16 only (AMPLIFY's bf16 attention mask): bf16 on CPU too
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.clip = (lambda: clip_grad_norm(model, args.max_grad_norm)) if args.max_grad_norm else None
        self.schedule = [lr_at(i, args) for i in range(args.warmup + args.steps)]
        self.index = 0

    def _loss(self, batch: dict[str, Any], num_labels: int) -> torch.Tensor:
        return self.model(**batch).loss * num_labels  # transformers returns the mean over the labels

    def __call__(self, step: DeviceStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Steps after the run (the profiled ones) keep the last learning rate.
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule[min(self.index, len(self.schedule) - 1)]
        self.index += 1
        return stock_step(step, loss_fn=self._loss, optimizer=self.optimizer, autocast=self.autocast, clip=self.clip)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled code of earlier models would count against the recompile limit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_steps(
    plans: Sequence[StepPlan], case: ModelCase, variant: VariantSpec, device: torch.device
) -> list[DeviceStep]:
    """Every step's micro-batches, built and moved to ``device`` before the timing starts."""
    packed = variant.name.startswith("packed")
    steps = []
    for plan in plans:
        micro = (
            [packed_batch(pack, case, variant.cu_pad) for pack in plan.packs]
            if packed
            else padded_batches(plan.sequences, case)
        )
        counts = [int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro]
        micro = [_to_device(mb, device) for mb in micro]
        if packed:
            for mb in micro:
                # The number of sequences per micro-batch changes every step; without this hint the blocks
                # would compile a second time, for a dynamic cu_seqlens length, after the first new value.
                torch._dynamo.maybe_mark_dynamic(mb["cu_seq_lens_q"], 0)
                torch._dynamo.maybe_mark_dynamic(mb["cu_seq_lens_k"], 0)
        steps.append((micro, counts, sum(counts)))
    return steps


def time_steps(
    run_step: Callable[[DeviceStep], tuple[Any, Any]], steps: Sequence[DeviceStep], *, warmup: int,
    device: torch.device, quant_stats: Any = None, stats_step_offset: int = 0,
) -> tuple[list[float], list[float], float]:  # fmt: skip
    """Run ``steps`` through ``run_step``; returns the per-step losses and gradient norms (when clipping) and the
    seconds of all but the first ``warmup`` steps."""
    losses, grad_norms = [], []
    timed_start = 0.0
    for index, step in enumerate(steps):
        if index == warmup:
            _synchronize(device)
            timed_start = time.perf_counter()
        if quant_stats is not None:
            quant_stats.begin_step(index + 1 + stats_step_offset)
        loss, grad_norm = run_step(step)
        if quant_stats is not None:
            quant_stats.end_step(index + 1 + stats_step_offset)
        losses.append(loss)
        if grad_norm is not None:
            grad_norms.append(grad_norm)
    _synchronize(device)
    elapsed = time.perf_counter() - timed_start
    return [float(x) for x in losses], [float(x) for x in grad_norms], elapsed


def run_variant(
    case: ModelCase,
    variant: VariantSpec,
    plans: Sequence[StepPlan],
    *,
    warmup: int,
    device: torch.device,
    args: argparse.Namespace,
) -> Result:
    """Train ``warmup + len(plans) - warmup`` steps of ``variant``; time all but the warm-up steps.

    bioscale's variants step through :class:`TrainerSteps` (the trainer's ``train_step`` and precision plan), the
    ``transformers`` baseline through :class:`StockSteps` (a stock loop).
    """
    result = Result(case.label, variant.label)
    start = time.perf_counter()
    packed = variant.name.startswith("packed")
    task = "causal_lm" if case.data == "dna" else "masked_lm"
    _free_memory(device)
    model = optimizer = None
    attention_impl = contextlib.ExitStack()
    process_group = contextlib.ExitStack()  # closed after the model is gone
    try:
        if variant.params == "fsdp":
            process_group.enter_context(one_rank_process_group(device))
        attention_impl.enter_context(flash_attention_impl(variant.attn_impl))
        plan = variant_plan(variant, device)
        model, notes, masters = build_variant_model(case, variant, device, args)
        result.notes = "; ".join(notes)
        optimizer = build_optimizer(model, masters, device, args)
        del masters
        steps = device_steps(plans, case, variant, device)
        quant_stats = None
        stats_step_offset = 0
        if variant.quant_stats_freq:
            # Attached before the first forward, as the trainer does; its cost is part of the timed steps.
            slug = re.sub(r"[^A-Za-z0-9_]+", "-", case.label)
            stats_step_offset = quant_stats_step_offset(warmup, variant.quant_stats_freq)
            stats_dir = args.out_dir / f"quant_stats-{slug}-every{variant.quant_stats_freq}"
            quant_stats = QuantStats(model, freq=variant.quant_stats_freq, output_dir=stats_dir)
            notes.append(f"quant stats every {variant.quant_stats_freq} steps -> {stats_dir.name}/")
            result.notes = "; ".join(notes)
        if variant.name in STOCK_VARIANTS:
            run_step: Any = StockSteps(
                model, optimizer, plan=plan, device=device, args=args, bf16_only=variant.name == "ref_padded"
            )
        else:
            run_step = TrainerSteps(model, optimizer, plan=plan, task=task, device=device, args=args)
        result.losses, result.grad_norms, elapsed = time_steps(
            run_step, steps, warmup=warmup, device=device, quant_stats=quant_stats, stats_step_offset=stats_step_offset
        )
        if quant_stats is not None:
            quant_stats.close()
        if args.profile and device.type == "cuda":
            step_ms = elapsed * 1e3 / (len(steps) - warmup)
            result.profile, result.profile_categories = profile_kernels(
                run_step, steps[-min(3, len(steps)) :], device, step_ms=step_ms
            )
        result.first_loss, result.final_loss = result.losses[0], result.losses[-1]

        timed = plans[warmup:]
        real = [len(e) for plan in timed for e in plan.sequences]
        computed = sum(
            (case.tokens * len(plan.packs))
            if packed
            else sum(b["input_ids"].numel() for b in padded_batches(plan.sequences, case))
            for plan in timed
        )
        num_real = float(sum(real))
        seq_len = float(sum(n * n for n in real)) / max(num_real, 1.0)  # token-weighted mean length (attention)
        flops_per_token = get_model_spec(case.family).flops_per_token(_model_config(case, "sdpa"), seq_len)
        result.num_timed_steps = len(timed)
        result.tokens_per_s = num_real / elapsed
        result.step_ms = 1e3 * elapsed / len(timed)
        if device.type == "cuda":  # MFU against GPU peaks means nothing for a CPU smoke test
            result.mfu_peak = flops_per_token * result.tokens_per_s / PEAK_BF16_FLOPS
            result.mfu_gemm = flops_per_token * result.tokens_per_s / MEASURED_GEMM_FLOPS
        result.pad_share = 1.0 - num_real / computed
        result.real_tokens_per_step = num_real / len(timed)
        if device.type == "cuda":
            result.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.OutOfMemoryError:
        result.status = "OOM"
        if device.type == "cuda":
            result.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as exc:  # noqa: BLE001  (one failing variant must not cost the rest of the table)
        traceback.print_exc()
        result.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        attention_impl.close()
        set_input_validation(True)
        del model, optimizer
        _free_memory(device)
        process_group.close()
    result.seconds = time.perf_counter() - start
    return result


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm as the trainer does (``bioscale.train.step.clip_grad_norm``); returns the norm
    before clipping as a plain fp32 tensor (also under FSDP2, whose norm is a DTensor). For ``params=bf16-master`` the
    bf16 gradients are clipped before the optimizer casts them."""
    return trainer_clip_grad_norm(model, max_norm).detach().float()


# Kernel families for the profile's breakdown, first match wins. Attention comes first because FlashAttention's
# names contain "cutlass"; activations before copies because Inductor names fused kernels after every op
# (``triton_poi_fused__to_copy_add_div_erf_...`` is a GELU).
KERNEL_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|attn", re.IGNORECASE)),
    ("GEMM", re.compile(r"nvjet|gemm|cutlass|xmma|scaled_mm|triton_mm|cublas|wgmma", re.IGNORECASE)),
    ("optimizer", re.compile(r"multi_tensor_apply|fusedopti|adam", re.IGNORECASE)),
    ("norm", re.compile(r"layer_norm|rms_?norm|rsqrt", re.IGNORECASE)),
    ("activation", re.compile(r"erf|gelu|silu|sigmoid", re.IGNORECASE)),
    ("FP8 scaling", re.compile(r"amax|float8|fp8|e4m3|e5m2", re.IGNORECASE)),
    ("copy / cast", re.compile(r"copy|cast|cat_|stack", re.IGNORECASE)),
)


# Kernels listed per profiled variant: enough to reach the elementwise kernels (norms, casts, bias-gradient sums)
# below the big GEMM and attention entries, which is where the remaining step time is.
PROFILE_TOP_KERNELS = 30


def kernel_category(name: str) -> str:
    """The family a CUDA kernel belongs to (:data:`KERNEL_CATEGORIES`), ``other`` when none matches."""
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def summarize_kernels(times_us: Mapping[str, float], num_steps: int, wall_ms_per_step: float) -> list[dict[str, Any]]:
    """Per-family ms/step and share of the (timed) wall step; ``GPU idle`` is the step time no kernel covered (launch
    gaps, host work, syncs; kernels are assumed not to overlap, true of our one-stream steps)."""
    per_category: dict[str, float] = {}
    for name, time_us in times_us.items():
        category = kernel_category(name)
        per_category[category] = per_category.get(category, 0.0) + time_us / 1e3 / num_steps
    rows = sorted(per_category.items(), key=lambda item: item[1], reverse=True)
    rows.append(("GPU idle", max(0.0, wall_ms_per_step - sum(per_category.values()))))
    return [{"category": c, "ms_per_step": ms, "share": ms / wall_ms_per_step} for c, ms in rows]


def profile_steps(
    steps: Sequence[Any],
    loss_fn: Any,
    optimizer: Any,
    autocast: Any,
    device: torch.device,
    clip: Callable[[], Any] | None,
    step_ms: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`profile_kernels` of :func:`stock_step` over ``steps`` (``clip`` before each optimizer step)."""
    run_step = partial(stock_step, loss_fn=loss_fn, optimizer=optimizer, autocast=autocast, clip=clip)
    return profile_kernels(run_step, steps, device, step_ms=step_ms)


def profile_kernels(
    run_step: Callable[[Any], Any], steps: Sequence[Any], device: torch.device, *, step_ms: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The top CUDA kernels of a few more steps (run as the timed ones, through ``run_step``), with their share of
    the GPU time, and the time per kernel family (:func:`summarize_kernels`) against ``step_ms``, the timed steps'
    mean: the profiler's own host overhead would inflate a wall time measured under it."""
    from torch.profiler import ProfilerActivity, profile

    # CPU activity off CUDA only so that the function runs (and is tested) there: it records no device time.
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    # BENCH_PROFILE_CPU=1: also the host's costliest operators (what the GPU waits for when "GPU idle" is large).
    host = os.environ.get("BENCH_PROFILE_CPU") == "1" and device.type == "cuda"
    with profile(activities=[activity, ProfilerActivity.CPU] if host else [activity]) as prof:
        for step in steps:
            run_step(step)
        _synchronize(device)
    if host:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70),
              file=sys.stderr, flush=True)  # fmt: skip
    events = [e for e in prof.key_averages() if _device_time(e) > 0]
    total = sum(_device_time(e) for e in events)
    events.sort(key=_device_time, reverse=True)
    top = [
        {
            "kernel": e.key[:110],
            "family": kernel_category(e.key),
            "calls_per_step": e.count / len(steps),
            "ms_per_step": _device_time(e) / 1e3 / len(steps),
            "share": _device_time(e) / total,
        }
        for e in events[:PROFILE_TOP_KERNELS]
    ]
    categories = summarize_kernels({e.key: _device_time(e) for e in events}, len(steps), step_ms)
    return top, categories


def _device_time(event: Any) -> float:
    # Renamed from *_cuda_time_total to *_device_time_total in torch 2.4+; self time avoids double counting.
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


# ---- the report ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def render_table(results: Sequence[Result]) -> str:
    baseline: dict[str, float | None] = {}  # the model's first stock row (hf_padded or ref_padded) is "1x"
    for r in results:
        if r.variant in STOCK_VARIANTS and r.status == "ok":
            baseline.setdefault(r.model, r.tokens_per_s)
    lines = [
        (
            "| model | variant | tokens/s (unpadded) | vs stock | step ms | MFU (989) | MFU (789 GEMM) | peak GB | pad % "
            "| final loss | notes |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(
                f"| {r.model} | {r.variant} | {r.status} | | | | | {_fmt(r.peak_mem_gb, '.1f')} | | | {r.notes} |"
            )
            continue
        speedup = r.tokens_per_s / baseline[r.model] if r.model in baseline and r.tokens_per_s else None
        lines.append(
            f"| {r.model} | {r.variant} | {_fmt(r.tokens_per_s, ',.0f')} | {_fmt(speedup, '.2f')}{'×' if speedup else ''} "
            f"| {_fmt(r.step_ms, '.1f')} | {_pct(r.mfu_peak)} | {_pct(r.mfu_gemm)} | {_fmt(r.peak_mem_gb, '.1f')} "
            f"| {_fmt(100 * r.pad_share if r.pad_share is not None else None, '.0f')} | {_fmt(r.final_loss, '.4f')} "
            f"| {r.notes} |"
        )
    return "\n".join(lines)


def render_profiles(results: Sequence[Result]) -> str:
    sections = []
    for r in results:
        if not r.profile:
            continue
        rows = [f"#### {r.model} / {r.variant}", ""]
        if r.profile_categories:
            rows += ["| kernel family | ms/step | share of the step |", "|---|---:|---:|"]
            rows += [
                f"| {c['category']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f}% |" for c in r.profile_categories
            ]
            rows.append("")
        rows += ["| kernel | family | calls/step | ms/step | share |", "|---|---|---:|---:|---:|"]
        rows += [
            f"| `{p['kernel']}` | {p.get('family', kernel_category(p['kernel']))} | {p.get('calls_per_step', 0):g} "
            f"| {p['ms_per_step']:.2f} | {100 * p['share']:.1f}% |"
            for p in r.profile
        ]
        sections.append("\n".join(rows))
    return "\n\n".join(sections)


def find_spikes(losses: Sequence[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR) -> list[int]:
    """Steps (0-based) whose loss exceeds ``factor`` x the mean loss of the ``window`` steps before them (a non-finite
    loss counts as a spike); the first ``window`` steps have no such mean and are never flagged."""
    values = np.asarray(losses, dtype=np.float64)
    spikes = []
    for step in range(window, len(values)):
        if not np.isfinite(values[step]) or values[step] > factor * values[step - window : step].mean():
            spikes.append(step)
    return spikes


def compare_losses(reference: Sequence[float], other: Sequence[float], tail: int) -> dict[str, float]:
    """``other`` against ``reference`` over their last ``tail`` steps: both means, the relative difference of the
    means, and the largest per-step absolute difference (the curves must track step by step, not only on average)."""
    if len(reference) != len(other):
        raise ValueError(f"loss curves of {len(reference)} and {len(other)} steps cannot be compared step by step")
    ref_tail = np.asarray(reference[-tail:], dtype=np.float64)
    other_tail = np.asarray(other[-tail:], dtype=np.float64)
    ref_mean, other_mean = float(ref_tail.mean()), float(other_tail.mean())
    return {
        "reference_mean": ref_mean,
        "mean": other_mean,
        "relative_difference": (other_mean - ref_mean) / ref_mean,
        "max_abs_step_difference": float(np.abs(other_tail - ref_tail).max()),
    }


def _spike_text(losses: Sequence[float]) -> str:
    spikes = find_spikes(losses)
    if not spikes:
        return "no spike"
    shown = ", ".join(f"{step} ({losses[step]:.2f})" for step in spikes[:8])
    return f"{len(spikes)} spike step(s): {shown}{', ...' if len(spikes) > 8 else ''}"


def render_loss_compare(results: Sequence[Result], tail: int) -> str:
    """Per model: every variant's last-``tail``-step mean loss against the ``packed`` row (or the first), the relative
    difference, the largest per-step difference over those steps, and each run's loss spikes (:func:`find_spikes`)."""
    lines = [
        f"Spike: a step loss > {SPIKE_FACTOR} x the mean of the {SPIKE_WINDOW} steps before it (step index, loss).",
        "",
    ]
    by_model: dict[str, list[Result]] = {}
    for r in results:
        if r.status == "ok" and r.losses:
            by_model.setdefault(r.model, []).append(r)
    for model, rows in by_model.items():
        reference = next((r for r in rows if r.variant == "packed"), rows[0])
        ref_tail = float(np.mean(reference.losses[-tail:]))
        lines.append(
            f"- {model}: mean loss over the last {tail} steps, {reference.variant}: {ref_tail:.4f}; "
            f"{_spike_text(reference.losses)}"
        )
        for r in rows:
            if r is reference:
                continue
            if len(r.losses) != len(reference.losses):
                lines.append(f"  - {r.variant}: {len(r.losses)} steps, not {len(reference.losses)}: not compared")
                continue
            stats = compare_losses(reference.losses, r.losses, tail)
            lines.append(
                f"  - {r.variant}: {stats['mean']:.4f} ({100 * stats['relative_difference']:+.2f}% vs "
                f"{reference.variant}); largest per-step |difference| over those steps "
                f"{stats['max_abs_step_difference']:.4f}; {_spike_text(r.losses)}"
            )
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})",
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = "not installed"
    return info


def write_report(
    results: Sequence[Result], cases: Sequence[ModelCase], args: argparse.Namespace, out_dir: Path, env: dict[str, str]
) -> Path:
    """``<out_dir>/<date>-<gpu>.md`` and ``.json``; rows of an earlier call (``--merge``) are kept unless re-run."""
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    stem = f"{env['date']}-{gpu_slug}" + ("-loss-compare" if args.loss_compare_steps else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in results]
    commands = [" ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_train.py", *args.argv])]
    cases_info = {c.label: {**dataclasses.asdict(c), "key": c.label} for c in cases}
    if args.merge and Path(args.merge).exists():
        earlier = json.loads(Path(args.merge).read_text())
        done = {(r["model"], r["variant"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["model"], r["variant"]) not in done] + rows
        commands = earlier.get("commands", []) + commands
        cases_info = {**earlier.get("cases", {}), **cases_info}
    payload = {"environment": env, "commands": commands, "cases": cases_info, "settings": _settings(args), "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    all_results = [Result(**r) for r in rows]
    order = {key: i for i, key in enumerate(MODEL_CASES)}
    all_results.sort(key=lambda r: (order.get(r.model.split(":")[0], 99), VARIANTS.index(r.variant.split("[")[0])))
    md = [
        f"# Training throughput, {env['gpu']}, {env['date']}",
        "",
        (
            f"torch {env['torch']}, transformers {env['transformers']}, torchao {env['torchao']}, "
            f"CUDA {env['cuda']}, Python {env['python']}."
        ),
        "",
        "Commands (from the repository root):",
        "",
        "```bash",
        *commands,
        "```",
        "",
        (
            "Real UniRef90 / OpenGenome2 sequences from `../shared/data` (lengths as they come; with `split` packing a "
            "sequence that overflows a micro-batch is cut and continues in the next); every variant trains the "
            "same steps (same sequences, masks and initial weights). tokens/s counts unpadded tokens; MFU uses the model "
            "spec's training FLOPs per token at the token-weighted mean length, against 989 TFLOP/s (H100 SXM dense bf16) "
            "and 789 TFLOP/s (bf16 GEMM rate measured on the lent H100). `pad %` is the share of computed positions that "
            "are padding. Weights: fp32 + bf16 autocast unless the variant says `params=bf16` (bf16 weights and bf16 AdamW "
            "states, no fp32 master), `params=bf16-master` (bf16 weights, fp32 master weights and AdamW states) or "
            "`params=fsdp` (FSDP2 on one rank: bf16 compute over fp32 sharded weights and AdamW states). "
            f"Settings: {json.dumps(_settings(args))}."
        ),
        "",
        (
            "| model | mb (padded) | tokens / packed micro-batch | micro-batches / step | AC (bioscale) | max length "
            "| packing |"
        ),
        "|---|---:|---:|---:|---|---:|---|",
        *[
            f"| {c['key']} | {c['mb']} | {c['tokens']} | {c['grad_acc']} | {c['ac']} | {c['max_length']} "
            f"| {c.get('packing', 'greedy')} |"
            for c in cases_info.values()
        ],
        "",
        render_table(all_results),
    ]
    if args.loss_compare_steps:
        md += [
            "",
            "## Loss comparison",
            "",
            f"Schedule: {describe_schedule(args)}.",
            "",
            render_loss_compare(all_results, max(1, args.loss_compare_steps // 10)),
        ]
    profiles = render_profiles(all_results)
    if profiles:
        md += ["", "## Top kernels (3 profiled steps after the timed ones)", "", profiles]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def describe_schedule(args: argparse.Namespace) -> str:
    total = args.warmup + args.steps
    text = f"peak lr {args.lr:g}"
    if args.lr_warmup_steps:
        text += f", linear warm-up over {args.lr_warmup_steps} steps"
    if args.lr_min_ratio != 1.0:
        text += f", linear decay to {args.lr_min_ratio:g} x peak at step {total}"
    if not args.lr_warmup_steps and args.lr_min_ratio == 1.0:
        text += " (constant)"
    clip = f"clipped to {args.max_grad_norm:g}" if args.max_grad_norm else "not clipped"
    return f"{text}; gradient norm {clip}"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "warmup": args.warmup,
        "steps": args.steps,
        "lr": args.lr,
        "lr_warmup_steps": args.lr_warmup_steps,
        "lr_min_ratio": args.lr_min_ratio,
        "max_grad_norm": args.max_grad_norm,
        "param_dtype": args.param_dtype,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "seed": args.seed,
        "loss_compare_steps": args.loss_compare_steps,
    }


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated; {', '.join(MODEL_CASES)}; per-model options as "
        "name:tokens=16384:mb=8:ac=selective:grad_acc=1:packing=split; or a suite: "
        f"{', '.join('@' + k for k in MODEL_SUITES)}",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated; hf_padded, padded, packed, packed_fp8[:recipe=rowwise:min_features=4096"
        ":layers=1-30]; any of them [:params=bf16|bf16-master], bioscale ones "
        "[:params=fsdp] [:compile=<torch.compile mode>]",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation happens here)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up + 2 timed steps, small data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        choices=("on", "off", "auto"),
        default="auto",
        help="per-block torch.compile of the bioscale variants (auto: on for CUDA)",
    )
    parser.add_argument(
        "--param-dtype",
        choices=PARAM_DTYPES,
        default="fp32",
        help="default weights/optimizer of every variant: fp32 weights with bf16 autocast (the "
        "trainer's single-GPU setting); bf16 weights and bf16 AdamW states (no master copy); "
        "bf16 weights with fp32 master weights and AdamW states",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the blocks, e.g. max-autotune-no-cudagraphs (GEMM epilogue "
        "fusion) or reduce-overhead (CUDA graphs); default: torch's default",
    )
    parser.add_argument("--fp8-recipe", choices=("tensorwise", "rowwise"), default="tensorwise")
    parser.add_argument("--fp8-layers", default=None, help="1-indexed blocks for FP8, e.g. '2-32' (default: all)")
    parser.add_argument(
        "--fp8-min-features", type=int, default=0, help="keep linears whose narrower side is below this in bf16"
    )
    parser.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    parser.add_argument(
        "--lr-warmup-steps",
        "--lr-warmup",
        dest="lr_warmup_steps",
        type=int,
        default=None,
        help="linear lr warm-up steps (default: 10%% of --loss-compare-steps when given, else --warmup)",
    )
    parser.add_argument(
        "--lr-min-ratio",
        type=float,
        default=None,
        help="after the warm-up, decay the lr linearly to this x peak at the last step (ESM-2: 0.1; "
        "default: 0.1 with --loss-compare-steps, else 1, a constant lr)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clip the gradient norm to this, 0 for off (default: 1.0, the trainer's)",
    )
    parser.add_argument(
        "--loss-compare-steps",
        type=int,
        default=0,
        help="train this many steps in all (warm-up included) and compare the variants' losses",
    )
    parser.add_argument("--profile", action="store_true", help="profile 3 extra steps per variant (top CUDA kernels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--reference-dir",
        type=Path,
        default=DEFAULT_REFERENCE_DIR,
        help="folder of the published reference implementations for the ref_padded rows (default: "
        "$BIOSCALE_REFERENCE_DIR or ../shared/reference)",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--merge", default=None, help="a results .json of an earlier call whose rows to keep")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no variant that would likely end after this many seconds (its row says skipped)",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the report
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.loss_compare_steps:
        # Every step's loss is recorded; the first few (compilation) are only left out of the throughput.
        args.warmup = min(args.warmup, max(1, args.loss_compare_steps // 10))
        args.steps = args.loss_compare_steps - args.warmup
    if args.steps < 1 or args.warmup < 0 or args.loss_compare_steps < 0 or args.loss_compare_steps == 1:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    # A loss comparison follows the trainer's ESM-2 recipe. Throughput runs warm the lr up over the untimed steps,
    # then keep it constant; both clip at the trainer's 1.0, so timed steps pay for the norm as training does.
    # The final-loss column of a 15-step run at a constant 4e-4 is a coarse check only: ESM-2 rows agree to ~0.1%,
    # but Llama 3 1B spikes (loss 13.8 at step 2 in every variant, identically for 7 steps, then chaotically apart:
    # final 2.3-2.7, H100 2026-11-22). With --loss-compare-steps 40 (decay) its variants agree to 0.05%.
    compare = bool(args.loss_compare_steps)
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = args.loss_compare_steps // 10 if compare else args.warmup
    if args.lr_min_ratio is None:
        args.lr_min_ratio = 0.1 if compare else 1.0
    if args.max_grad_norm is None:
        args.max_grad_norm = 1.0
    if args.lr_warmup_steps < 0 or not 0.0 <= args.lr_min_ratio <= 1.0 or args.max_grad_norm < 0:
        parser.error("--lr-warmup-steps and --max-grad-norm must be >= 0, --lr-min-ratio in [0, 1]")
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = [parse_model(text) for text in expand_models(args.models)]
        variants = [parse_variant(text, args) for text in args.variants.split(",") if text]
    except ValueError as exc:
        print(f"bench_train: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index on torch 2.11
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left over (none in the bf16 paths)
    env = environment()
    print(
        f"# {env['gpu']} | torch {env['torch']} | transformers {env['transformers']} | torchao {env['torchao']}",
        flush=True,
    )
    results: list[Result] = []
    examples_cache: dict[tuple[str, int, str], list[Example]] = {}
    started = time.perf_counter()
    for case in cases:
        key = (case.data, case.max_length, case.tokenizer)
        if key not in examples_cache:
            limit = 400 if args.quick else None
            examples_cache[key] = load_examples(
                case.data, case.max_length, args.data_dir, seed=args.seed, limit=limit, tokenizer_kind=case.tokenizer
            )
        examples = examples_cache[key]
        plans = plan_steps(examples, case, args.warmup + args.steps)
        longest = 0.0  # the slowest variant of this model so far: the estimate for the next one
        for variant in variants:
            missing = missing_baseline(case, variant)
            if missing:  # e.g. the default variant list on AMPLIFY, which has no stock transformers class
                print(f"[{time.strftime('%H:%M:%S')}] {case.label} / {variant.label}: not run, {missing}", flush=True)
                continue
            elapsed = time.perf_counter() - started
            if args.time_budget_s is not None and elapsed + max(longest, 60.0) > args.time_budget_s:
                results.append(Result(case.label, variant.label, status="skipped (time budget)"))
                print(
                    f"[{time.strftime('%H:%M:%S')}] {case.label} / {variant.label}: skipped, {elapsed:.0f} s used of "
                    f"--time-budget-s {args.time_budget_s:.0f}",
                    flush=True,
                )
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {case.label} / {variant.label} ...", flush=True)
            result = run_variant(case, variant, plans, warmup=args.warmup, device=device, args=args)
            longest = max(longest, result.seconds or 0.0)
            results.append(result)
            print(
                f"    {result.status}: {_fmt(result.tokens_per_s, ',.0f')} tok/s, {_fmt(result.step_ms, '.1f')} ms/step, "
                f"MFU {_pct(result.mfu_peak)}, "
                f"peak {_fmt(result.peak_mem_gb, '.1f')} GB, loss {_fmt(result.first_loss, '.4f')} -> "
                f"{_fmt(result.final_loss, '.4f')} ({result.seconds:.0f} s) {result.notes}",
                flush=True,
            )
            # Rewritten after every variant, so a call that runs out of time still leaves its numbers behind.
            path = write_report(results, cases, args, args.out_dir, env)
    print()
    print(render_table(results))
    if args.loss_compare_steps:
        print()
        print(f"Schedule: {describe_schedule(args)}.")
        print(render_loss_compare(results, max(1, args.loss_compare_steps // 10)))
    if args.profile:
        print()
        print(render_profiles(results))
    path = write_report(results, cases, args, args.out_dir, env)
    print(f"\nwritten: {path}")
    return 0 if all(r.status == "ok" or r.status == "OOM" or r.status.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
