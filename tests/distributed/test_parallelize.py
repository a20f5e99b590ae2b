"""The ``apply_*`` functions on one process: activation checkpointing and compile change neither the numbers nor the
parameter names; gradient-sync control is a no-op for an unwrapped model; a plain process gets no process group."""

from __future__ import annotations

import pytest
import torch

from bioscale.distributed import apply_ac, apply_compile, apply_fsdp, grad_sync, init_distributed
from bioscale.distributed.parallelize import compile_kwargs
from bioscale.models import build_config, build_model


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model(build_config("esm2", "debug"), task="masked_lm", device="cpu")
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 24, (3, 17), generator=gen)
    labels = torch.where(torch.rand(3, 17, generator=gen) < 0.3, input_ids, torch.full_like(input_ids, -100))
    return model, {"input_ids": input_ids, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_grads_and_names(mode):
    reference, batch = _model_and_batch()
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    model, _ = _model_and_batch()
    apply_ac(model, mode)
    assert all(type(block).__name__ == "CheckpointWrapper" for block in model.layers)
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints do not see the wrapper
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    # named_parameters() (unlike state_dict()) shows the wrapper's segment.
    grads = {name.replace("._checkpoint_wrapped_module", ""): grad for name, grad in grads.items()}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_none_is_a_no_op_and_bad_modes_fail():
    model, _ = _model_and_batch()
    blocks = list(model.layers)
    apply_ac(model, "none")
    assert list(model.layers) == blocks
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_ac(model, "some")


def test_compile_is_applied_per_block_in_place():
    model, _ = _model_and_batch()
    names = model.state_dict().keys()
    apply_compile(model)
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert model.state_dict().keys() == names  # no "_orig_mod." in checkpoints


def test_compile_presets_merge_over_the_mode_options():
    assert compile_kwargs("max-autotune-no-cudagraphs") == {"mode": "max-autotune-no-cudagraphs"}
    merged = compile_kwargs("reduce-overhead", ["coordinate_descent", "multi_kernel"])
    assert merged == {
        "options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "triton.multi_kernel": 1}
    }
    assert compile_kwargs(None, ["autotune_pointwise"]) == {"options": {"max_autotune_pointwise": True}}
    with pytest.raises(ValueError, match="unknown compile preset.*'tune_everything'"):
        compile_kwargs(None, ["tune_everything"])


@pytest.mark.parametrize("preset", ["coordinate_descent", "persistent_rows_2048"])
def test_compile_with_a_preset_matches_eager(preset):
    model, batch = _model_and_batch()
    expected = model(**batch).loss
    apply_compile(model, presets=[preset])
    torch.testing.assert_close(model(**batch).loss, expected)


def test_apply_functions_need_the_layers_contract():
    with pytest.raises(ValueError, match="layers"):
        apply_ac(torch.nn.Linear(2, 2), "full")


def test_grad_sync_is_a_no_op_for_an_unwrapped_model():
    model, batch = _model_and_batch()
    with grad_sync(model, enabled=False):
        model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_plain_process_has_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type, info.is_distributed, info.is_main) == (
        0,
        1,
        "cpu",
        False,
        True,
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            init_distributed("cuda")


def test_apply_fsdp_rejects_unknown_policies_before_touching_the_model():
    model, _ = _model_and_batch()
    with pytest.raises(ValueError, match="reshard_after_forward"):
        apply_fsdp(model, reshard_after_forward="sometimes")
    with pytest.raises(ValueError, match="prefetch"):
        apply_fsdp(model, prefetch=-1)
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())


def test_fsdp_policies_and_prefetch_on_a_one_rank_group(tmp_path):
    """Which blocks reshard after forward, and whom each block prefetches (FSDP2 over one gloo rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for policy, expected in (("default", [True, True, False]), ("always", [True] * 3), ("never", [False] * 3)):
            model = build_model(build_config("esm2", "debug", num_hidden_layers=3), task="masked_lm", device="meta")
            apply_fsdp(model, reshard_after_forward=policy, prefetch=2)
            blocks = list(model.layers)
            reshards = [b._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None for b in blocks]
            assert reshards == expected, policy
            states = [b._get_fsdp_state() for b in blocks]
            assert [len(s._states_to_forward_prefetch) for s in states] == [2, 1, 0]
            assert [len(s._states_to_backward_prefetch) for s in states] == [0, 1, 2]
            # Backward runs the blocks in reverse: block 2 prefetches block 1 first, then block 0.
            assert states[2]._states_to_backward_prefetch == [states[1], states[0]]
    finally:
        dist.destroy_process_group()


def test_the_persistent_rows_rule_is_inert_without_its_preset():
    """The rule is installed on Inductor's class, but a compile without the preset keeps Inductor's own decision."""
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices

    options = compile_kwargs(None, ["persistent_rows_2048"])["options"]
    assert options["inductor_choices_class"].persistent_rows_up_to == 2048
    assert options["fx_graph_cache"] is False
    assert getattr(InductorChoices.should_use_persistent_reduction, "_bioscale_rows", False)
    assert inductor_config.inductor_choices_class is None  # nothing global changed outside a compile


@pytest.mark.gpu
@pytest.mark.parametrize("presets", [(), ("persistent_rows_2048",)])
def test_persistent_rows_preset_makes_a_1280_wide_layer_norm_persistent(presets):
    """Inductor loops over rows longer than 1024; the preset makes both the forward and backward LayerNorm kernels
    persistent, and the result still matches eager."""
    from torch._inductor.utils import run_and_get_code

    norm = torch.nn.LayerNorm(1280, device="cuda")
    x = torch.randn(4096, 1280, device="cuda", requires_grad=True)

    def step(inp):
        out = norm(inp)
        out.square().sum().backward()
        return out

    compiled = torch.compile(step, **compile_kwargs(None, presets))
    out, codes = run_and_get_code(compiled, x)
    kernels = " ".join(codes)
    torch.testing.assert_close(out, norm(x), atol=1e-5, rtol=1e-5)
    looped = "triton_red_fused_native_layer_norm" in kernels
    assert looped == (not presets), kernels[:2000]
