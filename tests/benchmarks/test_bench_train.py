"""benchmarks/bench_train.py on CPU: its step planning and batches, and the ``--quick`` smoke run end to end.

The end-to-end run is the check that every variant trains the same steps: from the same weights, on the same
sequences and masks, the first-step losses of ``transformers``, bioscale padded and bioscale packed must agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


def test_model_and_variant_options(bench) -> None:
    case = bench.parse_model("esm2_3B:tokens=16384:ac=none:mb=8")
    assert (case.tokens, case.ac, case.mb, case.family) == (16384, "none", 8, "esm2")
    with pytest.raises(ValueError, match="unknown model"):
        bench.parse_model("esm3_1B")
    with pytest.raises(ValueError, match="multiple of 16"):
        bench.parse_model("esm2_8M:tokens=1000")
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_model("esm2_8M:batch=4")
    args = bench.parse_args(["--fp8-recipe", "rowwise"])
    variant = bench.parse_variant("packed_fp8:min_features=2048:layers=2-4,7", args)
    assert (variant.fp8_recipe, variant.fp8_min_features, variant.fp8_layers) == ("rowwise", 2048, (2, 3, 4, 7))
    assert variant.label == "packed_fp8[rowwise,min2048,L2-4,7]"
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_variant("packed:recipe=rowwise", args)
    graphs = bench.parse_variant("packed:cu_pad=64:compile=reduce-overhead", args)
    assert (graphs.cu_pad, graphs.compile_mode) == (64, "reduce-overhead")
    assert graphs.label == "packed[compile=reduce-overhead,cu_pad=64]"
    mlp = bench.parse_variant("packed_fp8:modules=mlp+attention.qkv_proj", args)
    assert mlp.fp8_modules == ("mlp", "attention.qkv_proj")
    assert mlp.label == "packed_fp8[rowwise,modules=mlp+attention.qkv_proj]"
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_variant("padded:cu_pad=64", args)
    tuned = bench.parse_variant("packed:inductor=coordinate_descent+multi_kernel", args)
    assert tuned.compile_presets == ("coordinate_descent", "multi_kernel")
    assert tuned.label == "packed[inductor=coordinate_descent+multi_kernel]"
    with pytest.raises(ValueError, match="unknown inductor presets"):
        bench.parse_variant("packed:inductor=fast", args)
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_variant("hf_padded:inductor=coordinate_descent", args)


def _toy_examples(bench, lengths: list[int]) -> list:
    rng = torch.Generator().manual_seed(0)
    examples = []
    for length in lengths:
        ids = torch.randint(4, 29, (length,), generator=rng).numpy()
        labels = ids.copy()
        labels[::3] = -100
        examples.append(bench.Example(ids, labels))
    return examples


def _check_batches(bench, plans, case) -> None:
    """Fixed-shape packed micro-batches within budget, and the padded batches train the same labels."""
    for plan in plans:
        assert len(plan.packs) == case.grad_acc
        for pack in plan.packs:
            real = sum(len(e) for e in pack)
            assert real <= case.tokens
            batch = bench.packed_batch(pack, case)
            assert batch["input_ids"].shape == (1, case.tokens)  # fixed shape: one compile
            assert batch["max_length_q"] == case.max_length
            assert (batch["labels"][0, real:] == -100).all()
        padded = bench.padded_batches(plan.sequences, case)
        sizes = [b["input_ids"].shape[0] for b in padded]
        assert len(sizes) == -(-len(plan.sequences) // case.mb) and max(sizes) <= case.mb
        assert max(sizes) - min(sizes) <= 1
        packed_labels = torch.cat([bench.packed_batch(p, case)["labels"][0] for p in plan.packs])
        padded_labels = torch.cat([b["labels"][b["attention_mask"].bool()] for b in padded])
        assert torch.equal(packed_labels[packed_labels != -100], padded_labels[padded_labels != -100])


def test_greedy_steps_and_batches_hold_the_same_sequences(bench) -> None:
    examples = _toy_examples(bench, torch.randint(5, 60, (200,), generator=torch.Generator().manual_seed(0)).tolist())
    case = bench.ModelCase("toy", "esm2", "debug", "uniref", max_length=64, mb=3, tokens=128, grad_acc=2)
    plans = bench.plan_steps(examples, case, num_steps=5)
    flat = [e for plan in plans for e in plan.sequences]
    assert all(a is b for a, b in zip(flat, examples)) and len(flat) < len(examples)  # in order, whole, none skipped
    _check_batches(bench, plans, case)


def test_split_packing_fills_every_micro_batch_with_the_same_tokens(bench) -> None:
    # The OpenGenome2 pattern: a full window and a 4-token tail per contig; greedy packing pads half of every batch.
    examples = _toy_examples(bench, [64, 4] * 20)
    greedy = bench.ModelCase("toy", "llama3", "debug", "dna", max_length=64, mb=2, tokens=128, packing="greedy")
    assert all(sum(map(len, p.packs[0])) == 68 for p in bench.plan_steps(examples, greedy, num_steps=4))
    case = dataclasses.replace(greedy, packing="split", grad_acc=2)
    plans = bench.plan_steps(examples, case, num_steps=4)
    assert all(sum(map(len, pack)) == case.tokens for plan in plans for pack in plan.packs)  # 0% padding
    pieces = [e for plan in plans for e in plan.sequences]
    stream = np.concatenate([e.input_ids for e in examples])
    assert np.array_equal(np.concatenate([e.input_ids for e in pieces]), stream[: 8 * case.tokens])  # nothing lost
    # A cut-off tail is a new causal segment: its first token has no label; every other label is the original one.
    labels = np.concatenate([e.labels for e in pieces])
    original = np.concatenate([e.labels for e in examples])[: len(labels)]
    piece_starts = set(np.cumsum([0] + [len(e) for e in pieces])[:-1].tolist())
    example_starts = set(np.cumsum([0] + [len(e) for e in examples])[:-1].tolist())
    cuts = sorted(piece_starts - example_starts)
    assert cuts and np.array_equal(np.flatnonzero(labels != original), [c for c in cuts if original[c] != -100])
    assert (labels[cuts] == -100).all()
    _check_batches(bench, plans, case)


def test_case_and_variant_labels_name_every_non_default(bench) -> None:
    assert bench.parse_model("esm2_650M").label == "esm2_650M"
    assert bench.parse_model("esm2_650M:tokens=32768").label == "esm2_650M:tokens=32768"
    assert bench.parse_model("llama3_1B").packing == "split"
    assert bench.parse_model("llama3_1B:packing=greedy").label == "llama3_1B:packing=greedy"
    with pytest.raises(ValueError, match="packing must be"):
        bench.parse_model("llama3_1B:packing=first_fit")
    entries = bench.expand_models("@tokens-esm2,llama3_1B")
    assert entries[-1] == "llama3_1B" and "esm2_650M:tokens=32768" in entries
    assert len({bench.parse_model(e).label for e in entries}) == len(entries)  # distinct rows in one report
    with pytest.raises(ValueError, match="unknown model suite"):
        bench.expand_models("@nope")
    args = bench.parse_args(["--param-dtype", "bf16"])
    assert bench.parse_variant("packed", args).label == "packed[params=bf16]"
    assert bench.parse_variant("packed_fp8", args).label == "packed_fp8[tensorwise,params=bf16]"
    assert bench.parse_variant("packed:params=fp32", args).label == "packed"
    variant = bench.parse_variant("padded:params=bf16-master:compile=max-autotune-no-cudagraphs", args)
    assert variant.label == "padded[params=bf16-master,compile=max-autotune-no-cudagraphs]"
    with pytest.raises(ValueError, match="params must be"):
        bench.parse_variant("packed:params=fp16", args)
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_variant("hf_padded:compile=max-autotune", args)
    assert bench.parse_variant("packed:attn=FA4", args).label == "packed[params=bf16,attn=FA4]"
    with pytest.raises(ValueError, match="unknown options"):
        bench.parse_variant("padded:attn=FA4", args)
    with pytest.raises(ValueError, match="attn must be"):
        bench.parse_variant("packed:attn=FA2", args)


@pytest.mark.parametrize(("warmup", "freq"), [(5, 10), (4, 1), (1, 2), (12, 10), (10, 10)])
def test_quant_stats_first_record_falls_on_the_last_warmup_step(bench, warmup: int, freq: int) -> None:
    offset = bench.quant_stats_step_offset(warmup, freq)
    recorded = [index for index in range(warmup + 3 * freq) if (index + 1 + offset) % freq == 0]
    assert recorded[0] <= warmup - 1  # the one-time compile of the stats variant happens in the warm-up, untimed
    timed = [index for index in recorded if index >= warmup]
    assert timed == [warmup - 1 + freq * k for k in (1, 2, 3)]  # then every freq-th step, from the last warm-up one
    assert bench.quant_stats_step_offset(0, 10) == 0


def test_master_weight_adamw_tracks_fp32_adamw(bench) -> None:
    torch.manual_seed(0)
    reference = torch.nn.Linear(16, 8)
    model = torch.nn.Linear(16, 8)
    model.load_state_dict(reference.state_dict())
    masters = [p.detach().clone() for p in model.parameters()]
    model.to(torch.bfloat16)
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}
    optimizer = bench.MasterWeightAdamW(model.parameters(), masters, **kwargs)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), **kwargs)
    for _ in range(20):
        x = torch.randn(32, 16)
        for net, opt in ((model, optimizer), (reference, ref_optimizer)):
            net(x.to(next(net.parameters()).dtype)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert model.weight.dtype == torch.bfloat16 and optimizer.masters[0].dtype == torch.float32
    # Masters follow fp32 AdamW up to the bf16 rounding of the forward; the bf16 weights are the rounded masters.
    torch.testing.assert_close(optimizer.masters[0], reference.weight.detach(), atol=2e-2, rtol=0)
    assert torch.equal(model.weight, optimizer.masters[0].to(torch.bfloat16))
    assert all(p.grad is None for p in [*model.parameters(), *optimizer.masters])


@pytest.mark.slow
def test_quick_cpu_run_agrees_across_variants(bench, shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao.float8")
    code = bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--models",
            "esm2_debug",
            "--data-dir",
            str(shared_data),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    (report,) = tmp_path.glob("*.md")
    text = report.read_text()
    for variant in ("hf_padded", "padded", "packed", "packed_fp8[tensorwise]"):
        assert f"| esm2_debug | {variant} |" in text
    assert "--quick" in text  # the exact command is recorded
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows)
    first = {row["variant"]: row["first_loss"] for row in rows}
    assert first["padded"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed"] == pytest.approx(first["hf_padded"], rel=1e-4)
    assert first["packed_fp8[tensorwise]"] == pytest.approx(first["hf_padded"], rel=2e-2)


REFERENCE_DIR = Path(os.environ.get("BIOSCALE_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def test_quick_amplify_run_matches_the_published_reference(bench, shared_data: Path, tmp_path: Path) -> None:
    """The ref_padded row is chandar-lab's AMPLIFY with the bioscale init's weights on the same masked batches: its
    first loss equals bioscale's (bf16 autocast, as the reference only runs in bf16), and the packed and padded rows
    agree with each other in fp32."""
    if not (REFERENCE_DIR / "amplify_reference").is_dir():
        pytest.skip("../shared/reference/amplify_reference not present")
    code = bench.main(
        ["--quick", "--device", "cpu", "--models", "amplify_debug", "--variants", "ref_padded,padded,packed",
         "--steps", "2", "--warmup", "1", "--data-dir", str(shared_data), "--reference-dir", str(REFERENCE_DIR),
         "--out-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    (report,) = tmp_path.glob("*.md")
    rows = json.loads(report.with_suffix(".json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 3
    first = {row["variant"]: row["first_loss"] for row in rows}
    assert first["packed"] == pytest.approx(first["padded"], rel=1e-4)
    assert first["ref_padded"] == pytest.approx(first["padded"], rel=2e-2)  # bf16 vs fp32
    assert "| amplify_debug | ref_padded |" in report.read_text()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packing_report_on_the_dna_sample(shared_data: Path) -> None:
    report = _load_script("packing_report")
    lines = report.bench_plan_report("llama3_1B:packing=greedy,llama3_1B", 4, shared_data)
    assert "pad 50.0%" in lines[0] and "pad 0.0%" in lines[1]
    # The recipe as shipped takes one random 8,190-nt crop per ~8,192-bp contig: two per micro-batch, every batch full.
    shipped = report.loader_report("L1_llama3_1B", [], rank=0, world_size=1, num_batches=8)
    assert "fill 100.0%" in shipped
    # Windowing instead yields a full window plus a short tail per contig; the loader deals them by token balance, so
    # no worker is left with tails only (no batch under half full), but greedy packing still leaves fill well below 100%.
    windowed = report.loader_report("L1_llama3_1B", ["data.crop=window"], rank=0, world_size=1, num_batches=8)
    assert "batches under half full 0" in windowed and "fill 100.0%" not in windowed


def test_roofline_counts(bench, shared_data: Path) -> None:
    roofline = _load_script("roofline")
    examples = bench.load_examples("dna", 8192, shared_data, seed=0, limit=None)
    split, greedy = (
        roofline.roofline(bench.parse_model(m), examples, num_steps=4, params="fp32")
        for m in ("llama3_1B", "llama3_1B:packing=greedy")
    )
    assert split["real_tokens"] == 16384 and greedy["real_tokens"] == 8196
    assert split["gemm_flops"] == greedy["gemm_flops"]  # the GEMMs run over the padding too
    assert split["ceiling_sum_H200"] > 1.9 * greedy["ceiling_sum_H200"]
    bf16 = roofline.roofline(bench.parse_model("llama3_1B"), examples, num_steps=4, params="bf16")
    assert bf16["optimizer_gb"] < split["optimizer_gb"] and bf16["activation_gb"] < split["activation_gb"]


# ---- learning-rate schedule, loss comparison, params=fsdp ---------------------------------------------------------


def test_lr_schedule_decays_only_for_a_loss_comparison(bench) -> None:
    args = bench.parse_args(["--loss-compare-steps", "500"])
    assert args.warmup + args.steps == 500
    assert (args.lr_warmup_steps, args.lr_min_ratio, args.max_grad_norm) == (50, 0.1, 1.0)  # the trainer's clip
    lrs = [bench.lr_at(step, args) for step in range(500)]
    assert lrs[0] == pytest.approx(4e-4 / 50)  # the first update is not wasted at lr 0
    assert lrs[24] == pytest.approx(4e-4 * 25 / 50)
    assert lrs[49] == pytest.approx(4e-4) and lrs[50] == pytest.approx(4e-4)  # peak at the end of the warm-up
    assert lrs[-1] == pytest.approx(4e-4 * (1 - 0.9 * 449 / 450))  # ~10% of the peak at the last step
    assert all(a < b for a, b in itertools.pairwise(lrs[:50])) and all(a > b for a, b in itertools.pairwise(lrs[50:]))
    # Throughput runs warm up over the untimed steps, then keep a constant lr (the timed steps all run at the peak);
    # they clip like the trainer.
    plain = bench.parse_args([])
    assert (plain.lr_warmup_steps, plain.lr_min_ratio, plain.max_grad_norm) == (plain.warmup, 1.0, 1.0)
    assert bench.lr_at(0, plain) < 4e-4
    assert {bench.lr_at(step, plain) for step in range(plain.warmup - 1, plain.warmup + plain.steps)} == {4e-4}
    # Explicit values win; --lr-warmup is the old spelling.
    custom = bench.parse_args(
        ["--loss-compare-steps", "500", "--lr-warmup", "100", "--lr", "2e-4", "--max-grad-norm", "0"]
    )
    assert (custom.lr_warmup_steps, custom.max_grad_norm) == (100, 0.0)
    assert bench.lr_at(99, custom) == pytest.approx(2e-4) and bench.lr_at(0, custom) == pytest.approx(2e-6)
    with pytest.raises(SystemExit):
        bench.parse_args(["--lr-min-ratio", "1.5"])


def test_find_spikes_and_compare_losses(bench) -> None:
    flat = [3.0] * 60
    assert bench.find_spikes(flat) == []
    spiky = list(flat)
    spiky[5] = 9.0  # inside the first window: no running mean yet, never flagged
    spiky[30] = 3.7  # 1.23x the mean of the 20 steps before it
    spiky[31] = 3.55  # the mean now includes the spike: 3.55 < 1.2 x 3.035
    spiky[45] = float("nan")
    assert bench.find_spikes(spiky) == [30, 45]
    assert bench.find_spikes([3.0] * 30 + [3.59]) == []  # 1.197x: under the threshold
    stats = bench.compare_losses([2.0] * 10 + [3.0] * 10, [2.5] * 10 + [3.0] * 9 + [2.4], tail=10)
    assert stats["reference_mean"] == pytest.approx(3.0) and stats["mean"] == pytest.approx(2.94)
    assert stats["relative_difference"] == pytest.approx(-0.02)
    assert stats["max_abs_step_difference"] == pytest.approx(0.6)  # the last step, not the earlier 0.5 gap
    with pytest.raises(ValueError, match="step by step"):
        bench.compare_losses([1.0] * 3, [1.0] * 4, tail=2)


def test_loss_compare_report_on_fake_rows(bench) -> None:
    steps = 100
    reference = [3.0 - 0.005 * i for i in range(steps)]
    close = [value * 1.002 for value in reference]
    spiky = list(reference)
    spiky[95] = 5.0
    rows = [
        bench.Result("esm2_3B", "packed_fp8[tensorwise]", losses=close),
        bench.Result("esm2_3B", "packed", losses=reference),
        bench.Result("esm2_3B", "packed[params=bf16]", losses=spiky),
        bench.Result("esm2_3B", "packed[params=fsdp]", status="OOM"),
        bench.Result("esm2_3B", "packed[params=bf16-master]", losses=reference[:50]),
    ]
    text = bench.render_loss_compare(rows, tail=10)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("- esm2_3B"))
    assert "packed: 2.5275" in header and "no spike" in header  # packed is the reference even when not first
    fp8 = next(line for line in lines if "packed_fp8[tensorwise]:" in line)
    assert "(+0.20% vs packed)" in fp8 and "over those steps 0.0051" in fp8 and fp8.endswith("no spike")
    bf16 = next(line for line in lines if "packed[params=bf16]:" in line)
    assert "1 spike step(s): 95 (5.00)" in bf16 and "over those steps 2.4750" in bf16
    assert "params=fsdp" not in text  # failed rows have no curve
    assert "packed[params=bf16-master]: 50 steps, not 100: not compared" in text


def test_loss_compare_of_2026_11_22_shows_spikes_in_both_runs(bench) -> None:
    """The stored 500-step 3B run (fp32 weights, 8k tokens, 50-step warm-up then a constant 4e-4, no clipping)."""
    path = REPO_ROOT / "benchmarks" / "results" / "json" / "2026-11-22-nvidia-h200-loss-compare.json"
    rows = {row["variant"]: row["losses"] for row in json.loads(path.read_text())["rows"]}
    bf16, fp8 = rows["packed"], rows["packed_fp8[tensorwise]"]
    assert bench.find_spikes(bf16) == [118, 124, 125, 126] and bench.find_spikes(fp8) == [94]
    stats = bench.compare_losses(bf16, fp8, tail=50)
    assert stats["relative_difference"] == pytest.approx(-0.0338, abs=1e-4)
    assert stats["max_abs_step_difference"] == pytest.approx(0.1402, abs=1e-4)


def test_params_fsdp_variant_option(bench) -> None:
    args = bench.parse_args([])
    assert bench.parse_variant("packed:params=fsdp", args).label == "packed[params=fsdp]"
    assert bench.parse_variant("packed_fp8:params=fsdp", args).label == "packed_fp8[tensorwise,params=fsdp]"
    with pytest.raises(ValueError, match="needs a bioscale model"):
        bench.parse_variant("hf_padded:params=fsdp", args)


def test_fsdp_model_starts_from_the_reference_init(bench, monkeypatch) -> None:
    """FSDP2's sharded init may draw other numbers than the plain model's (it does on CUDA), so the variant loads
    reference_init after materialising; a reference that differs from the seed's init must therefore show up."""
    import torch.distributed as dist

    args = bench.parse_args(["--device", "cpu", "--compile", "off"])
    case = bench.parse_model("esm2_debug:ac=selective")
    device = torch.device("cpu")
    reference = bench.reference_init(case, device, args.seed)
    marked = {name: tensor + 1.0 if tensor.is_floating_point() else tensor for name, tensor in reference.items()}
    # A copy per call: set_model_state_dict turns the values of the dict it is given into DTensors.
    monkeypatch.setattr(bench, "reference_init", lambda *_: {name: t.clone() for name, t in marked.items()})
    with bench.one_rank_process_group(device):
        model, notes, masters = bench.build_variant_model(
            case, bench.parse_variant("packed:params=fsdp", args), device, args
        )
        assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in model.parameters())
        state = model.state_dict()  # the plain names (the AC wrapper's prefix stripped), sharded values
        assert state.keys() == marked.keys()
        for name, value in state.items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            assert torch.equal(full, marked[name]), name
        assert masters is None and "FSDP2 on one rank" in notes[-1]
        del model
    assert not dist.is_initialized()  # the one-rank group is gone with the block


