"""The training loop, in one function that reads top to bottom: ``train(cfg) -> summary``.

setup (process group from torchrun's environment, the run directory locked and owned, seeds, the parallel plan) →
model on ``meta`` → FP8 conversion → parallelize (context parallelism → activation checkpointing → per-block compile
→ FSDP2) → materialise (``to_empty`` + ``init_weights``, or weights from ``model.init_from``) → DDP / Megatron-FSDP →
AdamW + schedule → data → resume from the newest intact (verified) checkpoint → loop
(:func:`bioscale.train.step.train_step`: gradient accumulation with communication only on the last micro-batch, loss
normalised by the global number of label tokens, clipping,
skip-and-count of non-finite steps; then metrics, checkpoints, profiling) → final export → summary.

Everything reusable lives in the library: the strategy decision and the ``apply_*`` functions in
``bioscale.distributed`` (:func:`~bioscale.distributed.plan_parallelism`, :func:`~bioscale.distributed.parallelize`,
:class:`~bioscale.distributed.ContextParallel`), the step in ``bioscale.train.step`` (shared with fine-tuning and
``benchmarks/bench_train.py``), checkpoints, metrics and profiling beside it. This file only composes them; one
``ExitStack`` owns what must be undone however the run ends (flash kernels, profiler, metrics, process group).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from bioscale.data import build_dataloader, count_tokens, get_policy_stats, get_tokenizer, rows_and_rest
from bioscale.data.images import (
    IMAGE_OBJECTIVE,
    build_image_dataloader,
    image_label_config,
    image_processor_for,
    open_training_images,
)
from bioscale.distributed import (
    ContextParallel,
    ParallelPlan,
    all_reduce_sum,
    apply_data_parallel,
    barrier,
    destroy_distributed,
    init_distributed,
    parallelize,
    plan_parallelism,
    unwrap_model,
    wants_one_rank_group,
)
from bioscale.distributed.megatron_fsdp import MegatronFSDPState, shard_optimizer
from bioscale.models import build_config, build_model, get_model_spec, input_validation
from bioscale.models.flash_impl import AUTO as FLASH_AUTO
from bioscale.models.flash_impl import active_flash_impl, fastest_flash_impl, flash_impl
from bioscale.precision import apply_fp8, attach_quant_stats, check_fp8_hardware
from bioscale.train.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    JsonState,
    ModelOptimizerState,
    RunLock,
    get_rng_state,
    on_rank0,
    set_rng_state,
)
from bioscale.train.config import (
    TrainConfig,
    config_to_yaml,
    ignored_settings,
    resolve_paths,
    resume_refusals,
    resume_report,
    validate_config,
)
from bioscale.train.compile_cache import compile_counters, use_compile_cache
from bioscale.train.export import export_final_model
from bioscale.train.memory import (
    MicroBatchPlan,
    choose_activation_checkpointing,
    device_memory_bytes,
    plan_micro_batches,
)
from bioscale.train.metrics import (
    MetricsLogger,
    compute_mfu,
    effective_seq_len,
    gpu_peak_flops,
    peak_memory_gb,
    perplexity,
)
from bioscale.train.optimizer import build_optimizer
from bioscale.train.profiling import StepProfiler
from bioscale.train.schedulers import build_lr_scheduler
from bioscale.train.step import LaunchedStep, StepResult, TrainState, launch_step, model_loss, num_label_tokens

logger = logging.getLogger(__name__)

# Training objective (data) -> model head (models registry).
TASK_FOR_OBJECTIVE = {"mlm": "masked_lm", "clm": "causal_lm", IMAGE_OBJECTIVE: "image_classification"}
# What a run writes into its run directory besides checkpoints: moved aside with another run's checkpoints
# (checkpoint.move_aside_other_runs=true), so a fresh run never overwrites them either.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "tensorboard", "quant_stats.jsonl", "profile")

__all__ = ["TASK_FOR_OBJECTIVE", "NonFiniteLossError", "TrainState", "model_loss", "train"]


class NonFiniteLossError(RuntimeError):
    """Raised after ``nan_tolerance`` consecutive steps with a non-finite loss or gradient norm."""


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; return the run summary (also written to ``<run_dir>/summary.json``).

    Launch under ``torchrun --nproc_per_node=N`` for data parallelism; a plain process trains on one device.

    Raises:
        ValueError: an invalid configuration or input (message names the key or file), a run directory in use by
            another process or holding another run's checkpoints, a checkpoint to resume that differs in its model
            or data configuration, or no intact checkpoint to resume.
        OSError: a file or folder that is missing or cannot be written (a checkpoint that cannot be written raises
            ``CheckpointWriteError``, naming the folder; earlier checkpoints stay intact).
        NonFiniteLossError: ``nan_tolerance`` consecutive non-finite steps, or final weights that are not finite
            (the last good checkpoint is kept; no ``final_model`` is written from non-finite weights).
    """
    validate_config(cfg)
    resolve_paths(cfg)  # for configs built in Python rather than by load_config
    run_start = time.perf_counter()  # the time to the first step counts set-up, model build and compile
    with contextlib.ExitStack() as resources:
        # ---- 1. Setup: process group (NCCL on GPU, gloo on CPU), run directory, seeds, the parallel plan --------
        resources.callback(destroy_distributed)  # registered first: torn down last
        one_rank_group = wants_one_rank_group(
            cfg.parallelism.strategy, single_gpu_fsdp=cfg.parallelism.single_gpu_fsdp, dtype=cfg.dtype
        )
        dist_info = init_distributed(cfg.device, single_gpu_group=one_rank_group)
        rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
        run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.checkpoint.ckpt_dir)
        attention_impl = _flash_impl_to_activate(cfg, device)
        if attention_impl is not None:  # before any model code runs: compiled graphs keep the kernel they traced
            resources.enter_context(flash_impl(attention_impl))
        # The run directory is this run's: one process at a time (a lock with its PID and host), and a fresh run
        # refuses, or moves aside, another run's checkpoints instead of overwriting them. Rank 0 decides for all.
        run_lock = RunLock(run_dir, ckpt_dir)
        on_rank0(rank, partial(_claim_run_directory, run_dir, run_lock))
        resources.callback(run_lock.release)
        checkpointer = CheckpointManager(
            ckpt_dir, rank=rank, keep_last_n=cfg.checkpoint.keep_last_n, async_save=cfg.checkpoint.async_save
        )
        if not cfg.checkpoint.resume_from_checkpoint:
            on_rank0(rank, partial(checkpointer.start_fresh, move_aside=cfg.checkpoint.move_aside_other_runs,
                                   run_files=[run_dir / name for name in RUN_FILES]))  # fmt: skip
        # The ranks as (dp_replicate, dp_shard, cp): each group of cp_size consecutive ranks splits the sequences of
        # one data stream; data parallelism runs across the groups, and FSDP2 shards over dp_shard x cp.
        cp = ContextParallel(
            cfg.parallelism.cp_size, device.type, rank=rank, world_size=world_size, dp_replicate=cfg.parallelism.dp_replicate
        )
        # The same seed on every rank: DDP starts from rank 0's weights anyway, and FSDP2's sharded init draws from
        # one stream. Per-rank streams (dropout) are seeded after init.
        _seed_everything(cfg.seed)
        plan = _plan(cfg, device, world_size=world_size, is_distributed=dist_info.is_distributed)
        if dist_info.is_main:
            for note in ignored_settings(cfg, world_size=world_size, device_type=device.type):
                logger.warning("%s", note)  # a value the run will not use is said, never dropped silently

        # ---- 2. Model on meta: no memory, no init cost, whatever the size ------------------------------------------
        spec = get_model_spec(cfg.model.name)
        overrides = dict(cfg.model.overrides)
        if cfg.model.attn_backend is not None:
            overrides["attn_backend"] = cfg.model.attn_backend
        images = open_training_images(cfg.data) if cfg.data.objective == IMAGE_OBJECTIVE else None
        if images is not None:  # an image classifier has the data's classes (class folders / label column)
            overrides.update(image_label_config(images.classes, overrides, source=cfg.data.source))
        model_config = build_config(cfg.model.name, cfg.model.size, **overrides)
        task = TASK_FOR_OBJECTIVE[cfg.data.objective]
        model = build_model(model_config, task=task, device="meta")
        num_params = sum(p.numel() for p in model.parameters())
        logger.info("model %s/%s (%s, %.1fM parameters), %d rank(s) on %s", cfg.model.name, cfg.model.size,
                    type(model).__name__, num_params / 1e6, world_size, device)  # fmt: skip

        # ---- 3. Converters (before parallelize: FSDP2 must shard the converted modules) ----------------------------
        if cfg.fp8.enabled:
            _check_fp8_device(device)
            apply_fp8(model, recipe=cfg.fp8.recipe, layers=cfg.fp8.layers, modules=cfg.fp8.modules,
                      fsdp_float8_all_gather=plan.fp8_all_gather)  # fmt: skip

        # ---- 4. Parallelize, in torchtitan's order: (TP) → CP → activation checkpointing → compile → FSDP2 -----------
        # Packed micro-batches keep their shape stable enough for automatic dynamic shapes (see _to_device); padded
        # ones change [B, S] every step, so their blocks compile for dynamic shapes from the start; images have one.
        # micro_batching=auto re-splits the step's tokens for this GPU (the resolved values are the run's config:
        # checkpoints record them and a resume compares them); then activation checkpointing, planned with it.
        cfg, micro_plan = _micro_batching(cfg, model_config, num_params, device=device, plan=plan,
                                          is_main=dist_info.is_main)  # fmt: skip
        run_config = OmegaConf.to_container(OmegaConf.structured(cfg))
        if micro_plan is not None and cfg.activation_checkpointing.mode == "auto":
            ac_mode = micro_plan.activation_checkpointing
        else:
            ac_mode = _activation_checkpointing_mode(cfg, model_config, num_params, device=device, plan=plan,
                                                     is_main=dist_info.is_main)  # fmt: skip
        compile_cache = use_compile_cache(cfg.compile.cache_dir) if cfg.compile.enabled else None
        if compile_cache is not None and dist_info.is_main:
            logger.info("torch.compile cache: %s (a second run of this recipe reuses its graphs)", compile_cache)
        parallelize(
            model,
            plan,
            cp=cp,
            activation_checkpointing=ac_mode,
            compile_blocks=cfg.compile.enabled,
            compile_dynamic=None if cfg.data.use_sequence_packing or images is not None else True,
            compile_presets=list(cfg.compile.presets),
            reshard_after_forward=cfg.parallelism.reshard_after_forward,
            prefetch=cfg.parallelism.prefetch,
        )

        # ---- 5. Materialise (each rank only its shards) and initialise, then DDP / Megatron-FSDP -------------------
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
        if cfg.model.init_from is not None:
            _load_pretrained_weights(model, cfg.model.init_from)
        model = apply_data_parallel(model, plan, device=device)
        model.train()
        _seed_everything(cfg.seed + rank)
        quant_stats = None
        if cfg.quant_stats.enabled:  # hooks on the materialised FP8 layers, before the first (compiled) forward
            quant_stats = attach_quant_stats(model, run_dir=run_dir, freq=cfg.quant_stats.freq, rank=rank)

        # ---- 6. Optimizer and learning-rate schedule ----------------------------------------------------------------
        opt = cfg.optimizer
        optimizer = build_optimizer(model, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                    fused=opt.fused, device=device)  # fmt: skip
        if plan.use_mfsdp:
            optimizer = shard_optimizer(optimizer)
        scheduler = build_lr_scheduler(optimizer, kind=cfg.scheduler.kind, warmup_steps=cfg.scheduler.warmup_steps,
                                       total_steps=cfg.num_train_steps,
                                       min_lr_ratio=cfg.scheduler.min_lr_ratio)  # fmt: skip

        # ---- 7. Data: an endless, resumable stream of micro-batches for this data-parallel rank -------------------
        if images is not None:  # augmented images; the image processor is what the export saves as the "tokenizer"
            tokenizer = image_processor_for(model_config.image_size, cfg.data.image)
            # uint8 pixels from the workers, normalised on the device (a quarter of the bytes through the loader)
            loader = build_image_dataloader(cfg.data, image_size=model_config.image_size, rank=cp.dp_rank,
                                            world_size=cp.dp_size, source=images, normalize=False)  # fmt: skip
            model_inputs = loader.model_inputs
        else:
            tokenizer = get_tokenizer(cfg.data.tokenizer)
            _check_vocabulary(tokenizer, model_config)
            loader = build_dataloader(cfg.data, tokenizer, rank=cp.dp_rank, world_size=cp.dp_size)
            model_inputs = None
        pad_token_id = getattr(tokenizer, "pad_token_id", None)  # None for images (nothing is padded)

        # ---- 8. Resume from the newest intact checkpoint (verified against its manifest; older ones if damaged) ---
        state = TrainState()
        stateful = _checkpoint_contents(model, optimizer, scheduler, state, loader, rank=rank, plan=plan)
        config_hparams = _optimizer_hyperparameters(optimizer)
        resumed: CheckpointInfo | None = None
        if cfg.checkpoint.resume_from_checkpoint:
            resumed = checkpointer.resume(
                stateful, accept=partial(_check_resumable, run_config=run_config, world_size=world_size)
            )
        if resumed is not None:
            assert state.step == resumed.step, (state.step, resumed.step)
            # The checkpoint restored the moments, the step count and the data position; lr, betas, weight decay
            # and the schedule follow this run's config (docs/training.md, "Resume with changed settings").
            _follow_config_hyperparameters(optimizer, scheduler, config_hparams)
            logger.info("resumed from %s (step %d, run %s)", resumed.path, resumed.step, resumed.run_id)
            if dist_info.is_main:
                for line in resume_report(resumed.config, run_config, checkpoint=resumed.path.name):
                    logger.warning("%s", line)
        resumed_from = resumed.step if resumed is not None else None
        checkpointer.remove_stale_tmp()
        if dist_info.is_main:  # after the resume decision: a refused resume leaves the run's config.yaml as it was
            (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        skipped_at_checkpoint = state.num_skipped_steps  # non-finite steps since the last checkpoint mark the next
        data_iter = iter(loader)
        metrics = _metrics_logger(cfg, run_dir, enabled=dist_info.is_main, start_step=state.step)
        resources.callback(metrics.close, plot=False)  # a no-op after the close of a finished run
        prof = cfg.profiler
        profiler = StepProfiler(enabled=prof.enabled, mode=prof.mode, start_step=prof.start_step,
                                end_step=prof.end_step, run_dir=run_dir, rank=rank, device=device)  # fmt: skip
        resources.callback(profiler.close)
        flops_per_token, peak_flops = partial(spec.flops_per_token, model_config), gpu_peak_flops(device)
        window = _Window()
        last_record: dict[str, Any] = {}
        start_time = time.perf_counter()
        first_step = state.step + 1
        timing = _RunTiming(run_start, first_step=first_step, last_step=cfg.num_train_steps)

        # ---- 9. The loop ------------------------------------------------------------------------------------------
        # A step's numbers (loss, gradient norm) are read one step late: the host queues step N, then reads step
        # N-1's (the step's one sync) while the GPU runs N, then loads step N+1's data, so the GPU does not idle on
        # the host's work. Steps the loop acts on at once (the first, logged, checkpointed and last ones) are read as
        # soon as they are queued.
        queued: collections.deque[tuple[LaunchedStep, _StepData, float]] = collections.deque()
        last_read = start_time
        while state.step < cfg.num_train_steps:
            step = state.step + 1
            profiler.step_begin(step)
            if quant_stats is not None:
                quant_stats.begin_step(step)
            step_start = time.perf_counter()
            with profiler.range(f"step_{step}"):
                with profiler.range("data"):
                    data = _next_micro_batches(data_iter, cfg, cp, task=task, pad_token_id=pad_token_id,
                                               device=device, model_inputs=model_inputs)  # fmt: skip
                # The model's value checks of its inputs cost a host sync per forward: the run's first step checks
                # the data pipeline's batches, later steps trust it.
                forward = partial(_forward_context, model, plan, cp, data.cp_layouts, device_type=device.type,
                                  validate=step == first_step)  # fmt: skip
                launched = launch_step(
                    model,
                    optimizer,
                    scheduler,
                    data.micro_batches,
                    state=state,
                    loss_fn=lambda batch: model_loss(model, batch, task=task),
                    num_label_tokens=data.num_label_tokens,
                    device=device,
                    max_grad_norm=cfg.max_grad_norm,
                    forward_context=forward,
                    fp8_all_gather=plan.fp8_all_gather,
                    profile_range=profiler.range,
                )
            assert state.step == step, (state.step, step)
            profiler.step_end(step)
            if quant_stats is not None:
                quant_stats.end_step(step)
            queued.append((launched, data, step_start))
            acts_now = step in (first_step, cfg.num_train_steps) or step % cfg.logging.log_every_n_steps == 0 or (
                cfg.checkpoint.save_every_n_steps > 0 and step % cfg.checkpoint.save_every_n_steps == 0
            )
            while len(queued) > 1 or (queued and acts_now):
                finished, finished_data, queued_at = queued.popleft()
                result = finished.finish(state)
                # Queued behind the step before it, a step's time is from that one's end to its own.
                now = time.perf_counter()
                step_time, last_read = now - max(queued_at, last_read), now
                if state.num_consecutive_bad_steps >= cfg.nan_tolerance:
                    _stop_after_bad_steps(checkpointer, state, nan_tolerance=cfg.nan_tolerance, step=finished.step)

                # Token counts are of this rank's data stream; a CP group shares one stream, so each of its ranks
                # counts 1/cp_size of it (summed over ranks at log time, every token counts once).
                window.add(result, finished_data, cp_share=1.0 / cfg.parallelism.cp_size, step_time=step_time)
                timing.add(finished.step, num_real_tokens=finished_data.num_real_tokens / cfg.parallelism.cp_size,
                           step_time=step_time)  # fmt: skip
                metrics.advance(finished.step)
                if finished.step != step:  # read late: logging and checkpoints wait for the step they name
                    continue
                if step % cfg.logging.log_every_n_steps == 0 or step == cfg.num_train_steps:
                    last_record = _log_record(window, result, state, world_size=world_size, device=device,
                                              flops_per_token=flops_per_token, peak_flops=peak_flops)  # fmt: skip
                    if cfg.compile.enabled:  # a slow window with more graphs than the last one was a recompile
                        last_record["graphs_compiled"] = compile_counters()["graphs_compiled"]
                    metrics.log(last_record)
                    window = _Window()
                if cfg.checkpoint.save_every_n_steps and (
                    step % cfg.checkpoint.save_every_n_steps == 0 or step == cfg.num_train_steps
                ):
                    if _save_checkpoint(checkpointer, stateful, model, step=step, device=device, config=run_config,
                                        non_finite_steps=state.num_skipped_steps - skipped_at_checkpoint):  # fmt: skip
                        skipped_at_checkpoint = state.num_skipped_steps
        assert not queued, "every queued step is read by the last one"

        # ---- 10. Final export and summary ---------------------------------------------------------------------------
        checkpointer.close()
        if quant_stats is not None:
            quant_stats.close()
        wall_time = time.perf_counter() - start_time
        if cfg.checkpoint.save_final_model:
            if not _weights_are_finite(model, device):
                latest = checkpointer.latest()
                raise NonFiniteLossError(
                    f"the final weights hold non-finite values, so {ckpt_dir / 'final_model'} was not written; "
                    f"last good checkpoint: {latest[1] if latest else 'none'}"
                )
            export_final_model(model, model_config=model_config, task=task, tokenizer=tokenizer,
                               out_dir=ckpt_dir / "final_model", hf_out_dir=ckpt_dir / "final_model_hf",
                               is_main=dist_info.is_main)  # fmt: skip
        plot_path = metrics.close()
        summary = _summary(cfg, plan, state, num_params=num_params, device=device, resumed_from=resumed_from,
                           last_record=last_record, wall_time=wall_time, loader=loader,
                           plot_path=plot_path, run_id=checkpointer.run_id)  # fmt: skip
        summary.update(timing.summary(), activation_checkpointing=ac_mode)
        if micro_plan is not None:
            summary.update(micro_batching=dataclasses.asdict(micro_plan))
        if cfg.compile.enabled:
            summary.update(compile_cache_dir=str(compile_cache) if compile_cache else None, compile=compile_counters())
        wrong_modality = (summary["data_policy"] or {}).get("wrong_modality", 0)
        if wrong_modality and dist_info.is_main:
            logger.warning("%d record(s) looked like another modality than the %r tokenizer's (counted as "
                           "data_policy.wrong_modality in summary.json; data.unknown_residues=error refuses them)",
                           wrong_modality, cfg.data.tokenizer)  # fmt: skip
        if dist_info.is_main:
            (run_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
            logger.info("done: %d steps, final loss %s, summary in %s", state.step, summary["final_loss"],
                        run_dir / "summary.json")  # fmt: skip
        barrier()
        return summary


# ---- helpers that keep the loop above readable ----------------------------------------------------------------------


def _plan(cfg: TrainConfig, device: torch.device, *, world_size: int, is_distributed: bool) -> ParallelPlan:
    """The run's :class:`ParallelPlan`, from the config keys that decide it."""
    return plan_parallelism(
        strategy=cfg.parallelism.strategy,
        dtype=cfg.dtype,
        device_type=device.type,
        world_size=world_size,
        is_distributed=is_distributed,
        single_gpu_fsdp=cfg.parallelism.single_gpu_fsdp,
        reduce_dtype=cfg.parallelism.reduce_dtype,
        fp32_master_weights=cfg.parallelism.fp32_master_weights,
        fp8=cfg.fp8.enabled,
        fp8_recipe=cfg.fp8.recipe,
        cp_size=cfg.parallelism.cp_size,
        dp_replicate=cfg.parallelism.dp_replicate,
    )


class _StepData(NamedTuple):
    """One step's micro-batches on the device, with what the metrics need from them before they were sharded."""

    micro_batches: list[dict[str, Any]]
    cp_layouts: list[Any]
    num_label_tokens: int  # this rank's loss terms (after CP sharding)
    num_tokens: int  # this rank's data stream (before CP sharding), padding included
    num_real_tokens: int
    seq_len_sq_sum: float


def _next_micro_batches(
    data_iter: Iterator[dict[str, Any]], cfg: TrainConfig, cp: ContextParallel, *, task: str, pad_token_id: int,
    device: torch.device, model_inputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> _StepData:  # fmt: skip
    """The step's ``grad_acc_steps`` micro-batches: counted, sharded for CP (labels shifted before the split for
    CLM), uniform packs laid out as rows (``data.dense_uniform_packs``), label tokens counted on the host, then moved
    to ``device`` and finished there by ``model_inputs`` (images: uint8 pixels normalised on the GPU)."""
    micro_batches = [next(data_iter) for _ in range(cfg.grad_acc_steps)]
    counts = [count_tokens(batch, pad_token_id=pad_token_id) for batch in micro_batches]
    seq_len_sq_sum = sum(_sum_sq_seq_lens(b, c) for b, c in zip(micro_batches, counts))
    micro_batches, cp_layouts = cp.shard(micro_batches, causal=task == "causal_lm", pad_token_id=pad_token_id)
    if cfg.data.use_sequence_packing and cfg.data.dense_uniform_packs and cfg.parallelism.cp_size == 1:
        # Counted above as packed; runs as the same sequences in rows (dense attention, one static shape), a pack
        # with a few shorter sequences as those rows plus a packed micro-batch of the rest (same summed loss).
        micro_batches = [piece for batch in micro_batches for piece in rows_and_rest(
            batch, max_tokens=cfg.data.max_tokens_per_batch, pad_token_id=pad_token_id,
            multiple=cfg.data.pad_to_multiple_of or 1)]  # fmt: skip
        cp_layouts = [None] * len(micro_batches)  # no CP here
    local_labels = sum(num_label_tokens(batch) for batch in micro_batches)
    micro_batches = [
        _to_device(b, device, compiled=cfg.compile.enabled, max_seq_length=cfg.data.max_seq_length) for b in micro_batches
    ]
    if model_inputs is not None:
        micro_batches = [model_inputs(b) for b in micro_batches]
    return _StepData(
        micro_batches,
        cp_layouts,
        local_labels,
        sum(c["num_tokens"] for c in counts),
        sum(c["num_real_tokens"] for c in counts),
        seq_len_sq_sum,
    )


@contextlib.contextmanager
def _forward_context(
    model: nn.Module, plan: ParallelPlan, cp: ContextParallel, layouts: list[Any], index: int, *, device_type: str,
    validate: bool,
) -> Iterator[None]:  # fmt: skip
    """Micro-batch ``index``'s forward: the plan's autocast, this rank's CP plan, the model's input checks."""
    with plan.autocast(device_type), cp.forward(model, layouts[index]), input_validation(validate):
        yield


def _micro_batch_items(cfg: TrainConfig, model_config: Any) -> tuple[int, int, int, int]:
    """The micro-batch as ``(items, tokens per item, fewest items, item multiple)``: packed batches count tokens (at
    least one whole sequence, a multiple of 16 so the token budget stays aligned), padded ones sequences, images
    images (``(image_size / patch_size)^2`` patches plus the class and register tokens each)."""
    data = cfg.data
    if data.objective == IMAGE_OBJECTIVE:
        patches = (model_config.image_size // model_config.patch_size) ** 2
        return data.micro_batch_size, patches + 1 + getattr(model_config, "num_register_tokens", 0), 1, 1
    if data.use_sequence_packing:
        return data.max_tokens_per_batch, 1, data.max_seq_length, 16
    return data.micro_batch_size, data.max_seq_length, 1, 1


def _micro_batching(
    cfg: TrainConfig, model_config: Any, num_params: int, *, device: torch.device, plan: ParallelPlan, is_main: bool
) -> tuple[TrainConfig, MicroBatchPlan | None]:
    """``micro_batching=auto``: the config with the step's items (micro-batch x ``grad_acc_steps``) split into the
    fewest micro-batches whose predicted peak fits this GPU (:func:`bioscale.train.memory.plan_micro_batches`), and
    the plan; ``fixed``, or no CUDA device to plan for: the config as given and ``None``."""
    if cfg.micro_batching != "auto":
        return cfg, None
    memory = device_memory_bytes(device)
    num_layers = getattr(model_config, "num_hidden_layers", None)
    hidden_size = getattr(model_config, "hidden_size", None)
    if memory is None or not num_layers or not hidden_size:
        if is_main:
            logger.info("micro_batching=auto keeps the recipe's micro-batches off CUDA (no GPU memory to plan for)")
        return cfg, None
    items, tokens_per_item, fewest, multiple = _micro_batch_items(cfg, model_config)
    shard_ranks = plan.world_size // plan.dp_replicate if (plan.use_fsdp or plan.use_mfsdp) else 1
    micro_plan = plan_micro_batches(
        num_params=num_params, num_layers=num_layers, hidden_size=hidden_size,
        items_per_step=items * cfg.grad_acc_steps, tokens_per_item=tokens_per_item,
        min_items_per_micro_batch=min(fewest, items), device_memory_bytes=memory, shard_ranks=shard_ranks,
        activation_checkpointing=cfg.activation_checkpointing.mode,
        item_multiple=multiple if items % multiple == 0 else 1,
    )  # fmt: skip
    if is_main:
        logger.info("%s", micro_plan.describe())
    key = "max_tokens_per_batch" if cfg.data.use_sequence_packing and cfg.data.objective != IMAGE_OBJECTIVE else (
        "micro_batch_size")  # fmt: skip
    data = dataclasses.replace(cfg.data, **{key: micro_plan.items_per_micro_batch})
    return dataclasses.replace(cfg, data=data, grad_acc_steps=micro_plan.grad_acc_steps), micro_plan


def _activation_checkpointing_mode(
    cfg: TrainConfig, model_config: Any, num_params: int, *, device: torch.device, plan: ParallelPlan, is_main: bool
) -> str:
    """``activation_checkpointing.mode`` as the run applies it: ``auto`` resolved by
    :func:`bioscale.train.memory.choose_activation_checkpointing` from the model, the micro-batch and this GPU's free
    memory (``none`` off CUDA); any other mode as given."""
    mode = cfg.activation_checkpointing.mode
    if mode != "auto":
        return mode
    memory = device_memory_bytes(device)
    num_layers = getattr(model_config, "num_hidden_layers", None)
    hidden_size = getattr(model_config, "hidden_size", None)
    if memory is None or not num_layers or not hidden_size:
        return "none"
    items, tokens_per_item, _fewest, _multiple = _micro_batch_items(cfg, model_config)
    tokens = items * tokens_per_item
    shard_ranks = plan.world_size // plan.dp_replicate if (plan.use_fsdp or plan.use_mfsdp) else 1
    memory_plan = choose_activation_checkpointing(num_params=num_params, num_layers=num_layers,
                                                  hidden_size=hidden_size, tokens_per_micro_batch=tokens,
                                                  device_memory_bytes=memory, shard_ranks=shard_ranks)  # fmt: skip
    if is_main:
        logger.info("%s", memory_plan.describe())
    return memory_plan.mode


class _RunTiming:
    """The two numbers a user waits on, kept apart in ``summary.json``: the time from ``train()`` to the end of the
    first optimizer step (set-up, data start, compile, first step), and the steady-state rate: this rank's real
    (non-padding) tokens per second over the steps after the first fifth of the run (at least 2, at most 20 steps
    left out; all steps when the run is too short to leave any out)."""

    def __init__(self, run_start: float, *, first_step: int, last_step: int) -> None:
        self.run_start = run_start
        self.first_step = first_step
        num_steps = max(last_step - first_step + 1, 0)
        skip = min(20, max(2, num_steps // 5))
        self.steady_from = first_step + (skip if num_steps > skip else 0)
        self.time_to_first_step: float | None = None
        self.steady_tokens = 0.0
        self.steady_time = 0.0

    def add(self, step: int, *, num_real_tokens: float, step_time: float) -> None:
        if step == self.first_step:
            self.time_to_first_step = time.perf_counter() - self.run_start
        if step >= self.steady_from:
            self.steady_tokens += num_real_tokens
            self.steady_time += step_time

    def summary(self) -> dict[str, Any]:
        return {
            "time_to_first_step_s": self.time_to_first_step,
            "steady_state_from_step": self.steady_from,
            "steady_real_tokens_per_sec_per_gpu": self.steady_tokens / self.steady_time if self.steady_time else None,
        }


class _Window:
    """Sums over the steps since the last log line: global loss and label count, this rank's tokens and time."""

    def __init__(self) -> None:
        self.weighted_loss = 0.0
        self.finite_labels = 0.0
        self.num_label_tokens = 0.0
        self.num_tokens = 0.0
        self.num_real_tokens = 0.0
        self.seq_len_sq_sum = 0.0
        self.time = 0.0
        self.steps = 0

    def add(self, result: StepResult, data: _StepData, *, cp_share: float, step_time: float) -> None:
        # A skipped step's loss is left out of the mean; its tokens still took the time.
        if math.isfinite(result.loss):
            self.weighted_loss += result.loss * result.num_label_tokens
            self.finite_labels += result.num_label_tokens
        self.num_label_tokens += result.num_label_tokens
        self.num_tokens += cp_share * data.num_tokens
        self.num_real_tokens += cp_share * data.num_real_tokens
        self.seq_len_sq_sum += cp_share * data.seq_len_sq_sum
        self.time += step_time
        self.steps += 1

    def mean_loss(self) -> float:
        """Label-token-weighted mean loss of the window's finite steps (the step's loss when logging every step)."""
        return self.weighted_loss / self.finite_labels if self.finite_labels else math.nan


def _log_record(
    window: _Window, last: StepResult, state: TrainState, *, world_size: int, flops_per_token: Any,
    peak_flops: float | None, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """The metrics line of a logged step: the window's mean loss, the last step's norm and lr, throughput summed
    over ranks (one all-reduce) and divided per GPU, MFU at the window's effective sequence length."""
    totals = all_reduce_sum(
        torch.tensor(
            [window.num_tokens, window.num_real_tokens, window.seq_len_sq_sum], dtype=torch.float64, device=device
        )
    ).tolist()
    tokens_per_sec = totals[0] / world_size / window.time
    real_tokens_per_sec = totals[1] / world_size / window.time
    seq_len = effective_seq_len(totals[2], totals[1])
    return {
        "step": state.step,
        "loss": window.mean_loss(),
        "perplexity": perplexity(window.mean_loss()),
        "grad_norm": last.grad_norm,
        "lr": last.lr,
        "step_time": window.time / window.steps,
        "tokens_per_sec_per_gpu": tokens_per_sec,
        "real_tokens_per_sec_per_gpu": real_tokens_per_sec,
        "mfu": compute_mfu(flops_per_token(seq_len), real_tokens_per_sec, peak_flops),
        "peak_mem_gb": peak_memory_gb(device),
        "num_label_tokens": int(window.num_label_tokens),
        "effective_seq_len": seq_len,
        "num_skipped_steps": state.num_skipped_steps,
    }


def _metrics_logger(cfg: TrainConfig, run_dir: Path, *, enabled: bool, start_step: int) -> MetricsLogger:
    return MetricsLogger(
        run_dir,
        enabled=enabled,
        total_steps=cfg.num_train_steps,
        start_step=start_step,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        progress_bar=cfg.logging.progress_bar,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )


def _flash_impl_to_activate(cfg: TrainConfig, device: torch.device) -> str | None:
    """``model.flash_impl`` resolved for this run: the implementation to activate, or ``None`` for torch's own (FA2).
    ``auto`` picks on CUDA only (:func:`bioscale.models.flash_impl.fastest_flash_impl`) and says what it chose."""
    name = cfg.model.flash_impl
    if name is None:
        return None
    if name == FLASH_AUTO:
        if device.type != "cuda":
            return None
        chosen, why = fastest_flash_impl(causal_training=TASK_FOR_OBJECTIVE[cfg.data.objective] == "causal_lm")
        logger.info("model.flash_impl=auto: %s (%s)", chosen, why)
        return None if chosen == "FA2" else chosen
    if device.type != "cuda":
        raise ValueError(f"model.flash_impl={name} needs a CUDA device; this run is on {device}")
    return name


def _summary(
    cfg: TrainConfig,
    plan: ParallelPlan,
    state: TrainState,
    *,
    num_params: int,
    device: torch.device,
    resumed_from: int | None,
    last_record: dict[str, Any],
    wall_time: float,
    loader: Any,
    plot_path: Path | None,
    run_id: str,
) -> dict[str, Any]:
    """The run summary (``summary.json``): what ran, how the loss went, the last logged throughput, where things are."""
    run_dir, ckpt_dir = Path(cfg.run_dir), Path(cfg.checkpoint.ckpt_dir)
    exported = cfg.checkpoint.save_final_model
    return {
        "model": f"{cfg.model.name}/{cfg.model.size}",
        "num_parameters": num_params,
        "world_size": plan.world_size,
        "device": str(device),
        "strategy": plan.name,
        "cp_size": cfg.parallelism.cp_size,
        "flash_impl": active_flash_impl() if device.type == "cuda" else None,  # what model.flash_impl resolved to
        "num_train_steps": cfg.num_train_steps,
        "final_step": state.step,
        "resumed_from_step": resumed_from,
        "run_id": run_id,
        "first_loss": state.first_loss,
        "final_loss": last_record.get("loss"),
        "min_loss": state.min_loss,
        "num_skipped_steps": state.num_skipped_steps,
        "wall_time_s": wall_time,
        "tokens_per_sec_per_gpu": last_record.get("tokens_per_sec_per_gpu"),
        "real_tokens_per_sec_per_gpu": last_record.get("real_tokens_per_sec_per_gpu"),
        "mfu": last_record.get("mfu"),
        "peak_mem_gb": peak_memory_gb(device),
        "data_policy": _policy_stats(loader),
        "run_dir": str(run_dir),
        "metrics": str(run_dir / "metrics.jsonl"),
        "plot": str(plot_path) if plot_path else None,
        "final_model": str(ckpt_dir / "final_model") if exported else None,
        # None where no stock transformers class holds the model (ModelSpec.hf_unsupported: a ViT with registers)
        "final_model_hf": str(ckpt_dir / "final_model_hf") if exported and (ckpt_dir / "final_model_hf").is_dir()
        else None,
    }


def _checkpoint_contents(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    loader: Any,
    *,
    rank: int,
    plan: ParallelPlan,
) -> dict[str, Stateful]:
    """What a checkpoint holds, as ``Stateful`` objects: model + optimizer (sharded as the model is), the train state
    and the schedule (where the run is), and per rank its RNG streams and its position in its shard of the data."""
    model_optim = MegatronFSDPState(model, optimizer) if plan.use_mfsdp else ModelOptimizerState(model, optimizer)
    return {
        "model_optim": model_optim,  # tensors, through DCP
        "train_state": JsonState("train_state", get=state.state_dict, set=state.load_state_dict),  # JSON files
        "scheduler": JsonState("scheduler", get=scheduler.state_dict, set=scheduler.load_state_dict),
        "rank": JsonState("rank", get=partial(_get_rank_state, loader), set=partial(_set_rank_state, loader),
                          per_rank=True),  # fmt: skip
    }


def _get_rank_state(loader: Any) -> dict[str, Any]:
    return {"rng": get_rng_state(), "dataloader": loader.state_dict()}


def _set_rank_state(loader: Any, saved: dict[str, Any]) -> None:
    set_rng_state(saved["rng"])
    loader.load_state_dict(saved["dataloader"])


def _claim_run_directory(run_dir: Path, run_lock: RunLock) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lock.acquire()


def _check_resumable(info: CheckpointInfo, *, run_config: dict[str, Any], world_size: int) -> None:
    """Refuse (``ValueError``) a checkpoint this run cannot continue: another number of ranks (the data-loader
    positions are per rank), or another model or data configuration (listing every differing key)."""
    if info.world_size is not None and info.world_size != world_size:
        raise ValueError(
            f"checkpoint {info.path} was written by {info.world_size} rank(s) but this run has {world_size}: the "
            "data-loader positions are per rank, so resume with the same number of ranks"
        )
    refused = resume_refusals(info.config, run_config)
    if refused:
        raise ValueError(
            f"checkpoint {info.path} was written with another model or data configuration ({'; '.join(refused)}): "
            "resuming it would load weights of another shape or continue another data stream. Resume with the "
            "checkpoint's values, or start a fresh run in another checkpoint.ckpt_dir"
        )


def _optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters (lr, betas, eps, weight decay, ...) as this run's config set them."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def _follow_config_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: Any, hyperparameters: list[dict[str, Any]]
) -> None:
    """After a resume: put back this run's optimizer hyper-parameters (the checkpoint's param groups replaced them),
    make the config's lr the schedule's peak, and set the lr the schedule gives at the restored step.

    With an unchanged config this reproduces the saved values exactly (the same ``base * multiplier(step)`` that
    ``LambdaLR`` computed), so an exact resume stays bit-identical.
    """
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _weights_are_finite(model: nn.Module, device: torch.device) -> bool:
    """Every rank's shard of every parameter is finite (one all-reduce)."""
    count = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor's shard
            count += (~torch.isfinite(local)).sum().to(device)
    return int(all_reduce_sum(count)) == 0


def _save_checkpoint(
    checkpointer: CheckpointManager, stateful: dict[str, Stateful], model: nn.Module, *, step: int,
    device: torch.device, non_finite_steps: int, config: dict[str, Any],
) -> bool:  # fmt: skip
    """Write the checkpoint of ``step``, except from non-finite weights (then the newer checkpoint would only
    replace a good one); returns whether it was written. Non-finite steps since the last one are recorded in it."""
    if not _weights_are_finite(model, device):
        latest = checkpointer.latest()
        logger.error("step %d: the weights hold non-finite values: no checkpoint written (the last good one, %s, is "
                     "kept)", step, latest[1] if latest else "none")  # fmt: skip
        return False
    checkpointer.save(step, stateful, non_finite_steps=non_finite_steps, config=config)
    return True


def _stop_after_bad_steps(
    checkpointer: CheckpointManager, state: TrainState, *, nan_tolerance: int, step: int
) -> None:
    checkpointer.close()
    latest = checkpointer.latest()
    raise NonFiniteLossError(
        f"{state.num_consecutive_bad_steps} consecutive steps (up to step {step}) had a non-finite loss "
        f"or gradient norm (nan_tolerance={nan_tolerance}); stopping. Last good checkpoint: "
        f"{latest[1] if latest else 'none'}. Lower optimizer.lr, raise scheduler.warmup_steps or check "
        "the data, then resume with checkpoint.resume_from_checkpoint=true."
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device, *, compiled: bool, max_seq_length: int) -> dict[str, Any]:
    """Move a micro-batch to ``device``; under ``torch.compile`` also keep a packed batch's metadata shape-stable.

    A packed batch's ``max_length_q/k`` is a Python int that changes every step and would make the compiled blocks
    recompile until Dynamo gives up specialising it; the flash varlen kernel only needs an upper bound, so it is fixed
    at ``max_seq_length`` (never below the real one). ``cu_seq_lens_q/k`` change length with the number of
    sequences: marking that dimension dynamic saves the recompile that automatic dynamic shapes would cost.
    """
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if compiled and "cu_seq_lens_q" in batch:
        for key in ("max_length_q", "max_length_k"):
            if key in batch:
                batch[key] = max(int(batch[key]), max_seq_length)
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if key in batch:
                torch._dynamo.maybe_mark_dynamic(batch[key], 0)
    return batch


def _sum_sq_seq_lens(batch: dict[str, Any], counts: dict[str, int]) -> float:
    """``sum(L_i^2)`` over the real sequences of a micro-batch (for the attention FLOPs in MFU)."""
    if "cu_seq_lens_q" in batch:
        # A packed batch's padding, if any, is one extra segment at the end.
        lengths = batch["cu_seq_lens_q"].diff()[: counts["num_sequences"]]
    elif batch.get("attention_mask") is not None:
        lengths = batch["attention_mask"].sum(dim=-1)
    elif "input_ids" not in batch:  # images: one "token" each (count_tokens)
        lengths = torch.ones(counts["num_sequences"])
    else:
        ids = batch["input_ids"]
        lengths = torch.full((ids.shape[0],), ids.shape[-1])
    return float((lengths.double() ** 2).sum())


def _load_pretrained_weights(model: nn.Module, path: str) -> None:
    """Copy the weights of a ``save_pretrained`` folder into the (possibly sharded) ``model``."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.init_from={path!r}: no *.safetensors weights in that folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = set_model_state_dict(
        unwrap_model(model), state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"model.init_from={path!r} does not match the configured model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def _check_fp8_device(device: torch.device) -> None:
    """A configuration error (``ValueError``, one line from the CLI) when this device cannot train in FP8."""
    if device.type != "cuda":
        raise ValueError(
            f"fp8.enabled=true needs an NVIDIA GPU with FP8 tensor cores (sm_89+: Ada, Hopper, Blackwell); "
            f"this run is on {device.type}. Set fp8.enabled=false (on a GPU, dtype=bf16 trains in bf16)."
        )
    try:
        check_fp8_hardware(device)
    except RuntimeError as err:
        raise ValueError(f"fp8.enabled=true: {err}") from err


def _check_vocabulary(tokenizer: Any, model_config: Any) -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"the {len(tokenizer)}-token tokenizer does not fit the model's vocab_size={model_config.vocab_size}; "
            f"set model.overrides.vocab_size={len(tokenizer)} (e.g. +model.overrides.vocab_size={len(tokenizer)})"
        )


def _policy_stats(loader: Any) -> Any:
    stats = get_policy_stats(loader)
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return stats


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
