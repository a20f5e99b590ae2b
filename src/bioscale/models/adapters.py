"""The unfused, stock-named layout a bioscale block takes while an adapter library (PEFT's LoRA) works on it, and the
way back to the fused layout.

bioscale blocks fuse projections for speed (one ``qkv_proj`` GEMM instead of three, one ``gate_up_proj`` instead of
two) and name the others after their role (``out_proj``, ``up_proj``). Adapter libraries pick the modules to adapt by
the names of the stock checkpoints (``["query", "value"]`` for ESM, ``["q_proj", ..., "up_proj"]`` for Llama) and
adapt whole ``nn.Linear`` modules only. Against the fused layout the usual lists match nothing or the wrong subset
(ESM's ``"dense"`` finds only the LM head's), and LoRA on Q and V alone cannot be expressed at all. So each block class
declares ``adapter_layout``: canonical module path -> the stock paths it becomes (both relative to the block, a stock
path below the canonical module's parent). :func:`unfuse_block` rewrites a block into those names, :func:`fuse_block`
rewrites it back, bit for bit.

What changes and what does not:

- A fused ``nn.Linear`` is split by output rows into one ``nn.Linear`` per part (the parent's ``split_sizes`` when it
  has as many, as grouped-query attention does; equal parts otherwise); a one-part entry is the same module, moved.
- The canonical name stays callable: a :class:`ProjectionAlias` registered there concatenates the parts' outputs, so
  the blocks' forward code is the same in both layouts. The alias owns no parameter and is not an ``nn.Linear``, so
  ``"all-linear"``, the FP8 converter and initialisation never see a weight twice.
- State dicts keep the canonical names in both layouts: a state-dict hook concatenates the parts back, a load hook
  splits canonical tensors. Checkpoints, ``to_hf`` and ``save_pretrained`` of an unfused model are those of the fused
  one. While PEFT wraps a part, that part's keys are PEFT's (``base_layer``, ``lora_A``) and are left alone.
- Speed: unfused, the projections are separate GEMMs plus a concatenation. It is the adapter fine-tuning layout;
  pre-training keeps the fused one (fuse again after ``merge_and_unload()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Marks an unfused block (a plain attribute, so that copy.deepcopy keeps it; hook handles would point at the original).
_UNFUSED_ATTR = "_bioscale_unfused"


class ProjectionAlias(nn.Module):
    """What an unfused block has under a fused module's name: the concatenated outputs of its stock-named parts.

    The parts are looked up on every call (not stored), so a part that PEFT replaced by its LoRA layer is the one used.
    """

    def __init__(self, parent: nn.Module, canonical: str, parts: tuple[str, ...]) -> None:
        super().__init__()
        # Kept out of _modules: the parts are registered under their stock names only (no duplicate state-dict keys).
        self.__dict__["_parent"] = parent
        self.canonical = canonical
        self.parts = parts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        parent = self.__dict__["_parent"]
        outputs = [parent.get_submodule(part)(hidden_states) for part in self.parts]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.canonical} = concat({', '.join(self.parts)}); unfused for adapters (model.fuse_projections())"


def check_adapter_layout(block_cls: type, layout: Mapping[str, tuple[str, ...]]) -> None:
    """``ValueError`` unless every stock path of ``layout`` lies below its canonical module's parent."""
    for canonical, parts in layout.items():
        parent = canonical.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        outside = [part for part in parts if not part.startswith(prefix) or part == canonical]
        if not parts or outside:
            raise ValueError(f"{block_cls.__name__}.adapter_layout[{canonical!r}]: parts {list(parts)} must be new "
                             f"names below {parent or 'the block'!r}")  # fmt: skip


def is_unfused(block: nn.Module) -> bool:
    """Whether ``block`` is in the unfused (adapter) layout."""
    return bool(getattr(block, _UNFUSED_ATTR, False))


