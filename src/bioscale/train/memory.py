"""Memory planning for ``activation_checkpointing.mode=auto``: keep activations when they fit, recompute when not.

A recipe that ships with full activation checkpointing recomputes every block's forward in backward (~1/3 more
compute) even on a GPU with room to keep them: ESM-2 3B on one 141 GB H200 trained 23,323 tokens/s with full
checkpointing (47.7 GB peak) and 28,237 without (98.1 GB), measured 2026-12-02. ``auto`` predicts the peak of a
training step from the model's size, the micro-batch's tokens and the device's memory, and picks ``none`` when it
fits with headroom, else ``full``. Any mode the user sets explicitly is used as given.

The prediction is deliberately simple, calibrated on measured peaks rather than derived op by op:

- state: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per parameter, divided by the ranks
  FSDP2 shards over;
- activations kept without checkpointing: ``ACTIVATION_BYTES["none"]`` bytes per token, per layer, per unit of hidden
  width (bf16 autocast; ESM-2 3B at 16,384 tokens: 98.1 GB peak − 45.4 GB state over 36 layers × 2,560 ≈ 35 B);
- with full checkpointing: each block's input (bf16) plus one block's working set while it is recomputed;
- ``HEADROOM`` of the device kept free (allocator fragmentation, the CUDA context, NCCL buffers, the LM head).

``selective`` is never chosen: its saving depends on the family's op mix and was not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BYTES_PER_PARAMETER = 16  # fp32 weights + fp32 grads + AdamW exp_avg + exp_avg_sq
ACTIVATION_BYTES = {"none": 35.0, "block_input": 2.0}  # per token, per layer, per hidden unit
HEADROOM = 0.12  # fraction of the device's memory left free


@dataclass(frozen=True)
class MemoryPlan:
    """The mode ``auto`` chose and the numbers it chose by (logged, and kept in ``summary.json``)."""

    mode: str
    predicted_peak_gb: dict[str, float]
    device_memory_gb: float

    def describe(self) -> str:
        predicted = ", ".join(f"{mode} {gb:.1f} GB" for mode, gb in self.predicted_peak_gb.items())
        return (
            f"activation_checkpointing=auto chose {self.mode!r}: predicted peak {predicted} of "
            f"{self.device_memory_gb:.1f} GB ({HEADROOM:.0%} kept free)"
        )


def predicted_peak_bytes(
    *, num_params: int, num_layers: int, hidden_size: int, tokens_per_micro_batch: int, shard_ranks: int = 1
) -> dict[str, float]:
    """Predicted peak memory of one training step, per activation-checkpointing mode (``none`` / ``full``)."""
    if min(num_params, num_layers, hidden_size, tokens_per_micro_batch, shard_ranks) <= 0:
        raise ValueError("predicted_peak_bytes needs positive sizes")
    state = BYTES_PER_PARAMETER * num_params / shard_ranks
    per_layer = tokens_per_micro_batch * hidden_size
    kept = ACTIVATION_BYTES["none"] * per_layer * num_layers
    recomputed = ACTIVATION_BYTES["block_input"] * per_layer * num_layers + ACTIVATION_BYTES["none"] * per_layer
    return {"none": state + kept, "full": state + recomputed}


def choose_activation_checkpointing(
    *,
    num_params: int,
    num_layers: int,
    hidden_size: int,
    tokens_per_micro_batch: int,
    device_memory_bytes: float,
    shard_ranks: int = 1,
) -> MemoryPlan:
    """``none`` when its predicted peak fits the device with :data:`HEADROOM` to spare, else ``full``."""
    peaks = predicted_peak_bytes(
        num_params=num_params,
        num_layers=num_layers,
        hidden_size=hidden_size,
        tokens_per_micro_batch=tokens_per_micro_batch,
        shard_ranks=shard_ranks,
    )
    budget = (1.0 - HEADROOM) * device_memory_bytes
    mode = "none" if peaks["none"] <= budget else "full"
    return MemoryPlan(mode, {m: b / 1e9 for m, b in peaks.items()}, device_memory_bytes / 1e9)


def device_memory_bytes(device: torch.device) -> float | None:
    """Memory ``auto`` may plan with: the GPU's free memory before the model is built; ``None`` off CUDA (CPU runs
    keep activations: host memory is not what limits them)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return float(free)


