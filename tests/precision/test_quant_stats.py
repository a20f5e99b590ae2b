"""FP8 quantisation statistics: the cast math against a float64 reference, and the hook plumbing end to end.

The reference decides underflow and saturation from the FP8 formats' definitions (smallest subnormal, largest
finite value, round-to-nearest-even) in float64, independently of torch's FP8 cast that :func:`cast_stats` uses.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from .toy_model import ToyModel, assert_records_close

pytest.importorskip("torchao.float8")

from bioscale.precision import QuantStats, apply_fp8, attach_quant_stats, cast_stats  # noqa: E402
from bioscale.precision.quant_stats import STAT_FIELDS  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (largest finite value, smallest subnormal, spacing of the top binade) of each format
FORMATS = {E4M3: (448.0, 2.0**-9, 32.0), E5M2: (57344.0, 2.0**-16, 8192.0)}


def reference_stats(x: torch.Tensor, dtype: torch.dtype, reduce_dim: int | None, power_of_2: bool) -> dict[str, float]:
    """float64 statistics from the format definitions (no FP8 dtype involved)."""
    fp8_max, min_subnormal, top_spacing = FORMATS[dtype]
    x = x.reshape(-1, x.shape[-1]).double()
    amax = x.abs().amax() if reduce_dim is None else x.abs().amax(dim=reduce_dim, keepdim=True)
    scale = (fp8_max / amax.clamp(min=1e-12)).float().double()  # torchao stores scales in float32
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    scaled = (x * scale).abs()
    # Round-to-nearest-even sends |v| <= min_subnormal / 2 to zero; beyond max + spacing / 2 only the clamp helps.
    underflow = ((x != 0) & (scaled <= min_subnormal / 2)).sum().item()
    saturated = (scaled > fp8_max + top_spacing / 2).sum().item()
    return {
        "amax": amax.max().item(),
        "scale_min": scale.min().item(),
        "scale_max": scale.max().item(),
        "num_underflow": underflow,
        "num_saturated": saturated,
        "num_nonfinite": 0,
        "num_nonzero": (x != 0).sum().item(),
        "numel": x.numel(),
    }


def as_dict(stats: torch.Tensor) -> dict[str, float]:
    return dict(zip(STAT_FIELDS, stats.tolist()))


def test_crafted_tensor_counts() -> None:
    # amax 2 -> scale 224; e4m3's smallest subnormal 2**-9 needs |x| > 2**-10 / 224 = 4.36e-6 to survive.
    x = torch.tensor([[2.0, -1.0, 0.0, 1e-9, -3e-6, 5e-6, 0.5, 0.0]])
    stats = as_dict(cast_stats(x, float8_dtype=E4M3))
    assert stats == {
        "amax": 2.0,
        "scale_min": 224.0,
        "scale_max": 224.0,
        "num_underflow": 2.0,  # 1e-9 and -3e-6; 5e-6 rounds up to the smallest subnormal
        "num_saturated": 0.0,  # a dynamic scale never saturates
        "num_nonfinite": 0.0,
        "num_nonzero": 6.0,
        "numel": 8.0,
    }
    # A given (too large) scale: 2 * 448 = 896 and 1 * 448 = 448; only 896 is beyond 448 + 16.
    stats = as_dict(cast_stats(x, float8_dtype=E4M3, scale=torch.tensor(448.0)))
    assert stats["num_saturated"] == 1.0
    stats = as_dict(cast_stats(x, float8_dtype=E4M3, scale=torch.tensor(460.0)))  # 460 rounds to 448: not lost
    assert stats["num_saturated"] == 1.0
    x_nonfinite = torch.tensor([[1.0, float("inf"), float("nan"), 0.25]])
    assert as_dict(cast_stats(x_nonfinite, float8_dtype=E4M3))["num_nonfinite"] == 2.0


@pytest.mark.parametrize(
    ("dtype", "reduce_dim", "power_of_2"),
    [(E4M3, None, False), (E5M2, None, False), (E4M3, 1, True), (E4M3, 0, True), (E5M2, 1, False)],
)
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(
    dtype: torch.dtype, reduce_dim: int | None, power_of_2: bool, source_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1)
    # Magnitudes spread over 2**-40 .. 2**4 so that a good share underflows; a few exact zeros.
    magnitude = torch.exp2(torch.empty(64, 96).uniform_(-40, 4, generator=gen))
    sign = torch.randint(0, 2, (64, 96), generator=gen) * 2 - 1
    x = (magnitude * sign).to(source_dtype)
    x[::7, ::5] = 0
    got = as_dict(
        cast_stats(x, float8_dtype=dtype, reduce_dim=reduce_dim, round_scales_to_power_of_2=power_of_2)
    )
    want = reference_stats(x, dtype, reduce_dim, power_of_2)
    assert want["num_underflow"] > 100  # the crafted spread really exercises underflow
    assert got == pytest.approx(want, rel=1e-6)


def _train(model: nn.Module, quant_stats: QuantStats, steps: int, micro_batches: int = 2) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(3)
    recorded = []
    for step in range(1, steps + 1):
        quant_stats.begin_step(step)
        for _ in range(micro_batches):
            model(torch.randn(48, 16, generator=gen)).square().mean().backward()
        records = quant_stats.end_step(step)
        if records is not None:
            recorded.append(records)
    return recorded


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_records_match_the_tensors_the_layer_casts(recipe: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ToyModel()
    apply_fp8(model, recipe=recipe, layers=[2], emulate=True)
    quant_stats = QuantStats(model, freq=2, output_dir=tmp_path)
    assert quant_stats.layer_names == ["layers.1.up", "layers.1.down"]

    # Capture what layers.1.down sees, independently of QuantStats, on the stats step (step 2).
    seen: dict[str, list[torch.Tensor]] = {"input": [], "grad_output": []}
    layer = model.layers[1].down
    weight_before_step_2 = []
    current_step = [0]

    def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if current_step[0] == 2:
            seen["input"].append(args[0].detach().clone())
            output.register_hook(lambda g: seen["grad_output"].append(g.detach().clone()))

    layer.register_forward_hook(capture)
    original_begin = quant_stats.begin_step

    def begin(step: int) -> None:
        current_step[0] = step
        if step == 2:
            weight_before_step_2.append(layer.weight.detach().clone())
        original_begin(step)

    quant_stats.begin_step = begin  # type: ignore[method-assign]
    recorded = _train(model, quant_stats, steps=4)
    assert len(recorded) == 2  # steps 2 and 4 only

    records = {(r["layer"], r["role"]): r for r in recorded[0]}
    roles = ["input", "weight", "grad_output"]
    if recipe == "rowwise":
        roles += ["input_for_grad_weight", "weight_for_grad_input", "grad_output_for_grad_weight"]
    assert set(records) == {(name, role) for name in ("layers.1.up", "layers.1.down") for role in roles}

    config = layer.config
    for role, tensors, cast in (
        ("input", seen["input"], config.cast_config_input),
        ("grad_output", seen["grad_output"], config.cast_config_grad_output),
        ("weight", weight_before_step_2, config.cast_config_weight),
    ):
        assert len(tensors) == (1 if role == "weight" else 2)  # two micro-batches
        per_tensor = [
            reference_stats(t, cast.target_dtype, 1 if recipe == "rowwise" else None, recipe == "rowwise")
            for t in tensors
        ]
        record = records[("layers.1.down", role)]
        assert record["dtype"] == str(cast.target_dtype).removeprefix("torch.")
        assert record["amax"] == pytest.approx(max(s["amax"] for s in per_tensor), rel=1e-6)
        assert record["scale_min"] == pytest.approx(min(s["scale_min"] for s in per_tensor), rel=1e-6)
        assert record["scale_max"] == pytest.approx(max(s["scale_max"] for s in per_tensor), rel=1e-6)
        assert record["numel"] == sum(s["numel"] for s in per_tensor)
        underflow = sum(s["num_underflow"] for s in per_tensor) / sum(s["num_nonzero"] for s in per_tensor)
        assert record["underflow_frac"] == pytest.approx(underflow, abs=1e-12)
        assert record["saturate_frac"] == 0.0

    lines = [json.loads(line) for line in (tmp_path / QuantStats.FILENAME).read_text().splitlines()]
    assert [line["step"] for line in lines] == [2] * len(records) + [4] * len(records)
    assert lines[: len(records)] == recorded[0]


def test_compiled_and_checkpointed_blocks_give_the_eager_records() -> None:
    """Per-block compile (fullgraph) with activation checkpointing records what eager records."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    base = ToyModel()
    apply_fp8(base, recipe="tensorwise", layers=[1, 3], emulate=True)
    eager_model, compiled_model = base, copy.deepcopy(base)
    for index, block in enumerate(compiled_model.layers):
        compiled_model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=True)
        compiled_model.layers[index].compile(backend="aot_eager", fullgraph=True)
    try:
        eager = _train(eager_model, QuantStats(eager_model, freq=2), steps=3)
        compiled = _train(compiled_model, QuantStats(compiled_model, freq=2), steps=3)
    finally:
        torch._dynamo.reset()
    assert len(eager) == len(compiled) == 1
    assert [(r["layer"], r["role"]) for r in compiled[0]] == [(r["layer"], r["role"]) for r in eager[0]]
    for want, got in zip(eager[0], compiled[0]):
        assert_records_close(got, want, rel=1e-5)


