"""Evaluation that measures biology: language-model quality on held-out sequences and a secondary-structure probe.

- :func:`masked_lm_perplexity` (proteins, fixed seeded masking) and :func:`causal_lm_nll` (DNA, bits per base);
- :func:`secondary_structure_probe`: Q3/Q8 of a linear probe on frozen per-residue embeddings, next to a
  randomly initialised model, the residue identity alone and the majority class;
- :func:`secondary_structure_finetune`: the option to the probe: Q3/Q8 of a per-residue head fine-tuned with LoRA
  adapters or all weights (:func:`bioscale.use.finetune`) on the same split;
- :func:`masked_gene_metrics` / :func:`cell_type_probe` (single cells, Geneformer): masked-gene accuracy and
  perplexity under fixed masking, and a linear probe of cell types on frozen cell embeddings (``eval.single_cell``);
- :func:`write_report` / :func:`plot_training_curves`: a Markdown + HTML report and a PNG of the training curves.

The pipeline's eval stage (:func:`bioscale.pipeline.evaluate`) composes these; they also work on any model.
"""

from bioscale.eval.perplexity import causal_lm_nll, fixed_mlm_masking, masked_lm_perplexity
from bioscale.eval.report import ReportSection, plot_training_curves, read_metrics_jsonl, write_report
from bioscale.eval.single_cell import (
    cell_type_probe,
    evaluate_single_cell_models,
    masked_gene_metrics,
    read_labelled_cells,
)
from bioscale.eval.secondary_structure import (
    SecondaryStructureData,
    fit_linear_probe,
    load_secondary_structure,
    residue_embeddings,
    secondary_structure_finetune,
    secondary_structure_probe,
)

__all__ = [
    "ReportSection",
    "SecondaryStructureData",
    "causal_lm_nll",
    "cell_type_probe",
    "evaluate_single_cell_models",
    "masked_gene_metrics",
    "read_labelled_cells",
    "fit_linear_probe",
    "fixed_mlm_masking",
    "load_secondary_structure",
    "masked_lm_perplexity",
    "plot_training_curves",
    "read_metrics_jsonl",
    "residue_embeddings",
    "secondary_structure_finetune",
    "secondary_structure_probe",
    "write_report",
]
