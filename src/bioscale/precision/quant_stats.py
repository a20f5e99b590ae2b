"""FP8 quantisation statistics for debugging: what the FP8 casts of each FP8 layer do to its tensors.

For every ``Float8Linear`` (the layers :func:`bioscale.precision.fp8.apply_fp8` converted; bf16 layers have no FP8
cast to measure), every ``freq`` steps, :class:`QuantStats` records for each tensor the layer casts — activations
(``input``), ``weight`` and gradients (``grad_output``) — the absolute maximum (amax), the scale the recipe derives
from it, the share of non-zero values that *underflow* (become 0 in the e4m3/e5m2 cast) and the share that
*saturate* (are clamped to the largest FP8 value). It writes one JSON line per layer and tensor to
``<run_dir>/quant_stats.jsonl`` and, given a ``SummaryWriter``, TensorBoard scalars. The scale is recomputed exactly
as torchao does (``fp8_max / amax`` in float64, rounded down to a power of two for the rowwise recipe, per row for
rowwise); the rowwise recipe casts each tensor twice, once per GEMM, along different axes, and both casts are reported
(``input`` and ``input_for_grad_weight``, named after torchao's cast configs).

How it stays free on the other steps, and works under ``torch.compile`` and FSDP2: each FP8 layer carries one
permanent forward hook whose first statement reads a Python flag. While the flag is off the hook returns at once, so
the compiled graph of a block is exactly the graph without stats. On a stats step the flag flips, Dynamo compiles a
second variant once (a guard on the flag; both variants stay cached), and in it the hook computes the input's
statistics with plain tensor ops and wraps the layer output in an identity autograd function whose backward computes
the gradient's statistics and returns them as the gradient of a small "probe" leaf tensor. The probe lives outside the
compiled graph, so its gradient-accumulation hook runs eagerly: it collects the per-micro-batch statistics without a
host sync. :meth:`QuantStats.end_step` reduces them over micro-batches and data-parallel ranks with one host transfer.
Weights are read between steps (:meth:`QuantStats.begin_step`), all-gathered when FSDP2 shards them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bioscale.precision.fp8 import _is_float8_linear, _unwrap, clean_module_name

log = logging.getLogger(__name__)

# Layout of one statistics vector (float64, so element counts stay exact beyond 2**24).
STAT_FIELDS = (
    "amax",
    "scale_min",
    "scale_max",
    "num_underflow",
    "num_saturated",
    "num_nonfinite",
    "num_nonzero",
    "numel",
)
_AMAX, _SCALE_MIN, _SCALE_MAX = 0, 1, 2
_FIRST_COUNT = 3
# Same clamp as torchao's amax_to_scale, so an all-zero tensor gets the same (huge, finite) scale.
_AMAX_EPS = 1e-12

_ACTIVE = "_bioscale_qstats_active"
_PROBE = "_bioscale_qstats_probe"


@dataclass(frozen=True)
class CastSpec:
    """How one tensor is cast to FP8 for one GEMM.

    Attributes:
        role: ``input``, ``weight``, ``grad_output`` or their second casts ``input_for_grad_weight``,
            ``weight_for_grad_input``, ``grad_output_for_grad_weight`` (torchao's cast-config names).
        float8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        reduce_dim: ``None`` for one scale per tensor; else the dimension of the 2-D view (``[tokens, features]``
            for activations and gradients, ``[out_features, in_features]`` for weights) that amax reduces over.
        round_scales_to_power_of_2: scales are rounded down to a power of two (the rowwise recipe).
    """

    role: str
    float8_dtype: torch.dtype
    reduce_dim: int | None
    round_scales_to_power_of_2: bool


def cast_specs(config: Any) -> dict[str, tuple[CastSpec, ...]]:
    """The FP8 casts a ``Float8LinearConfig`` performs, grouped by tensor (``input``, ``weight``, ``grad_output``).

    Each tensor is cast for two GEMMs. torchao's axes (on its 2-D views) translate to ours as: the first cast of each
    tensor reduces over the last dimension (per token for activations and gradients, per output feature for the
    weight), the second over dimension 0. With one scale per tensor both casts are identical and only the first is
    listed; a cast whose scaling is disabled (kept in high precision) is not listed.
    """
    from torchao.float8.config import ScalingGranularity, ScalingType

    pairs = {
        "input": (config.cast_config_input, config.cast_config_input_for_grad_weight, "input_for_grad_weight"),
        "weight": (config.cast_config_weight, config.cast_config_weight_for_grad_input, "weight_for_grad_input"),
        "grad_output": (
            config.cast_config_grad_output,
            config.cast_config_grad_output_for_grad_weight,
            "grad_output_for_grad_weight",
        ),
    }
    specs: dict[str, tuple[CastSpec, ...]] = {}
    for role, (first, second, second_role) in pairs.items():
        out = []
        for name, cast, dim in ((role, first, 1), (second_role, second, 0)):
            if cast.scaling_type is ScalingType.DISABLED:
                continue
            axiswise = cast.scaling_granularity is ScalingGranularity.AXISWISE
            spec = CastSpec(name, cast.target_dtype, dim if axiswise else None, config.round_scales_to_power_of_2)
            if out and spec.reduce_dim is None and out[0].reduce_dim is None and spec.float8_dtype == out[0].float8_dtype:
                continue  # the same tensorwise cast again
            out.append(spec)
        specs[role] = tuple(out)
    return specs


def _saturation_threshold(float8_dtype: torch.dtype) -> float:
    """Magnitude beyond which the cast clamps rather than rounds: the FP8 max plus half a unit in the last place.

    Values between the FP8 maximum and this threshold round to the maximum anyway (round-to-nearest), so only values
    beyond it lose information to saturation. e4m3fn: 448 + 16 = 464; e5m2: 57344 + 4096 = 61440.
    """
    finfo = torch.finfo(float8_dtype)
    ulp_at_max = 2.0 ** math.floor(math.log2(finfo.max)) * finfo.eps
    return finfo.max + ulp_at_max / 2


@torch.no_grad()
def cast_stats(
    x: torch.Tensor,
    *,
    float8_dtype: torch.dtype,
    reduce_dim: int | None = None,
    round_scales_to_power_of_2: bool = False,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Statistics of casting ``x`` to ``float8_dtype``, as a float64 vector laid out as :data:`STAT_FIELDS`.

    ``x`` is viewed as 2-D ``[-1, x.shape[-1]]``. The scale is torchao's dynamic scale (``fp8_max / amax`` per tensor,
    or per slice along ``reduce_dim``) unless ``scale`` is given (e.g. a delayed or precomputed scale; broadcastable
    to the 2-D view). Underflow counts non-zero values that become 0 in the cast; saturation counts values whose
    scaled magnitude is beyond what rounding could bring back to the FP8 maximum (see
    :func:`_saturation_threshold`), so a dynamic scale never saturates a finite value; non-finite values are counted
    on their own. Pure tensor ops and no host sync, so it can run inside a compiled graph.
    """
    x2d = x.reshape(-1, x.shape[-1]).float()
    magnitude = x2d.abs()
    amax = magnitude.amax() if reduce_dim is None else magnitude.amax(dim=reduce_dim, keepdim=True)
    fp8_max = torch.finfo(float8_dtype).max
    if scale is None:
        # torchao computes the scale in float64 and stores it in float32 (amax_to_scale); match it bit for bit.
        scale = (fp8_max / amax.double().clamp(min=_AMAX_EPS)).float()
        if round_scales_to_power_of_2:
            scale = torch.exp2(torch.floor(torch.log2(scale)))
    else:
        scale = scale.to(device=x2d.device, dtype=torch.float32)
    scaled = x2d * scale
    cast = scaled.clamp(-fp8_max, fp8_max).to(float8_dtype).float()
    nonzero = x2d != 0
    finite = torch.isfinite(x2d)
    counts = torch.stack(
        [
            (nonzero & finite & (cast == 0)).sum(),
            (finite & (scaled.abs() > _saturation_threshold(float8_dtype))).sum(),
            (~finite).sum(),
            nonzero.sum(),
            torch.ones_like(x2d, dtype=torch.bool).sum(),
        ]
    ).double()
    return torch.cat([torch.stack([amax.amax().double(), scale.amin().double(), scale.amax().double()]), counts])


def _stats_for(x: torch.Tensor, specs: tuple[CastSpec, ...]) -> torch.Tensor:
    return torch.stack(
        [
            cast_stats(
                x,
                float8_dtype=spec.float8_dtype,
                reduce_dim=spec.reduce_dim,
                round_scales_to_power_of_2=spec.round_scales_to_power_of_2,
            )
            for spec in specs
        ]
    )


class _StatsProbe(torch.autograd.Function):
    """Identity on ``output``; in backward, the layer's statistics become the gradient of ``probe``.

    The gradient of ``probe`` stacks the input statistics (computed in forward, carried in ``ctx``) on top of the
    statistics of ``grad_output``. Handing them out as a gradient, rather than storing them from the hook, keeps
    forward and backward free of side effects, which Dynamo needs inside activation-checkpointed regions and
    AOTAutograd needs in backward.
    """

    @staticmethod
    def forward(
        ctx: Any, output: torch.Tensor, probe: torch.Tensor, input_stats: torch.Tensor, config: Any
    ) -> torch.Tensor:
        ctx.save_for_backward(input_stats)
        ctx.config = config
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (input_stats,) = ctx.saved_tensors
        grad_stats = _stats_for(grad_output, cast_specs(ctx.config)["grad_output"])
        return grad_output, torch.cat([input_stats, grad_stats]), None, None


def _forward_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    # One function object for every layer and no per-layer Python constants, so blocks that share compiled code keep
    # sharing it; the only guard this adds is on the flag.
    if not getattr(module, _ACTIVE):
        return None
    x = args[0]
    if torch.is_autocast_enabled():
        # Float8Linear.forward casts its input to the (CUDA) autocast dtype before the FP8 cast; measure that tensor.
        x = x.to(torch.get_autocast_dtype("cuda"))
    input_stats = _stats_for(x, cast_specs(module.config)["input"])
    return _StatsProbe.apply(output, getattr(module, _PROBE), input_stats, module.config)


def _full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight as a plain tensor: all-gathered if FSDP2 shards it, unwrapped from torchao's FP8 type."""
    from torch.distributed.tensor import DTensor

    def plain(tensor: torch.Tensor) -> torch.Tensor:
        # WeightWithDynamicFloat8CastTensor (fsdp_float8_all_gather) keeps the high-precision weight in ``_tensor``.
        inner = getattr(tensor, "_tensor", None)
        return inner if isinstance(inner, torch.Tensor) else tensor

    if isinstance(weight, DTensor):
        # A collective: every rank must call begin_step. Unwrap the shard first so the gather moves plain tensors.
        local = plain(weight.to_local())
        return DTensor.from_local(
            local, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
        ).full_tensor()
    return plain(weight.detach())


class QuantStats:
    """Records FP8 cast statistics of a model's ``Float8Linear`` layers every ``freq`` steps.

    Attach it to the materialised model before the first forward (hooks added after a block was compiled would be
    ignored by the compiled code); ``torch.compile`` and FSDP2 may already be applied. In the training loop::

        quant_stats = QuantStats(model, freq=cfg.freq, output_dir=run_dir, writer=tb_writer)
        for step in range(1, num_steps + 1):
            quant_stats.begin_step(step)     # before the first forward of the step
            ...forward / backward of every micro-batch, optimizer.step()...
            quant_stats.end_step(step)       # writes on steps where freq divides step

    Every rank must call both methods (statistics are reduced over ranks; rank 0 writes).

    Args:
        model: the model after :func:`~bioscale.precision.fp8.apply_fp8` (a DDP wrapper is fine).
        freq: record on steps where ``step % freq == 0``.
        output_dir: where ``quant_stats.jsonl`` is appended (the run directory); None keeps records in memory only.
        writer: optional ``torch.utils.tensorboard.SummaryWriter`` (tags ``fp8/<layer>/<role>/<metric>``).
        rank: this process's rank (default: from ``torch.distributed``); only rank 0 writes.
    """

    FILENAME = "quant_stats.jsonl"

    def __init__(
        self,
        model: nn.Module,
        *,
        freq: int,
        output_dir: str | Path | None = None,
        writer: Any | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"quant_stats_config.freq must be an integer >= 1; got {freq!r}")
        self.freq = freq
        self.writer = writer
        self._owns_writer = False
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.path = Path(output_dir) / self.FILENAME if output_dir is not None else None
        self._layers: dict[str, nn.Module] = {}
        self._handles: list[Any] = []
        self._pending: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._recording = False
        for name, module in _unwrap(model).named_modules():
            if not _is_float8_linear(module):
                continue
            if module.weight.device.type == "meta":
                raise ValueError(
                    f"QuantStats needs the materialised model, but {clean_module_name(name)} is on the meta device; "
                    "create it after to_empty() / init_weights()"
                )
            self._attach(clean_module_name(name), module)
        if not self._layers:
            log.warning("quant stats: the model has no FP8 layers, so there is nothing to record")

    def _attach(self, name: str, module: nn.Module) -> None:
        specs = cast_specs(module.config)
        setattr(module, _ACTIVE, False)
        roles = [spec.role for spec in specs["input"] + specs["grad_output"]]
        probe = torch.zeros(len(roles), len(STAT_FIELDS), dtype=torch.float64, device=module.weight.device)
        setattr(module, _PROBE, probe.requires_grad_())

        def collect(probe: torch.Tensor, name: str = name, roles: list[str] = roles) -> None:
            # Runs eagerly (the probe is outside any compiled graph) once per micro-batch, when backward reaches this
            # layer; keeps device tensors, so no host sync.
            for role, row in zip(roles, probe.grad.detach()):
                self._pending.setdefault((name, role), []).append(row)
            probe.grad = None

        self._handles.append(probe.register_post_accumulate_grad_hook(collect))
        self._handles.append(module.register_forward_hook(_forward_hook))
        self._layers[name] = module

    @property
    def layer_names(self) -> list[str]:
        """Names of the FP8 layers being watched."""
        return list(self._layers)

    def should_record(self, step: int) -> bool:
        return bool(self._layers) and step % self.freq == 0

    def begin_step(self, step: int) -> None:
        """Arm the hooks and read the weights when ``step`` is a stats step; otherwise do nothing."""
        self._recording = self.should_record(step)
        if not self._recording:
            return
        self._pending.clear()
        with torch.no_grad():
            for name, module in self._layers.items():
                setattr(module, _ACTIVE, True)
                specs = cast_specs(module.config)["weight"]
                for spec, row in zip(specs, _stats_for(_full_weight(module.weight), specs)):
                    self._pending.setdefault((name, spec.role), []).append(row)

    def end_step(self, step: int) -> list[dict[str, Any]] | None:
        """Disarm the hooks, reduce and write this step's statistics; returns the records on stats steps."""
        if not self._recording:
            return None
        self._recording = False
        for module in self._layers.values():
            setattr(module, _ACTIVE, False)
        keys = [
            (name, spec.role)
            for name, module in self._layers.items()
            for group in ("input", "weight", "grad_output")
            for spec in cast_specs(module.config)[group]
        ]
        missing = [key for key in keys if key not in self._pending]
        if missing:
            log.warning("quant stats at step %d: no data for %d tensors (e.g. %s/%s)", step, len(missing), *missing[0])
        device = next(iter(self._layers.values())).weight.device
        # Rows without data hold the identities of the reductions (-inf for maxima, +inf for minima, 0 for counts),
        # so they neither poison the reduction over ranks nor pass for real values (they are written as null).
        table = torch.zeros((len(keys), len(STAT_FIELDS)), dtype=torch.float64, device=device)
        table[:, [_AMAX, _SCALE_MAX]] = -math.inf
        table[:, _SCALE_MIN] = math.inf
        for row, key in enumerate(keys):
            if key in self._pending:
                table[row] = _reduce_rows(torch.stack(self._pending[key]).to(device))
        self._pending.clear()
        # Activations and gradients differ per rank and are combined; the weight rows already describe the whole
        # (gathered or replicated) weight on every rank and must not be counted once per rank.
        is_weight = torch.tensor([role.startswith("weight") for _, role in keys], device=device)
        table = torch.where(is_weight[:, None], table, _reduce_over_ranks(table))
        records = _to_records(step, keys, self._layers, table.tolist())
        if self.rank == 0:
            self._write(step, records)
        return records

    def step(self, step: int) -> list[dict[str, Any]] | None:
        """For loops that report only after a step: ``end_step(step)``, then ``begin_step(step + 1)``.

        Call after the optimizer step of ``step`` (so the weights read for ``step + 1`` are the ones it will use).
        The first step of a run is only recorded if :meth:`begin_step` was called for it.
        """
        records = self.end_step(step)
        self.begin_step(step + 1)
        return records

    @contextlib.contextmanager
    def track(self, step: int) -> Iterator[None]:
        """``begin_step`` / ``end_step`` around the body (the whole step: micro-batches and optimizer step)."""
        self.begin_step(step)
        try:
            yield
        finally:
            self.end_step(step)

    def _write(self, step: int, records: list[dict[str, Any]]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for record in records:
                prefix = f"fp8/{record['layer']}/{record['role']}"
                for metric in ("amax", "scale_min", "underflow_frac", "saturate_frac"):
                    value = record[metric]
                    if value is not None and math.isfinite(value):
                        self.writer.add_scalar(f"{prefix}/{metric}", value, step)

    def close(self) -> None:
        """Remove the hooks and the per-layer state (the model runs as if QuantStats never existed)."""
        self._recording = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._layers.values():
            for attribute in (_ACTIVE, _PROBE):
                if hasattr(module, attribute):
                    delattr(module, attribute)
        self._layers.clear()
        if self._owns_writer and self.writer is not None:
            self.writer.close()


def _reduce_rows(rows: torch.Tensor) -> torch.Tensor:
    """Combine statistics vectors of several micro-batches: max of maxima, min of minima, sums of counts."""
    return torch.cat(
        [
            rows[:, _AMAX].amax().reshape(1),
            rows[:, _SCALE_MIN].amin().reshape(1),
            rows[:, _SCALE_MAX].amax().reshape(1),
            rows[:, _FIRST_COUNT:].sum(dim=0),
        ]
    )


def _reduce_over_ranks(table: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return table
    maxima = table[:, [_AMAX, _SCALE_MAX]].contiguous()
    minima = table[:, [_SCALE_MIN]].contiguous()
    counts = table[:, _FIRST_COUNT:].contiguous()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    dist.all_reduce(minima, op=dist.ReduceOp.MIN)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return torch.cat([maxima[:, :1], minima, maxima[:, 1:], counts], dim=1)


def _to_records(
    step: int, keys: list[tuple[str, str]], layers: dict[str, nn.Module], rows: list[list[float]]
) -> list[dict[str, Any]]:
    records = []
    for (name, role), row in zip(keys, rows):
        # A non-finite entry marks a tensor without data this step (or an overflowed amax); JSON has no inf/NaN.
        values = {field: (value if math.isfinite(value) else None) for field, value in zip(STAT_FIELDS, row)}
        spec = next(
            spec for group in cast_specs(layers[name].config).values() for spec in group if spec.role == role
        )
        numel, nonzero = values["numel"] or 0, values["num_nonzero"] or 0
        records.append(
            {
                "step": step,
                "layer": name,
                "role": role,
                "dtype": str(spec.float8_dtype).removeprefix("torch."),
                "scaling": "tensorwise" if spec.reduce_dim is None else f"axiswise(dim={spec.reduce_dim})",
                "amax": values["amax"],
                "scale_min": values["scale_min"],
                "scale_max": values["scale_max"],
                # Zeros cannot underflow, so the share is over non-zero values.
                "underflow_frac": values["num_underflow"] / nonzero if nonzero else None,
                "saturate_frac": values["num_saturated"] / numel if numel else None,
                "nonfinite_frac": values["num_nonfinite"] / numel if numel else None,
                "numel": int(numel),
            }
        )
    return records


def attach_quant_stats(
    model: nn.Module,
    *,
    run_dir: str | Path,
    freq: int,
    rank: int | None = None,
    tensorboard: bool = True,
) -> QuantStats:
    """A :class:`QuantStats` that writes ``<run_dir>/quant_stats.jsonl`` and, on rank 0 when ``tensorboard``,
    TensorBoard scalars into ``<run_dir>/tensorboard`` (next to the trainer's own event files)."""
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    writer = None
    if tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a stripped environment should still train
            log.warning("quant stats: tensorboard is not installed; writing %s only", QuantStats.FILENAME)
        else:
            writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), filename_suffix=".quant_stats")
    quant_stats = QuantStats(model, freq=freq, output_dir=run_dir, writer=writer, rank=rank)
    quant_stats._owns_writer = writer is not None
    return quant_stats
