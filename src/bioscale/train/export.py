"""Final export of a trained (possibly sharded) model as ``save_pretrained`` folders that load without bioscale's loop.

Two folders, both with ``config.json``, ``model.safetensors`` and the tokenizer:

- ``final_model``: the bioscale class; ``AutoModelForMaskedLM/CausalLM.from_pretrained(dir)`` loads it after
  ``import bioscale`` (which registers the Auto classes);
- ``final_model_hf``: the plain ``transformers`` class (``EsmForMaskedLM`` / ``LlamaForCausalLM``) made by
  ``bioscale.models.to_hf``, for users who do not install bioscale.

Gathering the full state dict is collective (every rank takes part, FSDP2 shards are all-gathered and offloaded to
CPU; Megatron-FSDP's uneven shards are gathered by its own helper); only rank 0 rebuilds an unsharded CPU model from it and writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from bioscale.distributed.init import barrier
from bioscale.distributed.megatron_fsdp import full_state_dict, is_megatron_fsdp
from bioscale.models import build_model, spec_for_config, to_hf

logger = logging.getLogger(__name__)


def export_final_model(
    model: nn.Module,
    *,
    model_config: PretrainedConfig,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    hf_out_dir: str | Path | None,
    is_main: bool,
) -> None:
    """Write ``model``'s weights to ``out_dir`` (bioscale class) and ``hf_out_dir`` (plain transformers; None skips).

    Collective: call on every rank.
    """


    if is_megatron_fsdp(model):
        state = full_state_dict(model)
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        export_model = build_model(model_config, task=task, device="meta")
        export_model.to_empty(device="cpu")
        export_model.init_weights()  # fills buffers (RoPE tables) that the state dict may not carry
        export_model.load_state_dict(state, strict=True)
        export_model.eval()
        out_dir = Path(out_dir)
        export_model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        logger.info("exported %s to %s", type(export_model).__name__, out_dir)
        spec = spec_for_config(model_config)
        unsupported = spec.hf_unsupported(model_config) if spec.hf_unsupported is not None else None
        if hf_out_dir is not None and not spec.hf_model_types:
            logger.info("%s has no stock transformers counterpart: no %s written", type(export_model).__name__,
                        hf_out_dir)  # fmt: skip
        elif hf_out_dir is not None and unsupported is not None:  # e.g. a ViT with registers or QK-norm
            logger.info("no %s written: %s", hf_out_dir, unsupported)
        elif hf_out_dir is not None:
            hf_model = to_hf(export_model)
            hf_model.save_pretrained(Path(hf_out_dir), safe_serialization=True)
            tokenizer.save_pretrained(Path(hf_out_dir))
            logger.info("exported %s to %s", type(hf_model).__name__, hf_out_dir)
    barrier()
