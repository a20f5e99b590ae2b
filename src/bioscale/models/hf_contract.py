"""The ``PreTrainedModel`` contract that ``transformers``' ``Trainer``, Accelerate, PEFT and Lightning rely on, as one
mixin (:class:`HFContractMixin`) the bioscale families put in front of :class:`BioscalePreTrainedModel`.

Each item is one silent trap of the stock machinery, measured on transformers 5.24 / PEFT 0.21 before this mixin:

- Loss normalisation. ``Trainer`` takes a forward with ``**kwargs`` to normalise its loss by the
  ``num_items_in_batch`` it passes (the label tokens of the whole accumulated step, over every rank) and then skips
  its own division by the accumulation steps; a model that ignores the argument doubles the loss and the gradient at
  ``gradient_accumulation_steps=2``. A family honours it (``loss = sum of token losses / num_items_in_batch``, what
  ``transformers``' ``ForCausalLMLoss`` does) or declares ``accepts_loss_kwargs = False`` (``Trainer`` then averages
  per-micro-batch means, as stock ESM does): whichever gives the stock model's numbers.
- Labels. ``Trainer`` treats every forward parameter whose name contains ``label`` as a label; an evaluation batch
  without all of them gets no loss and no ``compute_metrics``. So ``logits_on_labels_only`` and ``shift_labels`` are
  keyword options taken from ``**kwargs`` (declared in :attr:`HFContractMixin.forward_options`), not parameters, and
  ``find_labels`` returns ``["labels"]``.
- Activation checkpointing: ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` (and the
  ``disable`` pair) recompute each block in backward, as ``bioscale train activation_checkpointing=full`` does, but
  without wrapping the blocks (:func:`bioscale.models.common.checkpoint_block_forwards`): module names stay those of
  the plain model, which PEFT needs to find an adapter's tensors.
- Embeddings: ``get_output_embeddings`` returns the untied LM head's projection (``None`` when the head reads the
  embedding matrix), so PEFT's ``"all-linear"`` leaves it out as it does for stock models; ``resize_token_embeddings``
  resizes every vocabulary-sized tensor (embedding, head, head bias) and the config together.
- Packed batches: every output form of ``DataCollatorWithFlattening`` is accepted (``position_ids``-only packing and
  ``seq_idx`` derive the boundaries, :func:`bioscale.models.batch.packing_from_flattening`).
- Adapters: :meth:`HFContractMixin.unfuse_projections` gives the blocks the stock module names PEFT target lists use
  (:mod:`bioscale.models.adapters`); ``add_adapter`` / ``load_adapter`` do it first, and a PEFT config that names stock
  modules of a still-fused model is refused when PEFT hands it to the model, instead of adapting a wrong subset.
  PEFT's default LoRA targets for the family's ``model_type`` are registered when a model is built with PEFT loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bioscale.models.adapters import check_adapter_layout, fuse_block, is_unfused, unfuse_block
from bioscale.models.common import (
    checkpoint_block_forwards,
    is_activation_checkpointed,
    is_checkpoint_wrapped,
    transformer_blocks,
    uncheckpoint_blocks,
    unwrapped_block,
)
from bioscale.models.batch import Batch, labels_like, unbatch
from bioscale.models.loss import select_label_positions, token_cross_entropy
from bioscale.models.outputs import MaskedLMOutputWithCount
from bioscale.models.registry import spec_for_config

# Name segment the activation-checkpointing wrapper adds to module paths (absent from state-dict keys).
_WRAPPER_SEGMENT = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class ForwardOptions:
    """The keyword options of a bioscale forward that travel in ``**kwargs`` (see the module docstring)."""

    logits_on_labels_only: bool = False
    shift_labels: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | int | None = None
    seq_idx: torch.Tensor | None = None


def pop_forward_options(kwargs: dict[str, Any], *, shift_labels: bool = False) -> ForwardOptions:
    """Take the :class:`ForwardOptions` out of a forward's ``kwargs`` (the rest goes to
    :func:`bioscale.models.common.split_forward_kwargs`). ``shift_labels`` is taken only by causal LMs; an encoder
    leaves it in ``kwargs``, where it is refused."""
    return ForwardOptions(
        logits_on_labels_only=bool(kwargs.pop("logits_on_labels_only", False)),
        shift_labels=kwargs.pop("shift_labels", None) if shift_labels else None,
        num_items_in_batch=kwargs.pop("num_items_in_batch", None),
        seq_idx=kwargs.pop("seq_idx", None),
    )


def finish_loss(
    loss_sum: torch.Tensor, count: torch.Tensor, *, reduction: str, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """The loss a head returns from the sum of its terms and their count: the sum (``reduction="sum"``), the sum over
    ``num_items_in_batch`` (``Trainer``'s global count, when given) or the mean over ``count`` (0 without terms)."""
    if reduction == "sum":
        if num_items_in_batch is not None:
            raise ValueError("num_items_in_batch and loss_reduction='sum' both decide the normaliser; pass one")
        return loss_sum
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    return loss_sum / count.clamp(min=1)


class HFContractMixin:
    """The contract of the module docstring; put it before :class:`BioscalePreTrainedModel` in a family's bases.

    A family declares, besides the mixin:

    - ``accepts_loss_kwargs`` (class attribute): ``False`` where the stock counterpart averages per micro-batch.
    - ``_output_embeddings_path``: dotted path of the LM head's output projection on the head classes (``None``: the
      head reads the embedding matrix, or there is no LM head); ``_vocab_parameter_paths``: other vocabulary-sized
      parameters (ESM-2's LM-head bias).
    - ``adapter_layout`` on its block class (:mod:`bioscale.models.adapters`), and ``adapter_targets`` /
      ``hf_module_names`` in its :class:`~bioscale.models.registry.ModelSpec`.
    """

    accepts_loss_kwargs: bool = True
    supports_gradient_checkpointing = True
    # Keyword options read from **kwargs (so that Trainer's find_labels sees only `labels`); bioscale.use.variants
    # asks for them here.
    forward_options: tuple[str, ...] = ("logits_on_labels_only", "num_items_in_batch", "seq_idx")
    _output_embeddings_path: str | None = None
    _vocab_parameter_paths: tuple[str, ...] = ()

    # ---- construction ---------------------------------------------------------------------------------------------

    def post_init(self) -> None:
        super().post_init()  # type: ignore[misc]
        for block in self._plain_blocks():
            layout = getattr(type(block), "adapter_layout", None)
            if layout is not None:
                check_adapter_layout(type(block), layout)
        register_peft_default_targets(self.config)  # type: ignore[attr-defined]

    def _plain_blocks(self) -> list[nn.Module]:
        layers = getattr(self, "layers", None)
        return [unwrapped_block(block) for block in layers] if isinstance(layers, nn.ModuleList) else []

    # ---- loss -----------------------------------------------------------------------------------------------------

    def _finish_loss(
        self, loss_sum: torch.Tensor, count: torch.Tensor, reduction: str, options: ForwardOptions
    ) -> torch.Tensor:
        # A family that declares accepts_loss_kwargs=False ignores num_items_in_batch (Trainer does not pass it).
        items = options.num_items_in_batch if self.accepts_loss_kwargs else None
        return finish_loss(loss_sum, count, reduction=reduction, num_items_in_batch=items)

    def _masked_lm_output(
        self,
        hidden_states: torch.Tensor,
        batch: Batch,
        labels: torch.Tensor | None,
        *,
        head: Callable[[torch.Tensor], torch.Tensor],
        loss_reduction: str,
        options: ForwardOptions,
    ) -> MaskedLMOutputWithCount:
        """The masked-LM heads' common tail: ``head`` on the encoder's ``hidden_states`` (only at label positions
        under ``logits_on_labels_only``), the summed token loss finished by :meth:`_finish_loss`, and the logits back
        in the batch's layout."""
        if labels is None:
            return MaskedLMOutputWithCount(logits=unbatch(head(hidden_states), batch))
        labels = labels_like(labels, batch)
        if options.logits_on_labels_only:
            hidden_states, labels = select_label_positions(hidden_states, labels)
        logits = head(hidden_states)
        loss_sum, count = token_cross_entropy(logits, labels, reduction="sum")
        loss = self._finish_loss(loss_sum, count, loss_reduction, options)
        if not options.logits_on_labels_only:
            logits = unbatch(logits, batch)
        return MaskedLMOutputWithCount(loss=loss, logits=logits, num_label_tokens=count)

    # ---- activation checkpointing ---------------------------------------------------------------------------------

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: Mapping[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Checkpoint every ``every_n_layers``-th block (bioscale's per-block recompute, non-reentrant unless
        ``use_reentrant=True`` is asked for; :func:`bioscale.models.common.checkpoint_block_forwards`, which keeps
        every module name); other ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``.
        ``offload`` keeps the saved activations in host memory."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        reentrant = bool(kwargs.pop("use_reentrant", False))
        checkpoint_block_forwards(
            self, every_n_layers=every_n_layers, reentrant=reentrant, offload=offload, **kwargs  # type: ignore[arg-type]
        )

    def activation_checkpointing_disable(self) -> None:
        """Every block runs without activation checkpointing again."""
        uncheckpoint_blocks(self)  # type: ignore[arg-type]

    @property
    def is_activation_checkpointing(self) -> bool:
        layers = getattr(self, "layers", None)
        return isinstance(layers, nn.ModuleList) and any(is_activation_checkpointed(block) for block in layers)

    # transformers < 5 names (and the deprecated aliases of 5.x), the same implementation.
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ---- embeddings -----------------------------------------------------------------------------------------------

    def get_output_embeddings(self) -> nn.Module | None:
        # A head that reads the embedding matrix has no module of its own (None also keeps transformers' tying away).
        path = type(self)._output_embeddings_path
        return _get_path(self, path) if path is not None else None

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        path = type(self)._output_embeddings_path
        if path is None or _get_path(self, path) is None:
            raise ValueError(f"{type(self).__name__} has no output-embedding module of its own")
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self  # type: ignore[attr-defined]
        setattr(parent, name, new_embeddings)

    @torch.no_grad()
    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Give the model ``new_num_tokens`` real tokens (default: the current count), rows rounded up to
        ``pad_to_multiple_of``; returns the input embedding.

        Every vocabulary-sized tensor changes together (embedding, untied LM head and its bias, ESM-2's head bias) and
        the config follows (``vocab_size``, ``padded_vocab_size``), so logits have ``new_num_tokens`` columns and
        ``to_hf`` / ``save_pretrained`` work after it. Existing rows keep their values; new token rows are the mean
        of the existing ones with ``mean_resizing`` (``transformers`` draws them around that mean; the mean itself is
        deterministic), else the family's own initialisation; new bias entries the mean of the old ones (or zero);
        vocabulary-padding rows zero.

        Raises ``ValueError`` for fewer tokens than a special token id needs, or ``pad_to_multiple_of < 1``.
        """
        config = self.config  # type: ignore[attr-defined]
        old_vocab = int(config.vocab_size)
        new_vocab = old_vocab if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        special_names = ("pad_token_id", "mask_token_id", "cls_token_id", "bos_token_id", "eos_token_id", "unk_token_id")
        special = {name: getattr(config, name, None) for name in special_names}
        too_big = {name: value for name, value in special.items() if isinstance(value, int) and value >= new_vocab}
        if new_vocab < 1:
            raise ValueError(f"cannot resize to {new_vocab} tokens")
        if too_big:
            raise ValueError(f"cannot resize to {new_vocab} tokens: the config's special tokens need more ({too_big})")
        rows = new_vocab
        if pad_to_multiple_of:
            rows += (-new_vocab) % pad_to_multiple_of
        embedding = self.get_input_embeddings()  # type: ignore[attr-defined]
        keep = min(old_vocab, new_vocab)
        for module, name in self._vocab_tensors():
            old = getattr(module, name)
            new = old.new_zeros((rows, *old.shape[1:]))
            new[:keep] = old[:keep]
            if new_vocab > old_vocab:
                new[old_vocab:new_vocab] = self._new_vocab_rows(module, name, old[:old_vocab], new_vocab - old_vocab,
                                                                mean_resizing)  # fmt: skip
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
            if isinstance(module, nn.Embedding):
                module.num_embeddings = rows
            elif isinstance(module, nn.Linear):
                module.out_features = rows
        config.vocab_size = new_vocab
        config.padded_vocab_size = rows if rows != new_vocab else None
        for module in self.modules():  # type: ignore[attr-defined]
            if hasattr(module, "vocab_size") and module is not self and isinstance(module.vocab_size, int):
                module.vocab_size = new_vocab  # heads that keep their own copy (ESM-2's) slice the logits with it
        return embedding

    def _vocab_tensors(self) -> list[tuple[nn.Module, str]]:
        """``(module, parameter name)`` of every vocabulary-sized tensor (rows = the embedding's rows)."""
        found: list[tuple[nn.Module, str]] = [(self.get_input_embeddings(), "weight")]  # type: ignore[attr-defined]
        head = self.get_output_embeddings()
        if head is not None:
            found.append((head, "weight"))
            if getattr(head, "bias", None) is not None:
                found.append((head, "bias"))
        for path in type(self)._vocab_parameter_paths:
            parent_path, _, name = path.rpartition(".")
            found.append((self.get_submodule(parent_path) if parent_path else self, name))  # type: ignore[attr-defined]
        return found

    def _new_vocab_rows(
        self, module: nn.Module, name: str, old: torch.Tensor, count: int, mean_resizing: bool
    ) -> torch.Tensor:
        if mean_resizing:
            return old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(count, *old.shape[1:])
        if old.dim() == 1:  # a bias: transformers starts new entries at zero
            return old.new_zeros(count)
        fresh = type(module)(*_shape_args(module, count), device=old.device, dtype=old.dtype)
        self._init_module(fresh, only_missing=False)  # type: ignore[attr-defined]
        return fresh.weight

    # ---- adapters -------------------------------------------------------------------------------------------------

    @property
    def projections_fused(self) -> bool:
        """Whether the blocks are in the fused (training) layout rather than the stock-named adapter layout."""
        return not any(is_unfused(block) for block in self._plain_blocks())

    def unfuse_projections(self) -> HFContractMixin:
        """Put every block into the stock-named adapter layout (:mod:`bioscale.models.adapters`); returns ``self``.

        Do it before attaching PEFT adapters with stock target names (``add_adapter`` / ``load_adapter`` do it
        themselves). Outputs, parameters and state-dict keys are unchanged; the projections run unfused.
        """
        for block in self._plain_blocks():
            unfuse_block(block)
        return self

    def fuse_projections(self) -> HFContractMixin:
        """Back to the fused layout (exact), e.g. after ``merge_and_unload()``; returns ``self``."""
        for block in self._plain_blocks():
            fuse_block(block)
        return self

    def adapter_layout_module_names(self) -> list[str]:
        """Module names the unfused layout has and the fused one lacks (``esm.layers.0.attention.query``, ...)."""
        layers = transformer_blocks(self, needed_by="adapters")  # type: ignore[arg-type]
        prefix = next(name for name, module in self.named_modules() if module is layers)  # type: ignore[attr-defined]
        names = []
        for index, block in enumerate(layers):
            inner = f"{prefix}.{index}." + (_WRAPPER_SEGMENT if is_checkpoint_wrapped(block) else "")
            for parts in getattr(type(unwrapped_block(block)), "adapter_layout", {}).values():
                names += [inner + part for part in parts]
        return names

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        self.unfuse_projections()
        super().add_adapter(adapter_config, adapter_name)  # type: ignore[misc]

    def load_adapter(self, *args: Any, **kwargs: Any) -> Any:
        self.unfuse_projections()
        return super().load_adapter(*args, **kwargs)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        # PEFT's tuners set `model.peft_config` right after injecting their layers: the one moment a bioscale model
        # sees the config PEFT resolved, so the check of the module docstring happens here.
        if name == "peft_config" and isinstance(value, dict) and value:
            self._check_peft_configs(value)
        super().__setattr__(name, value)

    def _check_peft_configs(self, configs: Mapping[str, Any]) -> None:
        """``ValueError`` for a config naming stock modules of a fused model; on the unfused layout, the adapter's
        ``target_modules`` are pinned to the exact modules it adapted (so loading it onto a stock ``transformers``
        model, whose paths differ, fails loudly instead of leaving it unloaded with a warning)."""
        from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

        if self.projections_fused:
            stock_names = self.adapter_layout_module_names()
            for adapter, config in configs.items():
                if getattr(config, "target_modules", None) is None:
                    continue
                hits = [name for name in stock_names if check_target_module_exists(config, name)]
                if hits:
                    raise ValueError(
                        f"adapter {adapter!r} targets {sorted({h.rsplit('.', 1)[-1] for h in hits})}, module names of "
                        f"the unfused (stock-named) layout, but this {type(self).__name__} is fused, so only some of "
                        "the intended modules were adapted. Call model.unfuse_projections() before get_peft_model "
                        "(model.add_adapter() does it), or target the fused modules by their bioscale names. The model "
                        "now carries a partial adapter: rebuild it."
                    )
            return
        for adapter, config in configs.items():
            if getattr(config, "target_modules", None) is None:
                continue
            adapted = sorted(
                name.replace(_WRAPPER_SEGMENT, "")
                for name, module in self.named_modules()  # type: ignore[attr-defined]
                if isinstance(module, BaseTunerLayer)
                and any(adapter in getattr(module, layer_name, {}) for layer_name in module.adapter_layer_names)
            )
            if adapted:
                config.target_modules = set(adapted)


def register_peft_default_targets(config: Any) -> None:
    """Make the family's ``adapter_targets`` PEFT's default LoRA targets for its ``model_type`` (what a
    ``LoraConfig()`` without ``target_modules`` adapts). A no-op while PEFT is not imported: the lookup happens when a
    model is built, so bioscale never imports PEFT itself."""
    constants = sys.modules.get("peft.utils.constants")
    if constants is None:
        return
    targets = spec_for_config(config).adapter_targets
    if targets:
        constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(config.model_type, list(targets))


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module: Any = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _shape_args(module: nn.Module, rows: int) -> tuple[int, int]:
    if isinstance(module, nn.Embedding):
        return rows, module.embedding_dim
    assert isinstance(module, nn.Linear), type(module)
    return module.in_features, rows
