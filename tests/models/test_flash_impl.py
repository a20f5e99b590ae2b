"""The switch that routes torch's flash kernels to FA3 / FA4 (bioscale.models.flash_impl): its errors on machines
without them, and the two bridges between torch 2.11's FA4 glue and flash-attn-4 4.0.0b36, on stand-in modules."""

from __future__ import annotations

import types

import pytest
import torch

from bioscale.models import flash_impl


def test_unknown_implementation_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown flash-attention implementation 'FA5'.*FA2.*FA3.*FA4"):
        flash_impl.activate_flash_impl("FA5")


def test_fa2_is_the_default_and_selecting_it_is_a_no_op() -> None:
    assert flash_impl.active_flash_impl() == "FA2"
    flash_impl.activate_flash_impl("FA2")
    with flash_impl.flash_impl(None), flash_impl.flash_impl("FA2"):
        assert flash_impl.active_flash_impl() == "FA2"


def test_missing_package_names_what_to_install(monkeypatch) -> None:
    from torch.nn import attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        with pytest.raises(ValueError, match="cannot switch kernels"):
            flash_impl.activate_flash_impl("FA4")
        return
    monkeypatch.setattr(flash_impl, "_find_spec", lambda module: None)
    with pytest.raises(ValueError, match=r"needs the module 'flash_attn\.cute': pip install 'bioscale\[fa4\]'"):
        flash_impl.activate_flash_impl("FA4")
    with pytest.raises(ValueError, match="needs the module 'flash_attn_interface'"):
        flash_impl.activate_flash_impl("FA3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_installed_package_without_a_gpu_is_refused(monkeypatch) -> None:
    from torch.nn import attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        pytest.skip("this torch cannot switch flash kernels")
    monkeypatch.setattr(flash_impl, "_find_spec", lambda module: object())
    with pytest.raises(ValueError, match="FA4 needs a CUDA GPU"):
        flash_impl.activate_flash_impl("FA4")
    assert flash_impl.active_flash_impl() == "FA2"


def test_auto_picks_fa4_only_where_it_can_run(monkeypatch) -> None:
    """``auto`` is FA2 (with the reason) without the package, without a GPU of the right generation, or for causal
    training; FA4 when nothing stands against it."""
    monkeypatch.setattr(flash_impl, "_find_spec", lambda module: None)
    chosen, why = flash_impl.fastest_flash_impl(causal_training=False)
    assert chosen == "FA2" and ("flash_attn.cute" in why or "cannot switch" in why)
    monkeypatch.setattr(flash_impl, "flash_impl_problem", lambda name: None)
    assert flash_impl.fastest_flash_impl(causal_training=False)[0] == "FA4"
    chosen, why = flash_impl.fastest_flash_impl(causal_training=True)
    assert chosen == "FA2" and "causal" in why


def test_auto_in_a_cpu_run_changes_nothing(tmp_path) -> None:
    from bioscale.train.config import load_config
    from bioscale.train.train import _flash_impl_to_activate

    cfg = load_config("L0_sanity", ["device=cpu", "model.flash_impl=auto", f"run_dir={tmp_path}"])
    assert _flash_impl_to_activate(cfg, torch.device("cpu")) is None
    cfg = load_config("L0_sanity", ["device=cpu", "model.flash_impl=FA4", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _flash_impl_to_activate(cfg, torch.device("cpu"))


def test_forward_bridge_returns_out_and_lse_once() -> None:
    calls = []

    def five_outputs(q, k, v, **kwargs):
        calls.append(kwargs)
        return "out", "lse", None, None, None

    interface = types.SimpleNamespace(_flash_attn_fwd=five_outputs)
    flash_impl._bridge_fa4_forward(interface)
    bridged = interface._flash_attn_fwd
    flash_impl._bridge_fa4_forward(interface)  # idempotent: no wrapper around the wrapper
    assert interface._flash_attn_fwd is bridged
    assert interface._flash_attn_fwd(1, 2, 3, causal=False) == ("out", "lse")
    assert calls == [{"causal": False}]

    two = types.SimpleNamespace(_flash_attn_fwd=lambda q, k, v: ("out", "lse"))
    flash_impl._bridge_fa4_forward(two)
    assert two._flash_attn_fwd(1, 2, 3) == ("out", "lse")


def test_backward_check_bridge_reads_minus_one_as_no_window() -> None:
    seen = []

    def strict_check(grad_out, q, k, v, out, lse, dropout_p, cum_seq_q, left, right):
        seen.append((left, right))
        return None if left is None and right is None else "windowed attention not supported"

    glue = types.SimpleNamespace(_fa4_backward_support_error=strict_check)
    flash_impl._bridge_fa4_backward_check(glue)
    check = glue._fa4_backward_support_error
    assert check(*range(8), -1, -1) is None  # bidirectional varlen: allowed now
    assert check(*range(8), -1, 0) == "windowed attention not supported"  # causal: still torch's call
    assert check(*range(8), 128, 0) == "windowed attention not supported"
    assert seen == [(None, None), (None, 0), (128, 0)]
    flash_impl._bridge_fa4_backward_check(glue)
    assert glue._fa4_backward_support_error is check
    flash_impl._bridge_fa4_backward_check(types.SimpleNamespace())  # a torch without the check: nothing to do


@pytest.mark.gpu
def test_fa4_varlen_matches_fa2_forward_and_backward() -> None:
    """Bidirectional packed attention through ``varlen`` with FA4 equals FA2 (needs flash-attn-4 and Hopper)."""
    pytest.importorskip("flash_attn.cute")
    from bioscale.models.attention import packed_attention_inputs, varlen_attention

    torch.manual_seed(0)
    lengths = [100, 517, 1024, 3, 400]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q, k, v = (torch.randn(1, total, 20, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sizes = torch.tensor(lengths, device="cuda")
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), sizes)
    inputs = packed_attention_inputs(
        backend="varlen", causal=False, cu_seqlens=cu, max_seqlen=1024, sequence_ids=sequence_ids, dtype=torch.bfloat16
    )

    def run(impl):
        for t in (q, k, v):
            t.grad = None
        with flash_impl.flash_impl(impl):
            out = varlen_attention(q, k, v, inputs, scale=None)
            out.float().square().sum().backward()
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    out2, grads2 = run("FA2")
    out4, grads4 = run("FA4")
    torch.testing.assert_close(out4, out2, atol=2e-2, rtol=2e-2)
    for g4, g2 in zip(grads4, grads2):
        torch.testing.assert_close(g4, g2, atol=5e-2, rtol=5e-2)
    assert flash_impl.active_flash_impl() == "FA2"
