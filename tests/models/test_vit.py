"""The ViT family against its referees: timm's ``VisionTransformer`` (every configuration bioscale builds) and
``transformers``' ``ViTForImageClassification`` (the plain subset), float32 logits within 1e-4 on random small
configs, exact round trips both ways; the Auto classes, meta init, input checks, FLOP count, FP8 emulation, and the
L0 recipe through ``bioscale train`` / ``bioscale eval`` / ``bioscale embed``."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
from transformers import ViTConfig, ViTForImageClassification, ViTModel
from vit_reference import import_timm, timm_vit

from bioscale.models import build_config, build_model, get_model_spec, to_hf
from bioscale.models.vit import (
    VitConfig,
    VitForImageClassification,
    VitModel,
    config_from_timm,
    flops_per_image,
    from_hf,
    from_timm,
    hf_unsupported,
    to_timm,
)
from bioscale.models.vit.modeling import drop_path

ATOL = 1e-4  # float32 logits of the same weights through different kernels (the brief's bound)

# timm keyword arguments of random small configurations (32x32 images, 8x8 patches = 16 patches), covering every
# switch bioscale implements.
TIMM_CASES: dict[str, dict[str, Any]] = {
    "recipe_map_registers_qknorm": dict(reg_tokens=8, qk_norm=True, global_pool="map"),
    "recipe_fc_norm_after_map": dict(reg_tokens=4, qk_norm=True, global_pool="map", fc_norm=True),
    "plain_token": dict(global_pool="token"),
    "avg_no_class_token": dict(class_token=False, global_pool="avg"),
    "no_embed_class_pre_norm_no_qkv_bias": dict(reg_tokens=2, no_embed_class=True, pre_norm=True, qkv_bias=False),
    "no_final_norm_eps_1e-5": dict(final_norm=False, global_pool="avg", norm_layer="layernorm"),
}


def _timm_kwargs(case: dict[str, Any], num_classes: int = 7) -> dict[str, Any]:
    kwargs = dict(img_size=32, patch_size=8, in_chans=3, num_classes=num_classes, embed_dim=64, depth=2, num_heads=4,
                  mlp_ratio=3.0, **case)  # fmt: skip
    if kwargs.get("norm_layer") == "layernorm":  # torch's LayerNorm, eps 1e-5 (timm's default is 1e-6)
        kwargs["norm_layer"] = torch.nn.LayerNorm
    return kwargs


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every tensor (norm scales and biases too, which initialise to 1 / 0): a stronger check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _pixels(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- timm ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(TIMM_CASES), ids=list(TIMM_CASES))
def test_logits_match_timm(case: str) -> None:
    reference = _perturb(timm_vit(**_timm_kwargs(TIMM_CASES[case])))
    model = from_timm(reference).eval()
    assert type(model) is VitForImageClassification
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference(x), atol=ATOL, rtol=0)
        # channels-last input (what the benchmark feeds timm) changes nothing either
        torch.testing.assert_close(model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits,
                                   reference(x), atol=ATOL, rtol=0)  # fmt: skip


@pytest.mark.parametrize("case", list(TIMM_CASES), ids=list(TIMM_CASES))
def test_feature_extractor_matches_timm_features(case: str) -> None:
    reference = _perturb(timm_vit(**_timm_kwargs(TIMM_CASES[case], num_classes=0)))
    model = from_timm(reference).eval()
    assert type(model) is VitModel
    x = _pixels()
    with torch.no_grad():
        out = model(pixel_values=x)
        features = reference.forward_features(x)
        torch.testing.assert_close(out.pooler_output, reference(x), atol=ATOL, rtol=0)  # num_classes=0: pooled
        torch.testing.assert_close(out.last_hidden_state, features, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.patch_embeddings, features[:, reference.num_prefix_tokens :], atol=ATOL, rtol=0)
    assert out.patch_embeddings.shape == (3, 16, 64)


def test_round_trips_through_timm_are_tensor_identical() -> None:
    import_timm()  # skips where timm is not installed (to_timm imports it)
    torch.manual_seed(0)
    model = build_model(build_config("vit", "debug", num_labels=5), device="cpu").eval()
    timm_model = to_timm(model)
    back = from_timm(timm_model)
    assert set(back.state_dict()) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    for key in ("image_size", "patch_size", "num_register_tokens", "qk_norm", "global_pool", "use_fc_norm",
                "num_labels", "layer_norm_eps", "intermediate_size", "no_embed_class"):  # fmt: skip
        assert getattr(back.config, key) == getattr(model.config, key), key
    reference = _perturb(timm_vit(**_timm_kwargs(TIMM_CASES["recipe_map_registers_qknorm"])))
    again = to_timm(from_timm(reference))
    assert set(again.state_dict()) == set(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_config_read_from_timm_is_the_recipe_shape() -> None:
    timm = import_timm()
    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000, reg_tokens=8,
                                      qk_norm=True, global_pool="map")  # fmt: skip
    config = config_from_timm(reference)
    recipe = build_config("vit", "base", num_labels=1000)
    for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "qkv_bias", "qk_norm", "layer_norm_eps", "class_token", "num_register_tokens",
                "no_embed_class", "pre_norm", "final_norm", "use_fc_norm", "global_pool", "num_labels"):  # fmt: skip
        assert getattr(config, key) == getattr(recipe, key), key


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_sizes_have_timms_parameter_count(size: str) -> None:
    timm = import_timm()
    name = {"small": "vit_small_patch16_224", "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}[size]
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=1000, reg_tokens=8, qk_norm=True,
                                      global_pool="map")  # fmt: skip
    model = build_model(build_config("vit", size, num_labels=1000), device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_drop_path_rates_rise_like_timms() -> None:
    reference = timm_vit(**_timm_kwargs({"drop_path_rate": 0.2}))
    model = from_timm(reference)
    assert model.config.drop_path_rate == pytest.approx(0.2)
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in reference.blocks]
    assert [b.drop_path_rate for b in model.vit.layers] == pytest.approx(rates)
    model.train()
    x = _pixels()
    torch.manual_seed(0)
    first = model(pixel_values=x).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, model(pixel_values=x).logits)  # stochastic depth acts in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(init_values=1e-5), "LayerScale"),
        (dict(dynamic_img_size=True), "dynamic image size"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(patch_drop_rate=0.1), "patch dropout"),
        (dict(pos_embed="none"), "position embedding"),
    ],
)
def test_timm_settings_bioscale_does_not_implement_are_refused_by_name(kwargs: dict, named: str) -> None:
    reference = timm_vit(**_timm_kwargs(kwargs))
    with pytest.raises(ValueError, match=named):
        from_timm(reference)


# ---- transformers -------------------------------------------------------------------------------------------------


def _hf_config(**overrides: Any) -> ViTConfig:
    values = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                  patch_size=8, num_labels=6, layer_norm_eps=1e-12, hidden_act="gelu")  # fmt: skip
    return ViTConfig(**{**values, **overrides})


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_match_transformers(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    reference = _perturb(ViTForImageClassification(_hf_config(qkv_bias=qkv_bias))).eval()
    model = from_hf(reference).eval()
    assert type(model) is VitForImageClassification and model.config.global_pool == "token"
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, reference(pixel_values=x).logits, atol=ATOL, rtol=0)
    base = _perturb(ViTModel(_hf_config(qkv_bias=qkv_bias), add_pooling_layer=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_hf(base).eval()(pixel_values=x).last_hidden_state,
                                   base(pixel_values=x).last_hidden_state, atol=ATOL, rtol=0)  # fmt: skip


def test_round_trips_through_transformers_are_tensor_identical() -> None:
    torch.manual_seed(0)
    reference = _perturb(ViTForImageClassification(_hf_config())).eval()
    again = to_hf(from_hf(reference))
    assert type(again) is ViTForImageClassification
    assert set(again.state_dict()) == set(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key
    plain = build_model(build_config("vit", "debug", num_labels=4, num_register_tokens=0, qk_norm=False,
                                     global_pool="token", layer_norm_eps=1e-12), device="cpu").eval()  # fmt: skip
    back = from_hf(to_hf(plain))
    for key, tensor in plain.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    base = plain.vit
    hf_base = to_hf(base)
    assert type(hf_base) is ViTModel and hf_base.pooler is None
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(hf_base(pixel_values=x).last_hidden_state, base(pixel_values=x).last_hidden_state,
                                   atol=ATOL, rtol=0)  # fmt: skip


def test_converted_models_hold_no_meta_tensors_and_move() -> None:
    """Conversion builds on the meta device and loads the weights; the non-persistent stochastic-depth rate (in no
    state dict) must be computed too, or ``.to(device)`` fails ("Cannot copy out of meta tensor", seen on the GPU)."""
    torch.manual_seed(0)
    model = from_hf(ViTForImageClassification(_hf_config()).eval())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model = model.to("cpu", torch.float64)  # a real copy of every tensor: fails on a meta buffer
    assert all(float(block.drop_path_prob) == block.drop_path_rate for block in model.vit.layers)


def test_configs_transformers_cannot_express_are_refused_by_name() -> None:
    recipe = build_config("vit", "debug")
    reason = hf_unsupported(recipe)
    assert reason is not None
    for field in ("num_register_tokens=8", "qk_norm=True", "global_pool='map'"):
        assert field in reason
    model = build_model(recipe, device="cpu")
    with pytest.raises(ValueError, match="num_register_tokens=8"):
        to_hf(model)
    plain = build_config("vit", "debug", num_register_tokens=0, qk_norm=False, global_pool="token")
    assert hf_unsupported(plain) is None
    assert get_model_spec("vit").hf_unsupported is hf_unsupported


def test_a_saved_transformers_checkpoint_loads_through_load_model(tmp_path: Path) -> None:
    from bioscale.use.loading import load_model

    torch.manual_seed(0)
    reference = _perturb(ViTForImageClassification(_hf_config(id2label={i: f"c{i}" for i in range(6)}))).eval()
    reference.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf", task="image_classification")
    assert type(loaded.model) is VitForImageClassification and loaded.model.config.id2label[5] == "c5"
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(pixel_values=x).logits, reference(pixel_values=x).logits, atol=ATOL,
                                   rtol=0)  # fmt: skip
    # No preprocessor_config.json: bioscale's processor for the model's size.
    assert (loaded.tokenizer.size["height"], loaded.tokenizer.size["width"]) == (32, 32)


# ---- bioscale itself ----------------------------------------------------------------------------------------------


def test_save_and_load_are_identical_through_the_auto_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(build_config("vit", "debug", num_labels=3), device="cpu").eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VitConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is VitForImageClassification
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    x = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, atol=0, rtol=0)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is VitModel
        torch.testing.assert_close(base(pixel_values=x).pooler_output, model.vit(pixel_values=x).pooler_output,
                                   atol=0, rtol=0)  # fmt: skip


def test_meta_build_then_init_is_complete_and_idempotent() -> None:
    config = build_config("vit", "debug", num_labels=4)
    model = build_model(config)
    assert all(p.is_meta for p in model.parameters())
    model.init_weights()  # a no-op on meta
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in first.values())
    torch.manual_seed(3)
    model.init_weights()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    embeddings = model.vit.embeddings
    assert embeddings.cls_token.abs().max() < 1e-4 and embeddings.register_tokens.abs().max() < 1e-4  # N(0, 1e-6)
    assert 0.01 < embeddings.position_embeddings.std() < 0.03  # trunc normal 0.02
    assert 0.01 < model.vit.layers[0].attention.qkv_proj.weight.std() < 0.03
    # transformers' loading hook fills only what loading did not: it never clobbers a loaded tensor.
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            tensor._is_hf_initialized = True
        model._init_weights(module)
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_raise_with_the_reason() -> None:
    model = build_model(build_config("vit", "debug", num_labels=3), device="cpu").eval()
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\].*got \(2, 3, 24, 24\)"):
        model(pixel_values=torch.zeros(2, 3, 24, 24))
    with pytest.raises(ValueError, match="channels first"):
        model(pixel_values=torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match="float tensor"):
        model(pixel_values=torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs pixel_values"):
        model()
    with pytest.raises(ValueError, match=r"class ids outside \[0, 3\)"):
        model(pixel_values=torch.zeros(2, 3, 32, 32), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be integer class ids of shape"):
        model(pixel_values=torch.zeros(2, 3, 32, 32), labels=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="unexpected keyword argument 'pixel_value'"):
        model(pixel_value=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size .* must be a multiple of patch_size"):
        build_config("vit", "debug", image_size=30)
    with pytest.raises(ValueError, match="global_pool='token' needs the class token"):
        build_config("vit", "debug", class_token=False, global_pool="token")


def test_loss_sums_and_counts_labelled_images_only() -> None:
    model = build_model(build_config("vit", "debug", num_labels=3), device="cpu").eval()
    x, labels = _pixels(4), torch.tensor([0, 2, -100, 1])
    with torch.no_grad():
        mean = model(pixel_values=x, labels=labels)
        total = model(pixel_values=x, labels=labels, loss_reduction="sum")
        logits = mean.logits
    assert int(total.num_label_tokens) == 3
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total.loss, expected)
    torch.testing.assert_close(mean.loss, expected / 3)


def test_flops_per_image_equal_three_times_the_counted_forward() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for size in ("debug", "small"):
        config = build_config("vit", size, num_labels=10)
        model = build_model(config, device="meta")
        model.to_empty(device="cpu")  # values do not matter to a FLOP count
        model.requires_grad_(False)  # FlopCounterMode's module tracker trips over no_grad with trainable params
        counter = FlopCounterMode(display=False)
        # The math SDPA kernel is plain matmuls, which the counter sees (the fused CPU kernel it does not count).
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(pixel_values=torch.zeros(1, 3, config.image_size, config.image_size))
        assert flops_per_image(config) == pytest.approx(3 * counter.get_total_flops(), rel=1e-9), size
    # MFU's numerator: the spec's per-"token" FLOPs are per image (the loop counts an image as one token)
    config = build_config("vit", "debug", num_labels=10)
    assert get_model_spec("vit").flops_per_token(config, 1) == flops_per_image(config)


def test_fp8_converted_blocks_run_emulated_close_to_bf16() -> None:
    pytest.importorskip("torchao")
    from bioscale.precision import apply_fp8

    torch.manual_seed(0)
    model = build_model(build_config("vit", "debug", num_labels=3), device="cpu").eval()
    x = _pixels(16)  # 16 images x 25 tokens = 400 rows: a multiple of 16, as FP8 GEMMs need
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    apply_fp8(model, recipe="tensorwise", emulate=True)
    converted = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted and all(n.startswith("vit.layers.") for n in converted)  # blocks only: pool and head stay
    with torch.no_grad():
        fp8 = model(pixel_values=x).logits
    assert torch.isfinite(fp8).all() and (fp8 - reference).abs().max() < 0.1 * reference.abs().max() + 0.05


# ---- the L0 recipe: bioscale train / eval / embed -----------------------------------------------------------------


def _needs_digits() -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("demo:digits ships with scikit-learn (in the dev and vit extras)")


def _l0_config(run_dir: Path, *extra: str) -> Any:
    from bioscale.train.config import load_config

    _needs_digits()
    return load_config("L0_sanity_vit", [
        "device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_n_steps=1",
        "checkpoint.save_every_n_steps=0", f"run_dir={run_dir}", *extra,
    ])  # fmt: skip


@pytest.mark.slow  # the whole recipe: 400 steps, ~25-50 s on a (shared) CPU core
def test_l0_sanity_vit_trains_to_held_out_accuracy_far_above_chance(tmp_path: Path) -> None:
    from bioscale.pipeline.stages import evaluate
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    summary = train(_l0_config(tmp_path / "run"))
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 400 and summary["model"] == "vit/debug"
    # An untrained classifier is near uniform over the 10 digits: ln(10) = 2.30.
    assert losses[0] == pytest.approx(math.log(10), abs=0.15)
    policy = summary["data_policy"]
    assert policy["unreadable"] == 0 and policy["converted_to_rgb"] == policy["images_read"] > 400 * 64
    assert summary["tokens_per_sec_per_gpu"] > 0  # images/s for this family
    final = Path(summary["final_model"])
    assert (final / "preprocessor_config.json").is_file() and summary["final_model_hf"] is None  # registers: no HF
    processor = AutoImageProcessor.from_pretrained(final)
    assert (processor.size["height"], processor.size["width"]) == (32, 32) and list(processor.image_mean) == [0.5] * 3
    result = evaluate(final, out=tmp_path / "eval", data="demo:digits-test", device="cpu")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics == result.metadata.metrics and metrics["num_images"] == 333
    trained, random_init = metrics["models"]["trained"]["top1"], metrics["models"]["random_init"]["top1"]
    # Measured on this recipe (fp32, CPU, one thread): 0.93 held-out top-1 (random init 0.10). Chance is 0.10 and the
    # majority class 0.13; 0.6 leaves room for other CPUs' rounding and still fails a model that learnt little.
    assert trained > 0.6 and random_init < 0.3
    assert "| trained |" in (tmp_path / "eval" / "report.md").read_text()


def test_l0_recipe_resumes_to_the_same_losses(tmp_path: Path) -> None:
    from bioscale.train.metrics import read_metrics
    from bioscale.train.train import train

    steps = ["num_train_steps=6", "checkpoint.save_every_n_steps=3", "checkpoint.keep_last_n=5",
             "data.micro_batch_size=16", "data.num_workers=0", "checkpoint.save_final_model=false"]  # fmt: skip
    train(_l0_config(tmp_path / "full", *steps))
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    train(_l0_config(tmp_path / "part", *steps))
    ckpts = tmp_path / "part" / "checkpoints"
    shutil.rmtree(ckpts / "step_6")  # as if the run had stopped after step 3's checkpoint
    summary = train(_l0_config(tmp_path / "part", *steps, "checkpoint.resume_from_checkpoint=true"))
    assert summary["resumed_from_step"] == 3
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")}
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bit-identical: data, augmentation, RNG


def test_embed_a_folder_of_images_through_the_cli(tmp_path: Path) -> None:
    from PIL import Image

    from bioscale.data.image_sources import open_image_source
    from bioscale.use.cli import embed_main
    from bioscale.use.embed import read_embeddings

    _needs_digits()
    torch.manual_seed(0)
    model = build_model(build_config("vit", "debug", num_labels=10), device="cpu").eval()
    model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    digits = open_image_source("demo:digits-test")
    for record in digits.read(digits.all_refs()[:5]):
        name = record.record_id.replace(":", "_") + ".png"
        Image.fromarray(record.data).save(folder / ("nested" if record.label % 2 else "") / name)
    (folder / "README.txt").write_text("not an image")
    code = embed_main([str(tmp_path / "model"), str(folder), "-o", str(tmp_path / "out.parquet"), "--per-residue",
                       "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    result = read_embeddings(tmp_path / "out.parquet")
    assert len(result) == 5 and result.pooled.shape == (5, 64) and result.pooling == "map"
    assert all(len(p) == 16 for p in result.per_residue)  # 16 patch tokens each
    assert any(i.startswith("nested/") for i in result.ids)
    # The same numbers as the model's pooled output on the processor's pixels.
    from bioscale.data.images import decode_image, image_processor_for

    first = sorted((folder.rglob("*.png")))[0]
    pixels = image_processor_for(32)(images=[decode_image(str(first)).convert("RGB")],
                                     return_tensors="pt")["pixel_values"]  # fmt: skip
    with torch.no_grad():
        expected = model.vit(pixel_values=pixels).pooler_output[0].numpy()
    index = result.ids.index(str(first.relative_to(folder)))
    assert abs(result.pooled[index] - expected).max() < 1e-5


def test_recipes_load_and_bad_image_data_stops_the_run_with_one_line(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from bioscale.train.cli import main
    from bioscale.train.config import load_config

    cfg = load_config("L1_vit_base")
    assert (cfg.model.size, cfg.data.objective, cfg.data.image.label_column) == ("base", "image_classification",
                                                                                  "labels")  # fmt: skip
    # FP8 GEMMs need micro-batch x tokens to be a multiple of 16 (ViT-B/16: 205 tokens per image).
    assert cfg.data.micro_batch_size * build_config("vit", "base").seq_length % 16 == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    code = main(["--config-name", "L0_sanity_vit", "device=cpu", f"data.source={flat}", f"run_dir={tmp_path / 'run'}",
                 "logging.progress_bar=false", "logging.tensorboard=false"])  # fmt: skip
    assert code == 2
    assert f"image folder {flat} has no class folders" in capsys.readouterr().err


def test_blocks_with_different_drop_path_rates_share_one_compiled_graph(tmp_path: Path) -> None:
    """The rate is data, not a constant: 12 blocks with 12 rates compile to two graphs (rate zero and the rest), where
    a float attribute recompiled past Dynamo's limit of 8 and left the last blocks eager. The rates survive
    save / load and a cast to bf16, and a block drops its branch for about ``rate`` of the samples."""
    from torch._dynamo.utils import counters

    config = build_config("vit", "debug", drop_path_rate=0.3, num_hidden_layers=12)
    model = build_model(config, device="cpu")
    rates = [block.drop_path_rate for block in model.vit.layers]
    assert len(set(rates)) == 12
    model.save_pretrained(tmp_path)
    loaded = VitForImageClassification.from_pretrained(tmp_path).to(torch.bfloat16)
    assert [b.drop_path_prob.item() for b in loaded.vit.layers] == pytest.approx(rates)
    assert all(b.drop_path_prob.dtype == torch.float32 for b in loaded.vit.layers)
    torch._dynamo.reset()
    counters.clear()
    model.train()
    for block in model.vit.layers:
        block.compile(backend="eager")
    pixels = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
    last = model.vit.layers[-1]
    kept = drop_path(torch.ones(20000, 1), last.drop_path_prob, training=True)
    assert (kept == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert kept.mean().item() == pytest.approx(1.0, abs=0.03)  # the kept ones are scaled by 1 / (1 - rate)