@pytest.mark.slow
def test_quick_cpu_fsdp_run_matches_packed(bench, shared_data: Path, tmp_path: Path) -> None:
    """``packed:params=fsdp`` (FSDP2 on one gloo rank, fp32 on CPU) trains exactly like ``packed``: same initial
    weights, same batches, gradients accumulated over two micro-batches and reduce-scattered once, clipped alike."""
    import torch.distributed as dist

    model = "esm2_debug:ac=selective:grad_acc=2"
    argv = ["--quick", "--device", "cpu", "--models", model, "--variants", "packed,packed:params=fsdp",
            "--max-grad-norm", "1.0", "--data-dir", str(shared_data), "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    assert not dist.is_initialized()
    (report,) = tmp_path.glob("*.json")
    rows = {row["variant"]: row for row in json.loads(report.read_text())["rows"]}
    packed, fsdp = rows["packed"], rows["packed[params=fsdp]"]
    assert fsdp["status"] == "ok" and fsdp["tokens_per_s"] > 0
    assert "FSDP2 on one rank" in fsdp["notes"]
    assert len(fsdp["losses"]) == len(packed["losses"]) == 3
    assert fsdp["losses"][0] == packed["losses"][0]  # identical initial weights and batch
    np.testing.assert_allclose(fsdp["losses"], packed["losses"], rtol=1e-5)
    np.testing.assert_allclose(fsdp["grad_norms"], packed["grad_norms"], rtol=1e-4)
    assert packed["grad_norms"][0] > 1.0  # clipping was active, so it was compared too


# ---- profile breakdown --------------------------------------------------------------------------------------------


def test_kernel_families_of_real_h100_kernel_names(bench) -> None:
    names = {  # from the 2026-11-22 H100 profiles of ESM-2 650M and Llama 3 1B
        "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "GEMM",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128": "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, cutlass::bf": "attention",
        "triton_poi_fused__to_copy_add_div_erf_exp_mul_neg_pow_view_4": "activation",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedOpti": "optimizer",
        "triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_view_10": "norm",
        "triton_poi_fused__to_copy_add_cat_mul_neg_slice_stack_unsqueeze_8": "copy / cast",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Te": "copy / cast",
        "triton_red_fused_abs_amax_0": "FP8 scaling",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>": "other",
    }
    assert {name: bench.kernel_category(name) for name in names} == names


def test_kernel_summary_sums_families_and_reports_idle_time(bench) -> None:
    times_us = {"nvjet_a": 3000.0, "nvjet_b": 1000.0, "flash_fwd": 2000.0, "fill": 500.0}  # over 2 steps
    rows = bench.summarize_kernels(times_us, num_steps=2, wall_ms_per_step=4.0)
    assert [(r["category"], r["ms_per_step"]) for r in rows] == [
        ("GEMM", 2.0),
        ("attention", 1.0),
        ("other", 0.25),
        ("GPU idle", 0.75),
    ]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_profile_steps_runs_the_steps_with_clipping(bench) -> None:
    # On CPU the profiler records no CUDA kernels: the whole timed step counts as GPU idle; the steps still train.
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.ones(2, 4)
    clipped = []

    def clip() -> None:
        clipped.append(bench.clip_grad_norm(model, 1.0))

    before = model.weight.detach().clone()
    top, families = bench.profile_steps(
        [([batch], [2], 2)] * 3,
        lambda b, count: model(b).sum(),
        optimizer,
        contextlib.nullcontext(),
        torch.device("cpu"),
        clip=clip,
        step_ms=5.0,
    )
    assert len(clipped) == 3 and not torch.equal(model.weight, before)
    assert top == [] and families == [{"category": "GPU idle", "ms_per_step": 5.0, "share": 1.0}]
