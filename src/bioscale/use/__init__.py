"""Using trained models: embeddings, fine-tuned heads (full or LoRA), DNA generation and export for serving.

Every entry point accepts a loaded bioscale model or a MODEL argument (a bioscale or plain ``transformers`` ESM-2 /
Llama checkpoint directory, or a Hub id) loaded by :func:`load_model`; the ``bioscale embed | finetune | generate |
export`` commands in :mod:`bioscale.use.cli` are thin wrappers over the functions exported here.
"""

from bioscale.use.embed import Embeddings, embed, read_embeddings, write_embeddings
from bioscale.use.hf_export import export_model
from bioscale.use.finetune import (
    DSSP3_LABELS,
    DSSP8_LABELS,
    DSSP8_TO_DSSP3_INDEX,
    FinetuneConfig,
    FinetuneResult,
    LoraSettings,
    dssp8_to_dssp3,
    finetune,
    load_finetune_config,
    load_finetuned,
)
from bioscale.use.generate import GeneratedSequence, GenerationResult, generate_dna
from bioscale.use.generation_engine import GenerationEngine, SamplingParams
from bioscale.use.loading import LoadedModel, load_model

__all__ = [
    "DSSP3_LABELS",
    "DSSP8_LABELS",
    "DSSP8_TO_DSSP3_INDEX",
    "Embeddings",
    "FinetuneConfig",
    "FinetuneResult",
    "GeneratedSequence",
    "GenerationEngine",
    "GenerationResult",
    "LoadedModel",
    "LoraSettings",
    "SamplingParams",
    "dssp8_to_dssp3",
    "embed",
    "export_model",
    "finetune",
    "generate_dna",
    "load_finetune_config",
    "load_finetuned",
    "load_model",
    "read_embeddings",
    "write_embeddings",
]