# ---- micro-batch planning (micro_batching=auto) ----------------------------------------------------------------------
# A recipe fixes the tokens of one optimizer step (micro-batch x grad_acc_steps): that is the optimisation. How many
# micro-batches carry them is only a matter of speed and memory, so ``micro_batching=auto`` chooses it on the GPU the
# run finds: the fewest (largest) micro-batches whose predicted peak fits, keeping activations where possible —
# recomputing whole blocks costs about a third more compute, splitting a step in two costs a few percent
# (ESM-2 3B on one H200: 23,323 tokens/s with full checkpointing, 28,237 without; ESM-2 650M 16k -> 32k-token
# micro-batches +5%, Geneformer 104M 32k -> 64k +10%, all measured through `bioscale train`).
MAX_MICRO_BATCHES = 64


@dataclass(frozen=True)
class MicroBatchPlan:
    """How ``micro_batching=auto`` splits a step: ``grad_acc_steps`` micro-batches of ``items_per_micro_batch`` items
    (tokens for packed batches, sequences or images otherwise), the activation-checkpointing mode, and the numbers it
    chose by (logged, and kept in ``summary.json``)."""

    items_per_micro_batch: int
    grad_acc_steps: int
    activation_checkpointing: str
    tokens_per_micro_batch: int
    predicted_peak_gb: float
    device_memory_gb: float
    fits: bool

    def describe(self) -> str:
        fit = "fits" if self.fits else "does NOT fit (nothing smaller can be planned; the prediction is conservative)"
        return (
            f"micro_batching=auto: {self.grad_acc_steps} micro-batch(es) of {self.items_per_micro_batch} per step "
            f"({self.tokens_per_micro_batch} tokens each), activation_checkpointing={self.activation_checkpointing}: "
            f"predicted peak {self.predicted_peak_gb:.1f} GB of {self.device_memory_gb:.1f} GB, {fit} "
            f"({HEADROOM:.0%} kept free)"
        )


def plan_micro_batches(
    *,
    num_params: int,
    num_layers: int,
    hidden_size: int,
    items_per_step: int,
    tokens_per_item: int,
    min_items_per_micro_batch: int,
    device_memory_bytes: float,
    shard_ranks: int = 1,
    activation_checkpointing: str = "auto",
    item_multiple: int = 1,
) -> MicroBatchPlan:
    """The fewest micro-batches per step whose predicted peak (:func:`predicted_peak_bytes`) fits the device.

    ``items_per_step`` items (tokens, sequences or images; ``tokens_per_item`` tokens each) are split into ``k``
    equal micro-batches, ``k`` dividing ``items_per_step``, each at least ``min_items_per_micro_batch`` items and a
    multiple of ``item_multiple``, ``k`` at most :data:`MAX_MICRO_BATCHES`. ``activation_checkpointing="auto"`` tries
    every split without checkpointing before any with full checkpointing; ``none`` / ``full`` plan for that mode only
    (``selective`` is planned as ``none``, an upper bound). When nothing fits, the most split plan of the last mode
    tried is returned with ``fits=False``.
    """
    if min(items_per_step, tokens_per_item, min_items_per_micro_batch, item_multiple) <= 0:
        raise ValueError("plan_micro_batches needs positive sizes")
    if activation_checkpointing not in ("auto", "none", "full", "selective"):
        raise ValueError(f"unknown activation_checkpointing mode {activation_checkpointing!r}")
    splits = [
        k for k in range(1, MAX_MICRO_BATCHES + 1)
        if items_per_step % k == 0 and items_per_step // k >= min_items_per_micro_batch
        and (items_per_step // k) % item_multiple == 0
    ]  # fmt: skip
    if not splits:  # the step itself is the only micro-batch the constraints allow
        splits = [1]
    modes = ["none", "full"] if activation_checkpointing == "auto" else [activation_checkpointing]
    budget = (1.0 - HEADROOM) * device_memory_bytes
    plan = None
    for mode in modes:
        for k in splits:
            items = items_per_step // k
            peaks = predicted_peak_bytes(num_params=num_params, num_layers=num_layers, hidden_size=hidden_size,
                                         tokens_per_micro_batch=items * tokens_per_item,
                                         shard_ranks=shard_ranks)  # fmt: skip
            peak = peaks["full" if mode == "full" else "none"]
            plan = MicroBatchPlan(items, k, mode, items * tokens_per_item, peak / 1e9, device_memory_bytes / 1e9,
                                  fits=peak <= budget)  # fmt: skip
            if plan.fits:
                return plan
    assert plan is not None
    return plan
