"""The training loop, in one function that reads top to bottom: ``train(cfg) -> summary``.

setup (process group from torchrun's environment, run directory, seeds) → model on ``meta`` → FP8 conversion →
parallelize (context parallelism → activation checkpointing → per-block compile → FSDP2) → materialise (``to_empty`` + ``init_weights``, or
weights from ``model.init_from``) → DDP → AdamW + schedule → data → resume from the latest complete checkpoint → loop
(gradient accumulation with communication only on the last micro-batch, loss normalised by the global number of label
tokens, clipping, skip-and-count of non-finite steps, metrics, checkpoints, profiling) → final export → summary.

Everything reusable lives in the library (``bioscale.distributed``, ``bioscale.train.checkpoint``/``metrics``/...);
this file only composes it, so a reader sees the whole run on one screen per phase.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from bioscale.distributed import (
    all_reduce_sum,
    apply_ac,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    barrier,
    destroy_distributed,
    grad_sync,
    init_distributed,
    unwrap_model,
)
from bioscale.models.loss import IGNORE_INDEX
from bioscale.train.checkpoint import (
    COMPLETE_MARKER,
    CheckpointManager,
    ModelOptimizerState,
    PickledState,
    get_rng_state,
    set_rng_state,
)
from bioscale.train.config import TrainConfig, config_to_yaml, resolve_paths, validate_config
from bioscale.train.export import export_final_model
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

logger = logging.getLogger(__name__)

# Training objective (data) -> model head (models registry).
TASK_FOR_OBJECTIVE = {"mlm": "masked_lm", "clm": "causal_lm"}


class NonFiniteLossError(RuntimeError):
    """Raised after ``nan_tolerance`` consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    """Counters that survive a restart (checkpointed with the scheduler)."""

    step: int = 0
    num_skipped_steps: int = 0
    num_consecutive_bad_steps: int = 0
    first_loss: float | None = None
    min_loss: float | None = None


