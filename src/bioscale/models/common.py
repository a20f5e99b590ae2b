"""What the bioscale model families share besides their layers (``bioscale.models.layers``): the ``PreTrainedModel``
base with explicit initialisation, the forward keyword-argument rule, and per-batch attention metadata.

Initialisation contract (torchtitan's, made to coexist with ``transformers``' loading):

- ``model.init_weights()`` fills *every* parameter and buffer (RoPE tables included) from scratch. Call it after
  building on ``meta`` and ``model.to_empty(device=...)``. With the same seed it gives the same weights; it is a no-op
  while the parameters are still on ``meta``.
- ``_init_weights(module)`` is the hook ``transformers`` calls while loading, for modules whose tensors were not all in
  the checkpoint (and for non-persistent buffers such as ``inv_freq``). It initialises only the tensors of
  ``module`` itself that carry no ``_is_hf_initialized`` mark, so it can never overwrite a loaded weight; buffers that
  are pure functions of the config (RoPE) are always recomputed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from bioscale.models.attention import AttentionInputs, packed_attention_inputs, padded_attention_inputs
from bioscale.models.batch import Batch, input_validation_enabled, prepare_batch
from bioscale.models.layers import RMSNorm, RotaryEmbedding

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

# What a bioscale ``forward`` does with keyword arguments it has no parameter for. ``transformers``' ``generate()``
# and ``Trainer`` pass extra arguments to every model and rename them between releases (``past_key_values`` became
# ``cache`` in 5.2x), so a fixed allow-list breaks on every rename. The rule, applied to each extra argument in turn:
#
# 1. An argument that would change the result if ignored (``REFUSED_FORWARD_KWARGS``) is refused when it asks for
#    something (a value that is not ``None`` / ``False``): ``inputs_embeds``, attention weights, per-layer hidden
#    states, head masks.
# 2. A value of ``None`` or ``False`` is ignored whatever the name: an option that is off cannot change the result.
# 3. A ``transformers`` ``Cache`` object, under any name (or under a cache name, ``CACHE_KWARGS``), is the KV cache:
#    taken by causal models, refused by encoders.
# 4. ``token_type_ids`` is ignored when it is all zeros (what tokenizers return for one segment; bioscale models have
#    no segment embedding) and refused otherwise.
# 5. The names in ``IGNORED_FORWARD_KWARGS`` are ignored (each with the reason); ``docs/models.md`` lists the same
#    names, and a test keeps the two equal.
# 6. Anything else is refused: a misspelt ``cu_seq_len_q`` must not silently turn a packed batch into one long
#    sequence.
IGNORED_FORWARD_KWARGS: dict[str, str] = {
    "return_dict": "outputs are always ModelOutput objects (which also index like tuples)",
    "cache_position": "positions come from attention_mask / position_ids and the cache length",
    "use_cache": "encoders keep no KV cache (causal models take use_cache as a parameter)",
    "num_items_in_batch": "models on the HF contract (bioscale.models.hf_contract) take it before this rule applies; "
    "for the others losses are means over the micro-batch's label tokens (use loss_reduction='sum' and "
    "num_label_tokens)",
    "logits_to_keep": "encoders score every position (causal models take logits_to_keep as a parameter)",
}
REFUSED_FORWARD_KWARGS: dict[str, str] = {
    "inputs_embeds": "does not support inputs_embeds; pass input_ids",
    "output_attentions": "does not return attention weights (fused attention kernels never form them)",
    "output_hidden_states": "does not return per-layer hidden states; use the base model's last_hidden_state",
    "head_mask": "does not support head_mask (fused attention kernels have no per-head mask)",
    "encoder_hidden_states": "is not an encoder-decoder model (no cross-attention)",
}
CACHE_KWARGS = ("past_key_values", "cache")


def _is_off(value: Any) -> bool:
    return value is None or value is False


def split_forward_kwargs(model_name: str, kwargs: dict[str, Any], *, takes_cache: bool = False) -> Cache | None:
    """Apply the rule above to a forward's extra keyword arguments; return the KV cache among them, if any.

    Raises ``ValueError`` naming the argument for everything the rule refuses.
    """
    cache: Cache | None = None
    for name, value in kwargs.items():
        if name in REFUSED_FORWARD_KWARGS:
            if not _is_off(value):
                raise ValueError(f"{model_name} {REFUSED_FORWARD_KWARGS[name]}")
            continue
        if _is_off(value):
            continue
        if isinstance(value, Cache) or name in CACHE_KWARGS:
            if not takes_cache:
                raise ValueError(f"{model_name} keeps no KV cache; got {name}={type(value).__name__}")
            if not isinstance(value, Cache):
                raise ValueError(f"{model_name}: {name} must be a transformers Cache, got {type(value).__name__}")
            if cache is not None and value is not cache:
                raise ValueError(f"{model_name}: two different KV caches were passed (past_key_values and cache)")
            cache = value
            continue
        if name == "token_type_ids":
            if torch.is_tensor(value) and input_validation_enabled() and bool(value.any()):
                raise ValueError(
                    f"{model_name} has no token-type (segment) embedding: token_type_ids must be all zeros or absent"
                )
            continue
        if name in IGNORED_FORWARD_KWARGS:
            continue
        raise ValueError(f"{model_name}.forward() got an unexpected keyword argument {name!r}")
    return cache


def reject_unknown_kwargs(model_name: str, kwargs: dict[str, Any]) -> None:
    """:func:`split_forward_kwargs` for models that keep no KV cache (encoders)."""
    split_forward_kwargs(model_name, kwargs, takes_cache=False)


def output_cache_field(output_class: type) -> str:
    """The name under which a ``transformers`` output class holds the KV cache: ``cache`` from transformers 5.2x,
    ``past_key_values`` before."""
    fields = getattr(output_class, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def transformer_blocks(model: nn.Module, *, needed_by: str = "parallelism") -> nn.ModuleList:
    """The model's transformer blocks, ``model.layers`` (every bioscale model lists them there so that parallelism,
    precision converters, activation checkpointing and compile can wrap them from outside); ``ValueError`` naming
    ``needed_by`` otherwise."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(  # noqa: TRY004  (a user-facing error)
            f"{type(model).__name__} exposes no `layers` nn.ModuleList; {needed_by} wraps the transformer blocks "
            "listed there"
        )
    return layers


