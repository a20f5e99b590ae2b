"""FP8 training converter: swaps the ``nn.Linear`` layers of chosen transformer blocks for torchao ``Float8Linear``.

Called by the trainer after the ``meta`` build and before parallelize (torchtitan's order: convert → AC → compile →
FSDP2), so activation checkpointing, ``torch.compile`` and ``fully_shard`` all wrap the converted blocks. Only the
linears inside ``model.layers`` are converted; the embeddings and the LM head (including its dense layer) always stay
in high precision, since their errors reach every token's logits directly. Per-layer control (``layers``, 1-indexed
blocks) and a width filter (``min_features``) decide where FP8 pays: torchao casts inputs, weights and gradients to
FP8 on the fly, and those elementwise passes cost about as much as the GEMM time they save once a layer is narrow —
measured on an H100, ESM-2 650M's 1280-wide layers ran at 0.4–0.9× bf16 speed while layers ≥ ~4k wide gained
1.2–1.6×. ``torchao`` is an optional extra (``pip install 'bioscale[fp8]'``), imported only when FP8 is used.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from bioscale.models.common import transformer_blocks

log = logging.getLogger(__name__)

FP8_RECIPES = ("tensorwise", "rowwise")
# Ada (8.9), Hopper (9.0) and newer have FP8 tensor cores; torch._scaled_mm refuses older GPUs.
MIN_FP8_CAPABILITY = (8, 9)
# FP8 GEMMs (cuBLASLt / CUTLASS) need both matrix dimensions of a weight to be multiples of 16.
FP8_DIM_MULTIPLE = 16

# Name segments that wrappers add (torch.compile's OptimizedModule, activation checkpointing); stripped so names
# are the same with and without parallelize and match the parameter names in checkpoints.
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)(?=\.|$)")


def import_torchao_float8() -> ModuleType:
    """``torchao.float8``, or an ``ImportError`` that names the extra to install."""
    try:
        import torchao.float8 as float8
    except ImportError as exc:
        raise ImportError(
            "FP8 training needs torchao (>= 0.12), which is an optional extra: pip install 'bioscale[fp8]' "
            f"(import failed: {exc})"
        ) from exc
    return float8


def check_fp8_hardware(device: torch.device | int | None = None) -> None:
    """Raise ``RuntimeError`` unless ``device`` (default: the current CUDA device) has FP8 tensor cores (sm_89+)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "FP8 training needs an NVIDIA GPU with compute capability >= 8.9 (sm_89+: Ada, Hopper, Blackwell), but "
            "no CUDA device is available. Set fp8.enabled=false to train in bf16 (apply_fp8(..., "
            "emulate=True) runs the FP8 casts with high-precision GEMMs, for numerics tests only)."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"FP8 training needs an sm_89+ GPU (compute capability >= 8.9: Ada, Hopper, Blackwell); {name} has "
            f"compute capability {capability[0]}.{capability[1]}. Set fp8.enabled=false to train in bf16."
        )


def _blocks(model: nn.Module) -> nn.ModuleList:
    return transformer_blocks(model, needed_by="apply_fp8 (which selects FP8 blocks)")


def _select_blocks(layers: Sequence[int] | None, num_blocks: int) -> list[int]:
    """0-based indices of the blocks named by 1-indexed ``layers`` (None: all), validated."""
    if layers is None:
        return list(range(num_blocks))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"fp8_layers must be a list of 1-indexed block numbers or None, got {layers!r}")
    if len(layers) == 0:
        raise ValueError(
            "fp8_layers is empty: list the 1-indexed blocks to run in FP8, use null for all blocks, or set "
            "fp8.enabled=false"
        )
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)]
    if bad:
        raise ValueError(f"fp8_layers must hold integers (1-indexed blocks); got {bad}")
    out_of_range = [layer for layer in layers if not 1 <= layer <= num_blocks]
    if out_of_range:
        raise ValueError(
            f"fp8_layers {out_of_range} out of range: the model has {num_blocks} transformer blocks, numbered "
            f"1..{num_blocks}"
        )
    duplicates = sorted({layer for layer in layers if list(layers).count(layer) > 1})
    if duplicates:
        raise ValueError(f"fp8_layers lists blocks {duplicates} more than once")
    return sorted(layer - 1 for layer in layers)


