"""Recipes compose into validated TrainConfigs; unknown keys, bad values and missing required values fail clearly."""

from __future__ import annotations

import pytest

from bioscale.train.config import TrainConfig, config_to_yaml, list_recipes, load_config

RECIPES = ("L0_sanity", "L0_sanity_llama3", "L1_esm2_650M", "L1_esm2_3B", "L1_llama3_1B", "L2_esm2_650M_uniref")


def test_every_public_recipe_ships_and_composes():
    assert set(RECIPES) <= set(list_recipes())
    for name in RECIPES:
        overrides = ["data.source=/data/uniref50"] if name == "L2_esm2_650M_uniref" else []
        cfg = load_config(name, overrides)
        assert isinstance(cfg, TrainConfig)
        assert cfg.run_dir == f"outputs/{name}"
        assert cfg.checkpoint.ckpt_dir == f"outputs/{name}/checkpoints"
        assert list_recipes()[name], f"{name}.yaml needs a one-line description as its first comment"


def test_run_dir_follows_a_given_checkpoint_dir():
    cfg = load_config("L0_sanity", ["checkpoint.ckpt_dir=/tmp/somewhere"])
    assert (cfg.run_dir, cfg.checkpoint.ckpt_dir) == ("/tmp/somewhere", "/tmp/somewhere")
    cfg = load_config("L0_sanity", ["run_dir=/tmp/run", "checkpoint.ckpt_dir=/tmp/ckpt"])
    assert (cfg.run_dir, cfg.checkpoint.ckpt_dir) == ("/tmp/run", "/tmp/ckpt")
    assert load_config("L0_sanity", ["run_dir=/tmp/run"]).checkpoint.ckpt_dir == "/tmp/run/checkpoints"


def test_recipe_families_match_their_objectives():
    assert load_config("L0_sanity").data.objective == "mlm"
    llama = load_config("L0_sanity_llama3")
    assert (llama.model.name, llama.data.objective, llama.data.tokenizer) == ("llama3", "clm", "nucleotide")
    assert llama.scheduler.kind == "warmup_cosine"
    assert load_config("L1_esm2_650M").scheduler.kind == "linear_warmup_linear_decay"


def test_overrides_reach_nested_and_top_level_keys():
    cfg = load_config(
        "L0_sanity",
        [
            "num_train_steps=7",
            "optimizer.lr=0.5",
            "fp8_layers=[1,2]",
            "fp8_config.modules=[mlp,attention.qkv_proj]",
            "+model.overrides.num_hidden_layers=3",
            "checkpoint.ckpt_dir=/tmp/x",
            "parallelism.strategy=ddp",
        ],
    )
    assert cfg.num_train_steps == 7
    assert cfg.optimizer.lr == 0.5
    assert cfg.fp8.layers == [1, 2]
    assert cfg.fp8.modules == ["mlp", "attention.qkv_proj"]
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.checkpoint.ckpt_dir == "/tmp/x"
    assert cfg.parallelism.strategy == "ddp"


def test_use_sequence_packing_is_an_alias_of_the_data_key():
    assert load_config("L0_sanity", ["use_sequence_packing=true"]).data.use_sequence_packing is True
    assert load_config("L0_sanity", ["use_sequence_packing=false"]).data.use_sequence_packing is False
    with pytest.raises(ValueError, match="data.use_sequence_packing"):
        load_config("L0_sanity", ["use_sequence_packing=false", "data.use_sequence_packing=true"])


@pytest.mark.parametrize(
    "old, new, read",
    [
        ("fp8_config.enabled=true", "fp8.enabled=true", lambda c: c.fp8.enabled),
        ("fp8_config.recipe=rowwise", "fp8.recipe=rowwise", lambda c: c.fp8.recipe),
        ("fp8_layers=[1,2]", "fp8.layers=[1,2]", lambda c: c.fp8.layers),
        ("quant_stats_config.freq=3", "quant_stats.freq=3", lambda c: c.quant_stats.freq),
        ("cp_size=2", "parallelism.cp_size=2", lambda c: c.parallelism.cp_size),
        ("use_sequence_packing=true", "data.use_sequence_packing=true", lambda c: c.data.use_sequence_packing),
        ("compile=true", "compile.enabled=true", lambda c: c.compile.enabled),
        ("activation_checkpointing=full", "activation_checkpointing.mode=full", lambda c: c.activation_checkpointing.mode),
        ("checkpoint.save_every_n_steps=3", "checkpoint.save_every_n_steps=3", lambda c: c.checkpoint.save_every_n_steps),
    ],
)
def test_seed_recipe_override_names_still_work(old, new, read):
    assert read(load_config("L0_sanity", [old])) == read(load_config("L0_sanity", [new]))
    assert read(load_config("L0_sanity", [old])) != read(load_config("L0_sanity", []))


