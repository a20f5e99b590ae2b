"""Export for serving: a bioscale model (or fine-tuning output) as a plain ``transformers`` checkpoint directory.

``bioscale export MODEL -o DIR`` writes what stock tools read without bioscale installed: ``config.json`` with a
``transformers`` ``model_type`` (``esm`` / ``llama``) and ``architectures`` (``EsmForMaskedLM``,
``EsmForTokenClassification``, ``LlamaForCausalLM``...), ``model.safetensors``, the tokenizer (``tokenizer.json``,
loaded by ``AutoTokenizer`` as a ``PreTrainedTokenizerFast``) and, for causal models, ``generation_config.json``. The
weights are converted exactly by :func:`bioscale.models.to_hf`. A Llama 3 export is a plain ``LlamaForCausalLM``
(no bioscale code, no custom ops), which is the layout serving engines such as vLLM and SGLang load; its DNA
tokenizer puts ``<bos>`` and no ``<eos>`` around a prompt, so their default ``add_special_tokens=True`` prompts
continue the sequence. A LoRA fine-tuning output is merged into its base
weights first. Heads with no ``transformers`` counterpart (bioscale's mean-pooling sequence head) are refused by
``to_hf`` with an error that says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bioscale.use.loading import LoadedModel, load_config, load_model, saved_task
from bioscale.models import to_hf

logger = logging.getLogger(__name__)


def load_for_export(source: str | Path) -> LoadedModel:
    """Load a checkpoint with the head it was saved with (or a fine-tuning output, LoRA merged) for export."""
    path = Path(source)
    if (path / "finetune_config.json").is_file():
        from bioscale.use.finetune import load_finetuned

        return load_finetuned(path, merge=True)
    return load_model(source, task=saved_task(load_config(source)))


def export_model(
    model: PreTrainedModel | str | Path,
    output_dir: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write ``model`` as a plain ``transformers`` checkpoint to ``output_dir`` and return the directory.

    Args:
        model: a bioscale model, or a checkpoint directory / Hub id / fine-tuning output directory.
        output_dir: created if needed; existing files of the same names are overwritten.
        tokenizer: saved alongside (default: the checkpoint's tokenizer, or the family's bioscale one).
    """
    from bioscale.use.loading import default_tokenizer, family_of_model

    if isinstance(model, (str, Path)):
        loaded = load_for_export(model)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    family = family_of_model(model)
    tokenizer = tokenizer or default_tokenizer(family, model.config)
    model = model.to("cpu")  # dtype kept: a bf16 model exports as bf16 safetensors
    hf_model = to_hf(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    _check_plain(output_dir)
    logger.info("exported %s as %s to %s", type(model).__name__, type(hf_model).__name__, output_dir)
    return output_dir


def _check_plain(output_dir: Path) -> None:
    """The written config must name a stock ``transformers`` model type (never ``bioscale_*``)."""
    config = json.loads((output_dir / "config.json").read_text())
    model_type = config.get("model_type", "")
    assert not str(model_type).startswith("bioscale"), f"to_hf produced a bioscale config ({model_type})"