def model_loss(model: nn.Module, batch: dict[str, Any], *, task: str) -> torch.Tensor:
    """Sum of the token losses of one micro-batch (the caller divides by the global label count).

    ESM's LM head runs only at masked positions (``logits_on_labels_only``): same loss, ~85 % less head compute.
    """
    extra = {"logits_on_labels_only": True} if task == "masked_lm" else {}
    return model(**batch, loss_reduction="sum", **extra).loss


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; return the run summary (also written to ``<run_dir>/summary.json``).

    Launch under ``torchrun --nproc_per_node=N`` for data parallelism; a plain process trains on one device.

    Raises:
        ValueError: an invalid configuration or input (message names the key or file).
        NonFiniteLossError: ``nan_tolerance`` consecutive non-finite steps (the last good checkpoint is kept).
    """
    validate_config(cfg)
    resolve_paths(cfg)  # for configs built in Python rather than by load_config
    from bioscale.data import build_dataloader, count_tokens, get_policy_stats, get_tokenizer
    from bioscale.models import build_config, build_model, get_model_spec, input_validation

    # ---- 1. Setup: process group (NCCL on GPU, gloo on CPU), run directory, seeds --------------------------------
    # parallelism.single_gpu_fsdp: a single GPU with dtype=bf16 runs the sharded strategy over one rank (bf16 compute
    # over fp32 master weights, bf16 norms and residual stream) instead of autocast.
    sharded_strategy = cfg.parallelism.strategy in ("fsdp2", "mfsdp")
    single_gpu_sharded = sharded_strategy and cfg.parallelism.single_gpu_fsdp and cfg.dtype == "bf16"
    dist_info = init_distributed(cfg.device, single_gpu_group=single_gpu_sharded)
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    run_dir = Path(cfg.run_dir)
    ckpt_dir = Path(cfg.checkpoint.ckpt_dir)
    metrics: MetricsLogger | None = None
    profiler: StepProfiler | None = None
    flash_before: str | None = None
    try:
        if cfg.model.flash_impl is not None:
            # Before any model code runs: compiled graphs keep the kernel they traced.
            from bioscale.models.flash_impl import activate_flash_impl, active_flash_impl

            if device.type != "cuda":
                raise ValueError(
                    f"model.flash_impl={cfg.model.flash_impl} needs a CUDA device; this run is on {device}"
                )
            flash_before = active_flash_impl()
            activate_flash_impl(cfg.model.flash_impl)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        # The ranks as (dp_replicate, dp_shard, cp): context parallelism (cp_size > 1) lets each group of cp_size
        # consecutive ranks split the sequences of one data stream; data parallelism runs across the groups, and
        # FSDP2 shards over dp_shard x cp (HSDP: replicated across dp_replicate groups).
        cp = _ContextParallel(
            cfg.parallelism.cp_size, device, rank=rank, world_size=world_size, dp_replicate=cfg.parallelism.dp_replicate
        )
        # The same seed on every rank: DDP starts from rank 0's weights anyway, and FSDP2's sharded init draws from
        # one stream. Per-rank streams (dropout) are seeded after init.
        _seed_everything(cfg.seed)
        strategy = cfg.parallelism.strategy
        one_rank_sharded = single_gpu_sharded and dist_info.is_distributed and device.type == "cuda"
        use_fsdp = strategy == "fsdp2" and (world_size > 1 or one_rank_sharded)
        use_mfsdp = strategy == "mfsdp" and (world_size > 1 or one_rank_sharded)
        use_ddp = strategy == "ddp" and world_size > 1
        if strategy == "mfsdp":
            from bioscale.distributed.megatron_fsdp import (
                MegatronFSDPState,
                apply_megatron_fsdp,
                check_megatron_fsdp_available,
                shard_optimizer,
            )

            check_megatron_fsdp_available(device)
            if cfg.fp8.enabled:
                raise ValueError(
                    "parallelism.strategy=mfsdp does not support torchao FP8 (Megatron-FSDP quantises only "
                    "TransformerEngine parameters); use parallelism.strategy=fsdp2 with fp8_config.enabled=true"
                )
        if world_size == 1 and dist_info.is_distributed and not (use_fsdp or use_mfsdp):
            logger.info("one rank: parallelism.strategy=%s has nothing to shard or replicate; training unwrapped", strategy)
        # bf16 on GPU under FSDP2 / Megatron-FSDP: bf16 compute over fp32 master weights (the shards the optimizer
        # updates), unless parallelism.fp32_master_weights=false stores bf16 weights. Elsewhere (DDP, one process,
        # CPU) autocast does the casting; on CPU gloo's collectives lack bf16 support worth relying on, so the sharded
        # path stays fp32 there.
        bf16 = cfg.dtype == "bf16"
        sharded_bf16 = bf16 and (use_fsdp or use_mfsdp) and device.type == "cuda"
        fsdp_param_dtype = torch.bfloat16 if sharded_bf16 else None
        reduce_dtype = torch.float32 if cfg.parallelism.reduce_dtype == "fp32" else torch.bfloat16
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not sharded_bf16 else contextlib.nullcontext()
        )

        # ---- 2. Model on meta: no memory, no init cost, whatever the size ------------------------------------------
        spec = get_model_spec(cfg.model.name)
        overrides = dict(cfg.model.overrides)
        if cfg.model.attn_backend is not None:
            overrides["attn_backend"] = cfg.model.attn_backend
        model_config = build_config(cfg.model.name, cfg.model.size, **overrides)
        task = TASK_FOR_OBJECTIVE[cfg.data.objective]
        model = build_model(model_config, task=task, device="meta")
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "model %s/%s (%s, %.1fM parameters), %d rank(s) on %s",
            cfg.model.name,
            cfg.model.size,
            type(model).__name__,
            num_params / 1e6,
            world_size,
            device,
        )

        # ---- 3. Converters (before parallelize: FSDP2 must shard the converted modules) ----------------------------
        # Under FSDP2, tensorwise FP8 also all-gathers the weights in FP8 (half the traffic of bf16); their scales
        # are then refreshed once per step, after the optimizer, in a single all-reduce.
        fp8_all_gather = cfg.fp8.enabled and use_fsdp and cfg.fp8.recipe == "tensorwise"
        if cfg.fp8.enabled:
            from bioscale.precision.fp8 import apply_fp8, check_fp8_hardware, precompute_fp8_scales

            _check_fp8_device(check_fp8_hardware, device)
            apply_fp8(
                model,
                recipe=cfg.fp8.recipe,
                layers=cfg.fp8.layers,
                modules=cfg.fp8.modules,
                fsdp_float8_all_gather=fp8_all_gather,
            )

        # ---- 4. Parallelize, in torchtitan's order: (TP) → CP → activation checkpointing → compile → FSDP2 -----------
        cp.apply(model)
        apply_ac(model, cfg.activation_checkpointing.mode)
        if cfg.compile.enabled:
            # Packed micro-batches keep their shape stable enough for automatic dynamic shapes (see _to_device);
            # padded ones change [B, S] every step, so compile those blocks for dynamic shapes from the start.
            apply_compile(
                model, dynamic=None if cfg.data.use_sequence_packing else True, presets=list(cfg.compile.presets)
            )
        if use_fsdp:
            if sharded_bf16 and not cfg.parallelism.fp32_master_weights:
                model.to(dtype=torch.bfloat16)  # bf16 shards: no master copy (the optimizer updates bf16 weights)
            apply_fsdp(
                model,
                mesh=cp.fsdp_mesh,
                param_dtype=fsdp_param_dtype,
                reduce_dtype=reduce_dtype,
                reshard_after_forward=cfg.parallelism.reshard_after_forward,
                prefetch=cfg.parallelism.prefetch,
            )

        # ---- 5. Materialise: allocate on the device (each rank only its shards) and initialise ----------------------
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
        if cfg.model.init_from is not None:
            _load_pretrained_weights(model, cfg.model.init_from)
        if use_ddp:
            model = apply_ddp(model, device=device)  # after materialising: DDP broadcasts rank 0's real weights
        if use_mfsdp:
            # After materialising (see bioscale.distributed.megatron_fsdp): every rank initialised the same weights
            # from the same seed; the wrapper keeps this rank's shard of them.
            model = apply_megatron_fsdp(
                model,
                device=device,
                compute_dtype=torch.bfloat16 if sharded_bf16 else None,
                reduce_dtype=reduce_dtype,
                master_dtype=torch.float32 if cfg.parallelism.fp32_master_weights or not sharded_bf16 else None,
            )
        model.train()
        _seed_everything(cfg.seed + rank)
        quant_stats = None
        if cfg.quant_stats.enabled:  # hooks on the materialised FP8 layers, before the first (compiled) forward
            from bioscale.precision.quant_stats import attach_quant_stats

            quant_stats = attach_quant_stats(model, run_dir=run_dir, freq=cfg.quant_stats.freq, rank=rank)

        # ---- 6. Optimizer and learning-rate schedule ----------------------------------------------------------------
        optimizer = build_optimizer(
            model,
            lr=cfg.optimizer.lr,
            betas=cfg.optimizer.betas,
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
            fused=cfg.optimizer.fused,
            device=device,
        )
        if use_mfsdp:
            optimizer = shard_optimizer(optimizer)
        scheduler = build_lr_scheduler(
            optimizer,
            kind=cfg.scheduler.kind,
            warmup_steps=cfg.scheduler.warmup_steps,
            total_steps=cfg.num_train_steps,
            min_lr_ratio=cfg.scheduler.min_lr_ratio,
        )

        # ---- 7. Data: an endless, resumable stream of micro-batches for this data-parallel rank -------------------
        tokenizer = get_tokenizer(cfg.data.tokenizer)
        _check_vocabulary(tokenizer, model_config)
        loader = build_dataloader(cfg.data, tokenizer, rank=cp.dp_rank, world_size=cp.dp_size)

        # ---- 8. Resume from the latest complete checkpoint -----------------------------------------------------------
        state = TrainState()
        checkpointer = CheckpointManager(
            ckpt_dir, rank=rank, keep_last_n=cfg.checkpoint.keep_last_n, async_save=cfg.checkpoint.async_save
        )

        def get_trainer_state() -> dict[str, Any]:
            return {"train_state": vars(state).copy(), "scheduler": scheduler.state_dict()}

        def set_trainer_state(saved: dict[str, Any]) -> None:
            vars(state).update(saved["train_state"])
            scheduler.load_state_dict(saved["scheduler"])

        def get_rank_state() -> dict[str, Any]:
            return {"rng": get_rng_state(), "dataloader": loader.state_dict()}

        def set_rank_state(saved: dict[str, Any]) -> None:
            set_rng_state(saved["rng"])
            loader.load_state_dict(saved["dataloader"])

        stateful = {
            "model_optim": MegatronFSDPState(model, optimizer) if use_mfsdp else ModelOptimizerState(model, optimizer),
            "trainer": PickledState("trainer", get=get_trainer_state, set=set_trainer_state),
            # Per rank: its RNG streams and its position in its shard of the data.
            "rank": PickledState(f"rank_{rank}", get=get_rank_state, set=set_rank_state),
        }
        resumed_from = None
        latest = checkpointer.latest()
        if cfg.checkpoint.resume_from_checkpoint and latest is not None:
            resumed_from, path = latest
            _check_same_world_size(path, world_size)
            checkpointer.load(path, stateful)
            assert state.step == resumed_from, (state.step, resumed_from)
            logger.info("resumed from %s (step %d)", path, resumed_from)
        elif latest is not None and dist_info.is_main:
            logger.warning(
                "%s holds checkpoints of an earlier run (latest %s) that this run will overwrite as it "
                "reaches their steps; pass checkpoint.resume_from_checkpoint=true to continue it instead",
                ckpt_dir,
                latest[1].name,
            )
        data_iter = iter(loader)

        metrics = MetricsLogger(
            run_dir,
            enabled=dist_info.is_main,
            total_steps=cfg.num_train_steps,
            start_step=state.step,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            progress_bar=cfg.logging.progress_bar,
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        profiler = StepProfiler(
            enabled=cfg.profiler.enabled,
            mode=cfg.profiler.mode,
            start_step=cfg.profiler.start_step,
            end_step=cfg.profiler.end_step,
            run_dir=run_dir,
            rank=rank,
            device=device,
        )
        peak_flops = gpu_peak_flops(device)
        window = _Window()
        last_record: dict[str, Any] = {}
        start_time = time.perf_counter()
        first_step = state.step + 1

        # ---- 9. The loop ------------------------------------------------------------------------------------------
        while state.step < cfg.num_train_steps:
            state.step += 1
            step = state.step
            profiler.step_begin(step)
            if quant_stats is not None:
                quant_stats.begin_step(step)
            step_start = time.perf_counter()
            with profiler.range(f"step_{step}"):
                with profiler.range("data"):
                    micro_batches = [next(data_iter) for _ in range(cfg.grad_acc_steps)]
                    counts = [count_tokens(batch, pad_token_id=tokenizer.pad_token_id) for batch in micro_batches]
                    seq_len_sq_sum = sum(_sum_sq_seq_lens(b, c) for b, c in zip(micro_batches, counts))
                    # Under CP each rank keeps its chunks of every sequence (labels shifted before the split for CLM).
                    micro_batches, cp_layouts = cp.shard(
                        micro_batches, causal=task == "causal_lm", pad_token_id=tokenizer.pad_token_id
                    )
                    local_labels = sum(_num_label_tokens(batch) for batch in micro_batches)
                    # The loss is the sum over every label token of the global batch divided by their global count:
                    # an MLM micro-batch's masked-token count varies, so averaging per-micro-batch means would weight
                    # tokens unequally (torchtitan's normalisation).
                    global_labels = all_reduce_sum(torch.tensor(local_labels, device=device)).clamp(min=1).float()
                    micro_batches = [
                        _to_device(b, device, compiled=cfg.compile.enabled, max_seq_length=cfg.data.max_seq_length)
                        for b in micro_batches
                    ]
                # DDP and FSDP2 average gradients over ranks; scaling by world_size turns that mean into the sum.
                loss_scale = world_size / global_labels
                loss_sum = torch.zeros((), device=device)
                for index, batch in enumerate(micro_batches):
                    with grad_sync(model, enabled=index == len(micro_batches) - 1):
                        # The model's value checks of its inputs cost a host sync per forward: the run's first step
                        # checks the data pipeline's batches, later steps trust it.
                        with (
                            profiler.range("forward"),
                            autocast,
                            cp.forward(model, cp_layouts[index]),
                            input_validation(step == first_step),
                        ):
                            micro_loss_sum = model_loss(model, batch, task=task)
                        with profiler.range("backward"):
                            (micro_loss_sum * loss_scale).backward()
                    loss_sum += micro_loss_sum.detach().float()
                with profiler.range("optimizer"):
                    grad_norm = _clip_grad_norm(model, cfg.max_grad_norm)
                    loss = all_reduce_sum(loss_sum) / global_labels
                    loss_value, grad_norm_value = torch.stack([loss, grad_norm.float().to(device)]).tolist()
                    lr = scheduler.get_last_lr()[0]
                    if math.isfinite(loss_value) and math.isfinite(grad_norm_value):
                        optimizer.step()
                        if fp8_all_gather:
                            precompute_fp8_scales(model)
                        state.num_consecutive_bad_steps = 0
                        if state.first_loss is None:
                            state.first_loss = loss_value
                        state.min_loss = min(loss_value, state.min_loss if state.min_loss is not None else math.inf)
                    else:
                        # Skip the update (the weights stay as they were) but consume the data and advance the
                        # schedule, so the step <-> data <-> lr mapping of a resumed run stays the same.
                        state.num_skipped_steps += 1
                        state.num_consecutive_bad_steps += 1
                        logger.warning(
                            "step %d: non-finite loss (%s) or gradient norm (%s); update skipped",
                            step,
                            loss_value,
                            grad_norm_value,
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
            step_time = time.perf_counter() - step_start
            profiler.step_end(step)
            if quant_stats is not None:
                quant_stats.end_step(step)
            if state.num_consecutive_bad_steps >= cfg.nan_tolerance:
                checkpointer.close()
                latest = checkpointer.latest()
                raise NonFiniteLossError(
                    f"{state.num_consecutive_bad_steps} consecutive steps (up to step {step}) had a non-finite loss "
                    f"or gradient norm (nan_tolerance={cfg.nan_tolerance}); stopping. Last good checkpoint: "
                    f"{latest[1] if latest else 'none'}. Lower optimizer.lr, raise scheduler.warmup_steps or check "
                    "the data, then resume with checkpoint.resume_from_checkpoint=true."
                )

            # Token counts are of this rank's data stream; a CP group shares one stream, so each of its ranks counts
            # 1/cp_size of it (summed over ranks at log time, every token counts once).
            cp_share = 1.0 / cfg.parallelism.cp_size
            window.add(
                loss=loss_value,
                num_label_tokens=float(global_labels),
                num_tokens=cp_share * sum(c["num_tokens"] for c in counts),
                num_real_tokens=cp_share * sum(c["num_real_tokens"] for c in counts),
                seq_len_sq_sum=cp_share * seq_len_sq_sum,
                step_time=step_time,
            )
            if step % cfg.logging.log_every_n_steps == 0 or step == cfg.num_train_steps:
                totals = all_reduce_sum(
                    torch.tensor(
                        [window.num_tokens, window.num_real_tokens, window.seq_len_sq_sum],
                        dtype=torch.float64,
                        device=device,
                    )
                ).tolist()
                tokens_per_sec = totals[0] / world_size / window.time
                real_tokens_per_sec = totals[1] / world_size / window.time
                seq_len = effective_seq_len(totals[2], totals[1])
                flops_per_token = spec.flops_per_token(model_config, seq_len)
                last_record = {
                    "step": step,
                    "loss": window.mean_loss(),
                    "perplexity": perplexity(window.mean_loss()),
                    "grad_norm": grad_norm_value,
                    "lr": lr,
                    "step_time": window.time / window.steps,
                    "tokens_per_sec_per_gpu": tokens_per_sec,
                    "real_tokens_per_sec_per_gpu": real_tokens_per_sec,
                    "mfu": compute_mfu(flops_per_token, real_tokens_per_sec, peak_flops),
                    "peak_mem_gb": peak_memory_gb(device),
                    "num_label_tokens": int(window.num_label_tokens),
                    "effective_seq_len": seq_len,
                    "num_skipped_steps": state.num_skipped_steps,
                }
                metrics.log(last_record)
                window = _Window()
            metrics.advance(step)

            if cfg.checkpoint.save_every_n_steps and (
                step % cfg.checkpoint.save_every_n_steps == 0 or step == cfg.num_train_steps
            ):
                checkpointer.save(step, stateful)

        # ---- 10. Final export and summary ---------------------------------------------------------------------------
        checkpointer.close()
        if quant_stats is not None:
            quant_stats.close()
        wall_time = time.perf_counter() - start_time
        final_model_dir = ckpt_dir / "final_model"
        final_model_hf_dir = ckpt_dir / "final_model_hf"
        if cfg.checkpoint.save_final_model:
            export_final_model(
                model,
                model_config=model_config,
                task=task,
                tokenizer=tokenizer,
                out_dir=final_model_dir,
                hf_out_dir=final_model_hf_dir,
                is_main=dist_info.is_main,
            )
        plot_path = metrics.close()
        summary = {
            "model": f"{cfg.model.name}/{cfg.model.size}",
            "num_parameters": num_params,
            "world_size": world_size,
            "device": str(device),
            "strategy": strategy if (world_size > 1 or use_fsdp or use_mfsdp) else "single",
            "cp_size": cfg.parallelism.cp_size,
            "num_train_steps": cfg.num_train_steps,
            "final_step": state.step,
            "resumed_from_step": resumed_from,
            "first_loss": state.first_loss,
            "final_loss": last_record.get("loss"),
            "min_loss": state.min_loss,
            "num_skipped_steps": state.num_skipped_steps,
            "wall_time_s": wall_time,
            "tokens_per_sec_per_gpu": last_record.get("tokens_per_sec_per_gpu"),
            "real_tokens_per_sec_per_gpu": last_record.get("real_tokens_per_sec_per_gpu"),
            "mfu": last_record.get("mfu"),
            "peak_mem_gb": peak_memory_gb(device),
            "data_policy": _policy_stats(get_policy_stats, loader),
            "run_dir": str(run_dir),
            "metrics": str(run_dir / "metrics.jsonl"),
            "plot": str(plot_path) if plot_path else None,
            "final_model": str(final_model_dir) if cfg.checkpoint.save_final_model else None,
            "final_model_hf": str(final_model_hf_dir) if cfg.checkpoint.save_final_model else None,
        }
        if dist_info.is_main:
            (run_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
            logger.info(
                "done: %d steps, final loss %s, summary in %s",
                state.step,
                summary["final_loss"],
                run_dir / "summary.json",
            )
        barrier()
        return summary
    finally:
        if flash_before is not None:
            from bioscale.models.flash_impl import activate_flash_impl

            activate_flash_impl(flash_before)
        if profiler is not None:
            profiler.close()
        if metrics is not None:
            metrics.close(plot=False)
        destroy_distributed()


# ---- helpers that keep the loop above readable ----------------------------------------------------------------------


class _Window:
    """Sums over the steps since the last log line: global loss and label count, this rank's tokens and time."""

    def __init__(self) -> None:
        self.weighted_loss = 0.0
        self.finite_labels = 0.0
        self.num_label_tokens = 0.0
        self.num_tokens = 0
        self.num_real_tokens = 0
        self.seq_len_sq_sum = 0.0
        self.time = 0.0
        self.steps = 0

    def add(
        self,
        *,
        loss: float,
        num_label_tokens: float,
        num_tokens: int,
        num_real_tokens: int,
        seq_len_sq_sum: float,
        step_time: float,
    ) -> None:
        # A skipped step's loss is left out of the mean; its tokens still took the time.
        if math.isfinite(loss):
            self.weighted_loss += loss * num_label_tokens
            self.finite_labels += num_label_tokens
        self.num_label_tokens += num_label_tokens
        self.num_tokens += num_tokens
        self.num_real_tokens += num_real_tokens
        self.seq_len_sq_sum += seq_len_sq_sum
        self.time += step_time
        self.steps += 1

    def mean_loss(self) -> float:
        """Label-token-weighted mean loss of the window's finite steps (the step's loss when logging every step)."""
        return self.weighted_loss / self.finite_labels if self.finite_labels else math.nan


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
    else:
        ids = batch["input_ids"]
        lengths = torch.full((ids.shape[0],), ids.shape[-1])
    return float((lengths.double() ** 2).sum())