def apply_fp8(
    model: nn.Module,
    *,
    recipe: str = "tensorwise",
    layers: Sequence[int] | None = None,
    modules: Sequence[str] | None = None,
    min_features: int = 0,
    fsdp_float8_all_gather: bool = False,
    emulate: bool = False,
) -> None:
    """Swap the ``nn.Linear`` layers of the chosen blocks of ``model.layers`` for torchao ``Float8Linear``, in place.

    Call on the ``meta`` (or materialised) model before activation checkpointing, ``torch.compile`` and FSDP2. The
    parameters keep their names, so checkpoints and ``to_hf`` exports are the same as for a bf16 model.

    Args:
        model: a bioscale model (its transformer blocks are ``model.layers``).
        recipe: ``"tensorwise"`` (one dynamic scale per tensor; fastest, cuBLAS kernels; e5m2 gradients) or
            ``"rowwise"`` (one scale per row, power-of-two scales, e4m3 everywhere; more accurate, slower casts).
        layers: 1-indexed blocks to convert; ``None`` converts every block. The others stay in high precision.
        modules: which linears of each selected block to convert, by their name inside the block or a dotted prefix
            of it (``["mlp"]``: ESM-2's ``mlp.up_proj`` / ``mlp.down_proj``, Llama's ``mlp.gate_up_proj`` /
            ``mlp.down_proj``; ``["attention.qkv_proj", "mlp"]``); ``None`` converts all. Width alone cannot pick
            ESM-2's MLP (its narrower side is the hidden size, like the attention projections'), names can.
        min_features: skip linears whose narrower side (``min(in_features, out_features)``) is below this. On an
            H100 the on-the-fly casts make 1280-wide layers slower than bf16, while layers >= ~4k wide gain
            1.2-1.6x; 0 converts every eligible layer.
        fsdp_float8_all_gather: all-gather FSDP2-sharded weights in FP8 (half the traffic of bf16). Tensorwise
            only. When on, call :func:`precompute_fp8_scales` after every ``optimizer.step()``.
        emulate: cast to FP8 but run the GEMMs in high precision and skip the GPU check. For numerics tests on
            CPU or on GPUs without FP8; never faster.

    Linears whose dimensions are not multiples of 16 cannot use FP8 GEMMs: they stay in high precision and are
    logged. At run time the token dimension (packed ``T``, or ``B * S``) must be a multiple of 16 as well; pack
    with ``pad_to_multiple_of=16`` (or a token budget that is a multiple of 16).

    Raises:
        ValueError: unknown ``recipe``; ``layers`` empty, out of range or repeated; ``model`` without ``layers``;
            a block that already holds FP8 layers; ``fsdp_float8_all_gather`` with the rowwise recipe; an entry of
            ``modules`` that names no linear of the blocks (the message lists the valid names).
        ImportError: torchao is not installed (names the ``bioscale[fp8]`` extra).
        RuntimeError: no GPU with FP8 support (compute capability >= 8.9), unless ``emulate``.
    """
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8.recipe must be one of {', '.join(FP8_RECIPES)}; got {recipe!r}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError(
            f"FP8 all-gather under FSDP2 needs one scale per weight tensor: use recipe='tensorwise', not {recipe!r}"
        )
    if min_features < 0:
        raise ValueError(f"fp8 min_features must be >= 0; got {min_features}")
    blocks = _blocks(model)
    selected = _select_blocks(layers, len(blocks))
    module_names = _check_module_names(modules, blocks[selected[0]])
    if not emulate:
        check_fp8_hardware()
    float8 = import_torchao_float8()
    from torchao.float8.float8_linear import Float8Linear

    config = dataclasses.replace(
        float8.Float8LinearConfig.from_recipe_name(recipe),
        emulate=emulate,
        enable_fsdp_float8_all_gather=fsdp_float8_all_gather,
    )

    converted: list[str] = []
    skipped: list[str] = []
    for index in selected:
        prefix = f"layers.{index}"
        already = [name for name, module in blocks[index].named_modules() if isinstance(module, Float8Linear)]
        if already:
            raise ValueError(f"block {index + 1} already holds FP8 layers ({prefix}.{already[0]}); apply_fp8 twice?")

        def keep_in_fp8(module: nn.Module, fqn: str, prefix: str = prefix) -> bool:
            out_features, in_features = module.weight.shape
            name = f"{prefix}.{fqn}"
            if in_features % FP8_DIM_MULTIPLE or out_features % FP8_DIM_MULTIPLE:
                skipped.append(f"{name} ({in_features}->{out_features}: not multiples of {FP8_DIM_MULTIPLE})")
                return False
            if min(in_features, out_features) < min_features:
                skipped.append(f"{name} ({in_features}->{out_features}: narrower than min_features={min_features})")
                return False
            if module_names is not None and not any(_matches(fqn, entry) for entry in module_names):
                skipped.append(f"{name} (not in modules={list(module_names)})")
                return False
            converted.append(name)
            return True

        float8.convert_to_float8_training(blocks[index], module_filter_fn=keep_in_fp8, config=config)
        if not emulate:
            for module in blocks[index].modules():
                if isinstance(module, Float8Linear):
                    module.register_forward_pre_hook(_check_token_count)

    log.info("FP8 (%s) on %d linears in blocks %s", recipe, len(converted), [i + 1 for i in selected])
    if skipped:
        log.warning("FP8: %d linears stay in high precision: %s", len(skipped), "; ".join(skipped))
    if not converted:
        log.warning("FP8 is enabled but no linear was converted; the run trains entirely in high precision")


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def _check_module_names(modules: Sequence[str] | None, block: nn.Module) -> tuple[str, ...] | None:
    if modules is None:
        return None
    if isinstance(modules, str) or not modules:
        raise ValueError(f"fp8 modules must be a non-empty list of linear names inside a block; got {modules!r}")
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    unknown = [entry for entry in modules if not any(_matches(name, entry) for name in linears)]
    if unknown:
        raise ValueError(
            f"fp8 modules {unknown} name no linear layer of a {type(block).__name__}; its linears are {linears} "
            "(an entry may also be a dotted prefix, e.g. 'mlp')"
        )
    return tuple(modules)