def test_other_steps_are_untouched_and_close_detaches(tmp_path: Path) -> None:
    model = ToyModel()
    apply_fp8(model, layers=[1], emulate=True)

    class Writer:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

    writer = Writer()
    quant_stats = QuantStats(model, freq=3, output_dir=tmp_path, writer=writer)
    x = torch.randn(8, 16)
    reference = model(x)
    fp8_layer = model.layers[0].up
    hidden = torch.randn(8, 32, requires_grad=True)
    quant_stats.begin_step(1)  # not a stats step: the layer's autograd graph is the plain one
    assert "StatsProbe" not in fp8_layer(hidden).grad_fn.name()
    assert quant_stats.end_step(1) is None and not (tmp_path / QuantStats.FILENAME).exists()
    assert writer.scalars == []
    quant_stats.begin_step(3)
    assert "StatsProbe" in fp8_layer(hidden).grad_fn.name()
    quant_stats.end_step(3)
    writer.scalars.clear()
    _train(model, quant_stats, steps=3)
    tags = {tag for tag, _, step in writer.scalars if step == 3}
    assert "fp8/layers.0.up/input/underflow_frac" in tags and "fp8/layers.0.down/grad_output/amax" in tags

    quant_stats.close()
    assert not fp8_layer._forward_hooks and not hasattr(fp8_layer, "_bioscale_qstats_probe")
    torch.testing.assert_close(model(x), reference)


def test_attach_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    model = ToyModel()
    apply_fp8(model, layers=[1], emulate=True)
    quant_stats = attach_quant_stats(model, run_dir=tmp_path, freq=1, rank=0)
    # The trainer's pattern: step(n) after step n ends, which arms step n + 1.
    quant_stats.begin_step(1)
    model(torch.randn(8, 16)).sum().backward()
    assert quant_stats.step(1) is not None
    model(torch.randn(8, 16)).sum().backward()
    assert quant_stats.step(2) is not None
    quant_stats.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / QuantStats.FILENAME).read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="freq"):
        QuantStats(ToyModel(), freq=0)
    meta_model = ToyModel().to("meta")
    apply_fp8(meta_model, layers=[1], emulate=True)
    with pytest.raises(ValueError, match="meta device"):
        QuantStats(meta_model, freq=1)


def test_all_zero_tensor_has_no_underflow_and_a_finite_scale() -> None:
    stats = as_dict(cast_stats(torch.zeros(4, 16), float8_dtype=E4M3))
    assert stats["num_underflow"] == 0 and stats["num_nonzero"] == 0
    assert math.isfinite(stats["scale_min"])