def _clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping (a plain tensor, also under FSDP2)."""
    from bioscale.distributed.megatron_fsdp import clip_grad_norm, is_megatron_fsdp

    if is_megatron_fsdp(model):
        return clip_grad_norm(model, max_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    full_tensor = getattr(grad_norm, "full_tensor", None)  # a DTensor under FSDP2
    return full_tensor() if full_tensor is not None else grad_norm


def _load_pretrained_weights(model: nn.Module, path: str) -> None:
    """Copy the weights of a ``save_pretrained`` folder into the (possibly sharded) ``model``."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

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


class _ContextParallel:
    """The loop's view of the rank layout and of ``bioscale.distributed.context_parallel``: mesh, model preparation,
    batch sharding, forward.

    With ``cp_size == 1`` the CP methods are no-ops and every rank is its own data-parallel rank. Otherwise each group
    of ``cp_size`` consecutive ranks shares one data stream and splits its sequences; gradients of CP ranks are
    partial (each saw its own tokens), and FSDP2 or DDP over all ranks sums them like those of data-parallel ranks,
    so the loss normalisation (x world size / global label count) is unchanged. ``fsdp_mesh`` is what FSDP2 shards
    over (2-D for HSDP with ``dp_replicate > 1``; None in a plain process).
    """

    def __init__(
        self, cp_size: int, device: torch.device, *, rank: int, world_size: int, dp_replicate: int = 1
    ) -> None:
        self.size = cp_size
        self.dp_rank, self.dp_size = rank, world_size
        self.fsdp_mesh = None
        if cp_size == 1 and dp_replicate == 1 and world_size == 1:
            return
        from bioscale.distributed import cp_mesh

        self.mesh = cp_mesh.build_parallel_mesh(device.type, cp_size=cp_size, dp_replicate=dp_replicate)
        self.fsdp_mesh = self.mesh.fsdp_mesh
        self.dp_rank, self.dp_size = self.mesh.dp_rank, self.mesh.dp_size
        if cp_size == 1:
            return
        try:
            from bioscale.distributed import context_parallel, cp_layout
        except ImportError as err:
            raise ValueError(f"cp_size={cp_size}: context parallelism is not available ({err}); use cp_size=1") from err
        self._cp, self._layout = context_parallel, cp_layout

    def apply(self, model: nn.Module) -> None:
        if self.size > 1:
            self._cp.apply_context_parallel(model, self.mesh.cp_group)

    def shard(self, batches: list[dict[str, Any]], *, causal: bool, pad_token_id: int) -> tuple[list, list]:
        """This rank's shards of ``batches`` and their layouts (the batches unchanged without CP)."""
        if self.size == 1:
            return batches, [None] * len(batches)
        shards = [
            self._layout.shard_batch_for_cp(
                b, self.mesh.cp_rank, self.size, shift_labels=causal, pad_token_id=pad_token_id
            )
            for b in batches
        ]
        return [s.batch for s in shards], [s.layout for s in shards]

    def forward(self, model: nn.Module, layout: Any) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward: the model's attention sees this rank's CP plan."""
        return self._cp.context_parallel(model, layout) if self.size > 1 else contextlib.nullcontext()


def _num_label_tokens(batch: dict[str, Any]) -> int:
    """Loss terms in a micro-batch (``shift_labels`` once context parallelism shifted them before sharding)."""
    labels = batch["shift_labels"] if "shift_labels" in batch else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


def _check_fp8_device(check_fp8_hardware: Any, device: torch.device) -> None:
    """A configuration error (``ValueError``, one line from the CLI) when this device cannot train in FP8."""
    if device.type != "cuda":
        raise ValueError(
            f"fp8_config.enabled=true needs an NVIDIA GPU with FP8 tensor cores (sm_89+: Ada, Hopper, Blackwell); "
            f"this run is on {device.type}. Set fp8_config.enabled=false (on a GPU, dtype=bf16 trains in bf16)."
        )
    try:
        check_fp8_hardware(device)
    except RuntimeError as err:
        raise ValueError(f"fp8_config.enabled=true: {err}") from err


def _check_vocabulary(tokenizer: Any, model_config: Any) -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"the {len(tokenizer)}-token tokenizer does not fit the model's vocab_size={model_config.vocab_size}; "
            f"set model.overrides.vocab_size={len(tokenizer)} (e.g. +model.overrides.vocab_size={len(tokenizer)})"
        )


def _check_same_world_size(path: Path, world_size: int) -> None:
    saved = json.loads((path / COMPLETE_MARKER).read_text()).get("world_size")
    if saved is not None and saved != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {saved} rank(s) but this run has {world_size}: the data-loader "
            "positions are per rank, so resume with the same number of ranks"
        )


def _policy_stats(get_policy_stats: Any, loader: Any) -> Any:
    stats = get_policy_stats(loader)
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    if hasattr(stats, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(stats)
    return stats


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