def _parent_and_name(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (block.get_submodule(parent_path) if parent_path else block), name


def _relative(canonical: str, part: str) -> str:
    parent = canonical.rpartition(".")[0]
    return part[len(parent) + 1 :] if parent else part


def _place(parent: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted ``path`` below ``parent``, creating plain containers on the way."""
    *containers, name = path.split(".")
    for container in containers:
        if container not in parent._modules:
            parent.add_module(container, nn.Module())
        parent = parent._modules[container]
    parent.add_module(name, module)


def _remove(parent: nn.Module, path: str) -> nn.Module:
    """Unregister the module at ``path`` below ``parent`` and any container that is left empty."""
    *containers, name = path.split(".")
    chain = [parent]
    for container in containers:
        chain.append(chain[-1]._modules[container])
    module = chain[-1]._modules.pop(name)
    for holder, container in zip(reversed(chain[:-1]), reversed(containers), strict=True):
        child = holder._modules[container]
        if not child._modules and not child._parameters and not child._buffers:
            holder._modules.pop(container)
    return module


def _split_sizes(parent: nn.Module, fused: nn.Linear, num_parts: int) -> list[int]:
    sizes = getattr(parent, "split_sizes", None)
    if sizes is not None and len(sizes) == num_parts:
        return [int(size) for size in sizes]
    if fused.out_features % num_parts:
        raise ValueError(f"cannot split {fused.out_features} output rows into {num_parts} equal parts")
    return [fused.out_features // num_parts] * num_parts


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return linear


def unfuse_block(block: nn.Module) -> None:
    """Rewrite ``block`` (an instance of a class with ``adapter_layout``) into its stock-named layout, in place.

    Raises ``ValueError`` when a canonical module is not a plain ``nn.Linear`` (unfuse before FP8 conversion or
    quantisation, and before an adapter is attached to the fused layout). A block already unfused is left alone.
    """
    if is_unfused(block):
        return
    layout: Mapping[str, tuple[str, ...]] = type(block).adapter_layout
    for canonical, parts in layout.items():
        parent, name = _parent_and_name(block, canonical)
        fused = parent._modules[name]
        if type(fused) is not nn.Linear:
            raise ValueError(
                f"cannot unfuse {type(block).__name__}.{canonical}: it is a {type(fused).__name__}, not a plain "
                "nn.Linear (unfuse before FP8 conversion, quantisation or attaching an adapter)"
            )
        relative = tuple(_relative(canonical, part) for part in parts)
        if len(parts) == 1:
            pieces: list[nn.Module] = [fused]
        else:
            sizes = _split_sizes(parent, fused, len(parts))
            weights = fused.weight.detach().split(sizes, dim=0)
            biases = fused.bias.detach().split(sizes, dim=0) if fused.bias is not None else [None] * len(parts)
            pieces = [_linear_like(w.clone(), None if b is None else b.clone(), fused.weight.requires_grad)
                      for w, b in zip(weights, biases, strict=True)]  # fmt: skip
        parent._modules[name] = ProjectionAlias(parent, name, relative)
        for path, piece in zip(relative, pieces, strict=True):
            _place(parent, path, piece)
    block.register_state_dict_post_hook(_canonical_state_dict)
    block.register_load_state_dict_pre_hook(_split_canonical_state_dict)
    object.__setattr__(block, _UNFUSED_ATTR, True)


def fuse_block(block: nn.Module) -> None:
    """Undo :func:`unfuse_block`: the canonical fused modules again, weights concatenated exactly.

    Raises ``ValueError`` while an adapter still wraps a part (``merge_and_unload()`` or ``unload()`` it first).
    """
    if not is_unfused(block):
        return
    layout: Mapping[str, tuple[str, ...]] = type(block).adapter_layout
    for canonical, parts in layout.items():
        parent, name = _parent_and_name(block, canonical)
        relative = tuple(_relative(canonical, part) for part in parts)
        pieces = [parent.get_submodule(path) for path in relative]
        wrapped = [path for path, piece in zip(parts, pieces, strict=True) if type(piece) is not nn.Linear]
        if wrapped:
            raise ValueError(
                f"cannot fuse {type(block).__name__}.{canonical}: {wrapped} still carry an adapter; merge_and_unload() "
                "or unload() it first"
            )
        if len(pieces) == 1:
            fused = pieces[0]
        else:
            weight = torch.cat([piece.weight.detach() for piece in pieces], dim=0)
            has_bias = pieces[0].bias is not None
            bias = torch.cat([piece.bias.detach() for piece in pieces], dim=0) if has_bias else None
            fused = _linear_like(weight, bias, pieces[0].weight.requires_grad)
        for path in relative:
            _remove(parent, path)
        parent._modules[name] = fused
    # Removed by identity rather than through handles, which a deep copy of the block would share with the original.
    for key, hook in list(block._state_dict_hooks.items()):
        if hook is _canonical_state_dict:
            del block._state_dict_hooks[key]
    for key, hook in list(block._load_state_dict_pre_hooks.items()):
        if getattr(hook, "hook", None) is _split_canonical_state_dict:
            del block._load_state_dict_pre_hooks[key]
    object.__delattr__(block, _UNFUSED_ATTR)


def _canonical_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # State-dict post hook of an unfused block: the parts' tensors under the canonical names again.
    for canonical, parts in type(module).adapter_layout.items():
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{part}.{kind}" for part in parts]
            if all(key in state_dict for key in keys):
                tensors = [state_dict.pop(key) for key in keys]
                state_dict[f"{prefix}{canonical}.{kind}"] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _split_canonical_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Load pre-hook of an unfused block: canonical tensors split into the parts' names.
    for canonical, parts in type(module).adapter_layout.items():
        parent, _ = _parent_and_name(module, canonical)
        relative = tuple(_relative(canonical, part) for part in parts)
        pieces = [parent.get_submodule(path) for path in relative]
        for kind in ("weight", "bias"):
            key = f"{prefix}{canonical}.{kind}"
            if key not in state_dict:
                continue
            tensor = state_dict.pop(key)
            sizes = [getattr(piece, kind).shape[0] for piece in pieces] if len(parts) > 1 else [tensor.shape[0]]
            for part, chunk in zip(parts, tensor.split(sizes, dim=0), strict=True):
                state_dict[f"{prefix}{part}.{kind}"] = chunk