def checkpoint_blocks(
    model: nn.Module, *, every_n_layers: int = 1, reentrant: bool = False, **checkpoint_kwargs: Any
) -> None:
    """Wrap every ``every_n_layers``-th block of ``model.layers`` in torch's ``checkpoint_wrapper`` (activation
    checkpointing; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint``, e.g. ``context_fn`` for
    selective checkpointing). Blocks already checkpointed are left alone. What ``bioscale train`` applies.

    The wrapper's state-dict hooks strip its ``_checkpoint_wrapped_module`` prefix, so checkpoints and exports keep
    the plain parameter names; ``named_modules`` / ``named_parameters`` do show it (see
    :func:`checkpoint_block_forwards` for the form that keeps every name).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    _check_every_n(every_n_layers)
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    layers = transformer_blocks(model, needed_by="activation checkpointing")
    for index, block in enumerate(layers):
        if index % every_n_layers == 0 and not is_activation_checkpointed(block):
            layers[index] = checkpoint_wrapper(block, checkpoint_impl=impl, **checkpoint_kwargs)


def checkpoint_block_forwards(
    model: nn.Module,
    *,
    every_n_layers: int = 1,
    reentrant: bool = False,
    offload: bool = False,
    **checkpoint_kwargs: Any,
) -> None:
    """Activation checkpointing of every ``every_n_layers``-th block, the same recompute as :func:`checkpoint_blocks`
    (``torch.utils.checkpoint`` around the block's forward, non-reentrant unless ``reentrant``), with the module tree
    untouched: the block's ``forward`` is replaced on the instance instead of wrapping the block. Module and
    parameter names stay the ones of the plain model, which code that walks ``named_modules`` needs (PEFT selects an
    adapter's state dict by the module names of its layers and missed every tensor below ``_checkpoint_wrapped_module``,
    measured with PEFT 0.21). ``offload``: keep the saved activations in (pinned, on CUDA) host memory.
    """
    _check_every_n(every_n_layers)
    if offload and reentrant:
        raise ValueError("offloading activations needs non-reentrant activation checkpointing (use_reentrant=False)")
    options = {"use_reentrant": reentrant, "offload": offload, **checkpoint_kwargs}
    for index, block in enumerate(transformer_blocks(model, needed_by="activation checkpointing")):
        if index % every_n_layers == 0 and not is_activation_checkpointed(block):
            # A partial over the block (not a closure): copy.deepcopy of the model then points at the copied block.
            block.forward = functools.partial(_checkpointed_forward, block, options)


def _checkpointed_forward(block: nn.Module, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    options = dict(options)
    if options.pop("offload"):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(type(block).forward, block, *args, **options, **kwargs)
    return checkpoint(type(block).forward, block, *args, **options, **kwargs)


def uncheckpoint_blocks(model: nn.Module) -> None:
    """Undo :func:`checkpoint_block_forwards` and :func:`checkpoint_blocks` (``apply_ac``): every block of
    ``model.layers`` is the plain block again."""
    layers = transformer_blocks(model, needed_by="activation checkpointing")
    for index, block in enumerate(layers):
        if is_checkpoint_wrapped(block):
            layers[index] = block = block._checkpoint_wrapped_module
        if _has_checkpointed_forward(block):
            del block.forward


def _check_every_n(every_n_layers: int) -> None:
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")


def _has_checkpointed_forward(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def is_activation_checkpointed(block: nn.Module) -> bool:
    """Whether ``block`` runs under activation checkpointing (either form)."""
    return is_checkpoint_wrapped(block) or _has_checkpointed_forward(block)


def is_checkpoint_wrapped(block: nn.Module) -> bool:
    """Whether ``block`` is wrapped for activation checkpointing (torch's ``CheckpointWrapper``)."""
    return isinstance(getattr(block, "_checkpoint_wrapped_module", None), nn.Module)


def unwrapped_block(block: nn.Module) -> nn.Module:
    """The transformer block itself, under an activation-checkpointing wrapper if there is one."""
    return block._checkpoint_wrapped_module if is_checkpoint_wrapped(block) else block


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls will produce for activations like ``x`` (the autocast dtype when autocast is on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def attention_inputs_for_batch(
    batch: Batch, hidden_states: torch.Tensor, *, backend: str, causal: bool, dropout_p: float
) -> AttentionInputs:
    """The attention metadata of one forward (both families build it once, outside the blocks).

    Packed batches get ``cu_seqlens`` (``varlen``, or its fallback), padded ones a key-padding mask after
    ``batch.past_length`` cached tokens; ``hidden_states`` ``[B, S, D]`` supplies the shapes, device and activation dtype.
    """
    if batch.is_packed:
        assert batch.cu_seqlens is not None and batch.max_seqlen is not None and batch.sequence_ids is not None
        return packed_attention_inputs(
            backend=backend,
            causal=causal,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            sequence_ids=batch.sequence_ids,
            dtype=activation_dtype(hidden_states),
            dropout_p=dropout_p,
        )
    return padded_attention_inputs(
        backend=backend,
        causal=causal,
        attention_mask=batch.attention_mask,
        query_length=hidden_states.shape[1],
        past_length=batch.past_length,
        batch_size=hidden_states.shape[0],
        device=hidden_states.device,
        dropout_p=dropout_p,
    )


def init_in_place(param: torch.Tensor, fill: Callable[[torch.Tensor], None]) -> None:
    """Run the in-place initialiser ``fill`` on ``param``, also when ``param`` is an FSDP2 (DTensor) shard.

    In-place ops on a *slice* of a DTensor do not reach its shards (measured, torch 2.13, 2 gloo ranks: after
    ``weight[pad].zero_()`` the gathered ``<pad>`` row and the vocabulary-padding rows of a Shard(0) embedding were
    random), and DTensor's random ops do not reproduce the unsharded draw. So a sharded parameter is filled as a full
    local tensor, which every rank draws alike (the trainer seeds all ranks the same before init), and its own shard
    copied in: the same weights as the unsharded init with that seed, one parameter's memory at a time.
    """
    if DTensor is not None and isinstance(param, DTensor):
        full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        fill(full)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
    else:
        fill(param)


def keep_as_is(tensor: torch.Tensor | None, only_missing: bool) -> bool:
    """Whether initialisation must leave ``tensor`` alone: absent, on ``meta`` (nothing to fill), or already loaded
    by ``transformers`` (marked ``_is_hf_initialized``) while only missing tensors are being filled."""
    if tensor is None or tensor.device.type == "meta":
        return True
    return only_missing and bool(getattr(tensor, "_is_hf_initialized", False))


class BioscalePreTrainedModel(PreTrainedModel):
    """Base of every bioscale model: explicit ``init_weights()`` and a loading-safe ``_init_weights`` hook.

    Subclasses extend :meth:`_init_module` for parameters that are not ``nn.Linear`` / ``nn.Embedding`` / norms /
    RoPE, and expose their transformer blocks as ``layers`` (an ``nn.ModuleList``).
    """

    supports_gradient_checkpointing = False  # activation checkpointing is applied from outside, per block
    _supports_sdpa = True

    @property
    def initializer_range(self) -> float:
        return float(getattr(self.config, "initializer_range", 0.02))

    def init_weights(self) -> None:
        """Initialise every parameter and buffer from scratch (no-op while the model is on ``meta``)."""
        if any(t.device.type == "meta" for t in [*self.parameters(), *self.buffers()]):
            return
        for module in self.modules():
            self._init_module(module, only_missing=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' loading hook: only fill what loading did not (see the module docstring).
        self._init_module(module, only_missing=True)

    @torch.no_grad()
    def _init_module(self, module: nn.Module, only_missing: bool) -> None:
        """Initialise the tensors that belong to ``module`` itself (not its children)."""
        std = self.initializer_range
        if isinstance(module, nn.Linear):
            if not keep_as_is(module.weight, only_missing):
                init_in_place(module.weight, lambda w: nn.init.normal_(w, mean=0.0, std=std))
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if not keep_as_is(module.weight, only_missing):
                padding_idx = module.padding_idx

                def embedding(w: torch.Tensor) -> None:
                    nn.init.normal_(w, mean=0.0, std=std)
                    if padding_idx is not None:
                        w[padding_idx].zero_()
                    self._zero_padded_vocab_rows(w)

                init_in_place(module.weight, embedding)
        elif isinstance(module, nn.LayerNorm):
            if not keep_as_is(module.weight, only_missing):
                nn.init.ones_(module.weight)
            if not keep_as_is(module.bias, only_missing):
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            if not keep_as_is(module.weight, only_missing):
                module.reset_parameters()
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()  # a pure function of the config: recomputing never loses information

    def _zero_padded_vocab_rows(self, weight: torch.Tensor) -> None:
        """Rows past ``config.vocab_size`` (vocabulary padding) are never looked up: keep them zero."""
        vocab_size = self.config.vocab_size
        if weight.shape[0] <= vocab_size:
            return
        if DTensor is not None and isinstance(weight, DTensor):  # a slice write would not reach the shards
            full = weight.full_tensor()
            full[vocab_size:].zero_()
            weight.copy_(distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None))
        else:
            weight[vocab_size:].zero_()

    def get_output_embeddings(self) -> nn.Module | None:
        # None keeps transformers' tying machinery away: bioscale ties by reading the embedding weight in the head.
        return None


class EncoderInputsMixin:
    """``prepare_batch`` of a bidirectional base model (ESM-2, AMPLIFY, EnCodon, Geneformer): the forward inputs,
    padded or packed, validated into a :class:`~bioscale.models.batch.Batch` (every packed form of
    ``DataCollatorWithFlattening`` is accepted: position ids that restart per sequence are turned into
    ``cu_seq_lens``). A family with more to check overrides it and calls ``super()``."""

    config: Any

    def prepare_batch(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> Batch:
        return prepare_batch(
            input_ids,
            vocab_size=self.config.vocab_size,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            seq_idx=seq_idx,
            derive_packing=True,
        )


class EncoderHeadsMixin:
    """What every head class of an encoder family shares: its base model (``base_model``, the attribute named by
    ``base_model_prefix``) supplies the transformer blocks (``layers``, for FSDP / activation checkpointing /
    compile), the input embeddings, and the validated batch with its final hidden states."""

    base_model: Any

    @property
    def layers(self) -> nn.ModuleList:
        return self.base_model.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.set_input_embeddings(value)

    def _batch_and_hidden(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cu_seq_lens_q: torch.Tensor | None,
        cu_seq_lens_k: torch.Tensor | None,
        max_length_q: int | None,
        max_length_k: int | None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[Batch, torch.Tensor]:
        """The validated batch and the base model's final hidden states for it."""
        batch = self.base_model.prepare_batch(
            input_ids, attention_mask, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, seq_idx
        )
        return batch, self.base_model.encode(batch)
