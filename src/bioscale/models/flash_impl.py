"""Route torch's flash-attention kernels to FlashAttention 3 or 4 (Hopper / Blackwell), for the whole process.

torch (2.11+) can send its flash ops — ``torch.nn.attention.varlen.varlen_attn``, which bioscale's packed path calls,
and SDPA's flash backend — to an external FlashAttention build instead of the FA2 kernels it ships
(``torch.nn.attention.activate_flash_attention_impl``). The models do not change: the same ``varlen`` call runs a
faster kernel. On the lent H100 (2026-11-22, torch 2.11, flash-attn-4 4.0.0b36) FA4 cut ESM-2 650M's attention time
per step from 81 to 56 ms and raised training throughput by 5.5% (``benchmarks/results/2026-11-22-h100-esm2-650M.md``).

What each choice needs on the machine (none of it is a required dependency):

- ``FA4``: ``pip install 'bioscale[fa4]'`` (flash-attn-4 4.0.0b36, CuTe DSL; pulls ``nvidia-cutlass-dsl`` and its
  CUDA 13 libraries), compute capability 9.x or 10.x.
- ``FA3``: FlashAttention 3's Hopper build (module ``flash_attn_interface``), compute capability 9.x.
- ``FA2``: torch's built-in kernels (the default; selecting it undoes an earlier activation).

``auto`` (:func:`fastest_flash_impl`, what the L1 recipes of bidirectional models ship): FA4 where it can run here —
the package importable, a CUDA GPU of compute capability 9.x / 10.x, a torch with the switch — and FA2 otherwise, so
the recipe needs no edit on a machine without it. Training a causal model keeps FA2 (below).

Two mismatches between torch 2.11's FA4 glue and flash-attn-4 4.0.0b36 are bridged here, each only when detected:
FA4's ``_flash_attn_fwd`` returns ``(out, lse, p, row_max, o_lo)`` where torch unpacks two values, and torch's
backward support check refuses every window size that is not ``None`` while ``varlen_attn``'s backward passes ``-1``
for "no window". Causal attention (window ``(-1, 0)``) stays refused by torch 2.11's backward check, so FA4 trains
bidirectional models (ESM-2) there; causal models (Llama) keep FA2 for training.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

FLASH_IMPLS = ("FA2", "FA3", "FA4")
AUTO = "auto"
# The module torch imports for each external implementation, and what to install for it.
_REQUIREMENTS = {
    "FA3": ("flash_attn_interface", "FlashAttention 3's Hopper build (flash_attn_interface)", (9,)),
    "FA4": ("flash_attn.cute", "pip install 'bioscale[fa4]' (flash-attn-4)", (9, 10)),
}
_active: str = "FA2"


def flash_impl_problem(name: str) -> str | None:
    """Why ``name`` (``FA3`` / ``FA4``) cannot be activated in this process, or ``None`` when it can."""
    from torch.nn import attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        return f"flash implementation {name}: torch {torch.__version__} cannot switch kernels (needs 2.11+)"
    module, install, majors = _REQUIREMENTS[name]
    if _find_spec(module) is None:
        return f"flash implementation {name} needs the module {module!r}: {install}"
    if not torch.cuda.is_available():
        return f"flash implementation {name} needs a CUDA GPU"
    major = torch.cuda.get_device_capability()[0]
    if major not in majors:
        return (f"flash implementation {name} needs compute capability {' or '.join(f'{m}.x' for m in majors)}, "
                f"this GPU has {major}.x")  # fmt: skip
    return None


def fastest_flash_impl(*, causal_training: bool) -> tuple[str, str]:
    """``auto``: ``(implementation, why)`` — ``FA4`` where :func:`flash_impl_problem` finds nothing against it,
    else ``FA2``. Training a causal model gives ``FA2``: torch 2.11's FA4 backward refuses causal windows."""
    if causal_training:
        return "FA2", "causal training: torch 2.11's FA4 backward refuses causal attention"
    problem = flash_impl_problem("FA4")
    return ("FA2", problem) if problem is not None else ("FA4", "flash-attn-4 importable on this GPU")


def active_flash_impl() -> str:
    """The implementation :func:`activate_flash_impl` last selected (``FA2`` unless one was)."""
    return _active


def activate_flash_impl(name: str) -> None:
    """Send torch's flash-attention ops to ``name`` (``FA2``, ``FA3`` or ``FA4``) for this process.

    Raises ``ValueError`` naming what is missing: an unknown name, a torch without the switch, the package, or a GPU
    of another generation. Call it before the first attention call (compiled graphs keep the kernel they traced).
    """
    global _active
    if name not in FLASH_IMPLS:
        raise ValueError(f"unknown flash-attention implementation {name!r}; choose one of {list(FLASH_IMPLS)}")
    from torch.nn import attention

    if name == "FA2":
        if _active != "FA2":
            attention.restore_flash_attention_impl()
            _active = "FA2"
        return
    problem = flash_impl_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if name == "FA4":
        _bridge_fa4_forward(importlib.import_module("flash_attn.cute.interface"))
        with contextlib.suppress(ImportError):
            from torch.nn.attention import _fa4

            _bridge_fa4_backward_check(_fa4)
    if _active != "FA2":
        attention.restore_flash_attention_impl()
    attention.activate_flash_attention_impl(name)
    _active = name


@contextlib.contextmanager
def flash_impl(name: str | None) -> Iterator[None]:
    """:func:`activate_flash_impl` for the block, then back to the implementation that was active (None: no-op)."""
    if name is None:
        yield
        return
    previous = _active
    activate_flash_impl(name)
    try:
        yield
    finally:
        activate_flash_impl(previous)


def _find_spec(module: str) -> Any:
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:  # the parent package is missing
        return None


def _bridge_fa4_forward(interface: Any) -> None:
    """Make ``interface._flash_attn_fwd`` return ``(out, lse)`` as torch unpacks it (4.0.0b36 returns five values;
    the others are debug outputs, ``None`` unless asked for). A no-op for a forward that already returns two."""
    forward = interface._flash_attn_fwd
    if getattr(forward, "_bioscale_bridge", False):
        return

    @functools.wraps(forward)
    def out_and_lse(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        out, lse, *_ = forward(*args, **kwargs)
        return out, lse

    out_and_lse._bioscale_bridge = True  # type: ignore[attr-defined]
    interface._flash_attn_fwd = out_and_lse


def _bridge_fa4_backward_check(fa4_glue: Any) -> None:
    """torch 2.11's ``_fa4_backward_support_error(..., window_size_left, window_size_right)`` refuses any window that
    is not None; read ``-1`` (the aten ops' "no window") as None. The kernel call maps ``-1`` to None itself."""
    check = getattr(fa4_glue, "_fa4_backward_support_error", None)
    if check is None or getattr(check, "_bioscale_bridge", False):
        return

    @functools.wraps(check)
    def minus_one_is_no_window(*args: Any) -> str | None:
        *rest, left, right = args
        return check(*rest, None if left == -1 else left, None if right == -1 else right)

    minus_one_is_no_window._bioscale_bridge = True  # type: ignore[attr-defined]
    fa4_glue._fa4_backward_support_error = minus_one_is_no_window