def test_compile_presets_alias_and_section():
    cfg = load_config("L0_sanity", ["compile=true", "compile_presets=[coordinate_descent]"])
    assert cfg.compile.enabled and cfg.compile.presets == ["coordinate_descent"]


def test_every_choice_is_checked_in_one_place():
    from dataclasses import replace

    from bioscale.train.config import check_choices

    cfg = load_config("L0_sanity")
    cfg.parallelism = replace(cfg.parallelism, reshard_after_forward="sometimes")
    with pytest.raises(ValueError, match="parallelism.reshard_after_forward must be one of"):
        check_choices(cfg)


def test_ignored_settings_are_reported():
    from bioscale.train.config import ignored_settings

    cfg = load_config("L0_sanity", ["parallelism.prefetch=3", "quant_stats.enabled=true"])
    notes = ignored_settings(cfg, world_size=1, device_type="cpu")
    assert any("parallelism.prefetch" in note for note in notes)
    assert any("quant_stats.enabled" in note for note in notes)
    assert ignored_settings(load_config("L0_sanity"), world_size=1, device_type="cpu") == []
    sharded = load_config("L0_sanity", ["parallelism.prefetch=3"])
    assert not any("prefetch" in n for n in ignored_settings(sharded, world_size=2, device_type="cuda"))


@pytest.mark.parametrize(
    "override, named",
    [
        ("no_such_key=1", "no_such_key"),
        ("optimizer.lrr=0.1", "lrr"),
        ("data.sorce=x", "sorce"),
        ("num_train_steps=many", "num_train_steps"),
    ],
)
def test_unknown_or_mistyped_keys_are_rejected_by_name(override, named):
    with pytest.raises(ValueError, match=named):
        load_config("L0_sanity", [override])


@pytest.mark.parametrize(
    "override, named",
    [
        ("parallelism.strategy=zero3", "parallelism.strategy"),
        ("device=tpu", "device"),
        ("activation_checkpointing=some", "activation_checkpointing"),
        ("grad_acc_steps=0", "grad_acc_steps"),
        ("scheduler.kind=step", "scheduler.kind"),
        ("fp8_layers=[0]", "fp8.layers"),
        ("data.objective=mask", "data.objective"),
        ("parallelism.reshard_after_forward=sometimes", "parallelism.reshard_after_forward"),
        ("parallelism.reduce_dtype=fp16", "parallelism.reduce_dtype"),
        ("parallelism.prefetch=-1", "parallelism.prefetch"),
        ("parallelism.dp_replicate=0", "parallelism.dp_replicate"),
        # HSDP is an FSDP2 layout.
        ("parallelism.strategy=ddp parallelism.dp_replicate=2", "parallelism.dp_replicate"),
        # Megatron-FSDP with context parallelism has not been run on GPUs.
        ("parallelism.strategy=mfsdp cp_size=2", "cp_size=2 with parallelism.strategy=mfsdp"),
        ("model.flash_impl=FA5", "model.flash_impl"),
        ("compile=true compile_presets=[fast]", "compile.presets"),
        ("compile_presets=[coordinate_descent]", "needs compile.enabled=true"),
    ],
)
def test_invalid_values_are_rejected_by_name(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config("L0_sanity", override.split())


def test_megatron_fsdp_on_cpu_fails_with_a_config_error(tmp_path):
    from bioscale.train.train import train

    cfg = load_config("L0_sanity", ["device=cpu", "parallelism.strategy=mfsdp", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"parallelism\.strategy=mfsdp runs on NVIDIA GPUs only"):
        train(cfg)


def test_flash_impl_on_cpu_fails_with_a_config_error(tmp_path):
    from bioscale.train.train import train

    cfg = load_config("L0_sanity", ["device=cpu", "model.flash_impl=FA4", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"model\.flash_impl=FA4 needs a CUDA device"):
        train(cfg)


def test_required_data_source_of_L2_fails_clearly():
    with pytest.raises(ValueError, match=r"data\.source"):
        load_config("L2_esm2_650M_uniref")


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="L0_sanity"):
        load_config("L0_sanityy")


def test_saved_yaml_round_trips(tmp_path):
    cfg = load_config("L0_sanity", ["num_train_steps=3"])
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    (tmp_path / "copy.yaml").write_text("defaults:\n  - bioscale_train\n  - _self_\n" + config_to_yaml(cfg))
    again = load_config("copy", config_dir=tmp_path)
    assert again == cfg


def test_cli_help_lists_recipes(capsys):
    from bioscale.train.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert name in out


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    from bioscale.train.cli import main

    assert main(["--config-name", "L0_sanity", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err
    assert main([]) == 2
