"""The ``apply_*`` functions on one process: activation checkpointing and compile change neither the numbers nor the
parameter names; gradient-sync control is a no-op for an unwrapped model; a plain process gets no process group."""

from __future__ import annotations

import pytest
import torch

from bioscale.distributed import apply_ac, apply_compile, apply_fsdp, grad_sync, init_distributed
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