def _check_token_count(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    # The weight-gradient GEMM contracts over the tokens, so their count is an FP8 GEMM dimension too. Without this
    # check a wrong count fails deep inside torch._scaled_mm, in backward. Shapes only: free under torch.compile.
    x = args[0]
    num_tokens = x.numel() // x.shape[-1]
    if num_tokens % FP8_DIM_MULTIPLE:
        raise ValueError(
            f"FP8 layers need the number of tokens in a micro-batch to be a multiple of {FP8_DIM_MULTIPLE}, got "
            f"{num_tokens} (input shape {tuple(x.shape)}); pad batches with data.pad_to_multiple_of=16 (packed: T, "
            "padded: the sequence length)"
        )


def _is_float8_linear(module: nn.Module) -> bool:
    # A module can only be a Float8Linear if torchao was imported to make it; do not import torchao to find out.
    float8_linear = sys.modules.get("torchao.float8.float8_linear")
    return float8_linear is not None and isinstance(module, float8_linear.Float8Linear)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel prefixes every name with "module."; the model underneath has the names users know.
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def clean_module_name(name: str) -> str:
    """``name`` without the segments that compile / activation-checkpoint wrappers insert."""
    return _WRAPPER_SEGMENT.sub("", name).lstrip(".")


def fp8_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run in FP8 (``Float8Linear``), without wrapper segments."""
    return [clean_module_name(name) for name, module in _unwrap(model).named_modules() if _is_float8_linear(module)]


def fp8_block_indices(model: nn.Module) -> list[int]:
    """1-indexed transformer blocks of ``model.layers`` that hold at least one FP8 layer."""
    blocks = _blocks(_unwrap(model))
    return [index + 1 for index, block in enumerate(blocks) if any(_is_float8_linear(m) for m in block.modules())]


def precompute_fp8_scales(model: nn.Module) -> None:
    """Refresh the FP8 scales of FSDP2-sharded weights in one all-reduce; call after every ``optimizer.step()``.

    Needed (for speed, not correctness) only with ``apply_fp8(..., fsdp_float8_all_gather=True)``: without it, each
    weight's pre-all-gather computes its own scale with its own all-reduce. A no-op for any other model, so the
    trainer may call it whenever FP8 is enabled.
    """
    if "torchao.float8" not in sys.modules:
        return  # torchao was never imported, so the model holds no FP8 layers
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(_unwrap(model))
