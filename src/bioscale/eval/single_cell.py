"""Evaluation of single-cell models (Geneformer): held-out masked-gene accuracy and perplexity, and a cell-type probe.

- :func:`masked_gene_metrics`: the masked-LM objective on held-out cells under *fixed* seeded masking (cell ``i``
  masked from ``(seed, i)``, the training statistics: 15% of genes, 80% ``<mask>`` / 10% a random gene / 10% kept,
  ``<cls>``/``<eos>``/``<pad>`` never selected), so two checkpoints see the same masked inputs. Reports top-1 and top-10
  accuracy at the masked positions, NLL per masked gene and perplexity ``exp(total NLL / masked genes)``.
- :func:`cell_type_probe`: a multinomial logistic regression (L-BFGS, standardised features) on frozen mean-pooled cell
  embeddings, trained on a seeded split of the labelled cells and scored on the rest: accuracy and macro-F1, next to
  the majority class. Run it for a trained model and a random-init one of the same shape to see what pretraining adds.
- :func:`read_labelled_cells`: the cells (and labels, when a column is named) of a tokenized parquet (``input_ids``,
  optional ``cell_id`` and label columns: ``bioscale tokenize-cells --keep-obs cell_type``) or of an ``.h5ad`` of counts.

``bioscale eval --model DIR --data cells.parquet --label-column cell_type`` composes these (``pipeline.stages``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bioscale.data.singlecell import (
    GeneVocabulary,
    read_tokenized_cells,
    resolve_shared_path,
    tokenize_cells,
    vocabulary_of_tokenizer,
)
from bioscale.eval.perplexity import fixed_mlm_masking
from bioscale.eval.scoring_inputs import padded_batches, resolve_device
from bioscale.use.embed_cells import embed_tokenized_cells, fit_cells_to_context


def read_labelled_cells(
    source: str | os.PathLike[str],
    vocabulary: GeneVocabulary,
    *,
    label_column: str | None = None,
    gene_medians: str | os.PathLike[str] | Mapping[str, float] | None = None,
    input_ids_column: str = "input_ids",
    cell_id_column: str | None = None,
    limit: int | None = None,
) -> tuple[list[str], list[np.ndarray], list[str] | None, dict[str, Any]]:
    """``(cell ids, token ids, labels or None, what reading did)`` of a tokenized parquet or an ``.h5ad``.

    Raises ``ValueError`` naming the file and column for a missing label column or cells without a label.
    """
    path = resolve_shared_path(source)
    if not path.exists():
        raise ValueError(f"evaluation data {str(source)!r} does not exist")
    labels: list[str] | None = None
    if path.suffix.lower() == ".h5ad":
        tokenized = tokenize_cells(path, vocabulary=vocabulary, gene_medians=gene_medians,
                                   obs_columns=[label_column] if label_column else [],
                                   cell_id_column=cell_id_column)  # fmt: skip
        ids, cells = tokenized.cell_ids, tokenized.input_ids
        if label_column:
            labels = [None if v is None else str(v) for v in tokenized.obs[label_column]]
        info: dict[str, Any] = {"tokenization": tokenized.stats.as_dict(), "gene_medians": tokenized.medians_source}
    else:
        ids, cells = [], []
        for cell_id, tokens in read_tokenized_cells(path, column=input_ids_column, id_column=cell_id_column,
                                                     vocab_size=len(vocabulary)):  # fmt: skip
            ids.append(cell_id)
            cells.append(tokens)
        if label_column:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names if path.is_file() else []
            if label_column not in names:
                raise ValueError(f"{path}: no label column {label_column!r} (columns: {names})")
            labels = [None if v is None else str(v) for v in pq.read_table(path, columns=[label_column])
                      .column(label_column).to_pylist()]  # fmt: skip
        info = {}
    if limit is not None:
        ids, cells = ids[:limit], cells[:limit]
        labels = labels[:limit] if labels is not None else None
    if not cells:
        raise ValueError(f"evaluation data {path}: no cells")
    if labels is not None and any(v is None for v in labels):
        missing = sum(v is None for v in labels)
        raise ValueError(f"{path}: {missing} cells have no value in label column {label_column!r}")
    return ids, cells, labels, info


def _forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast_dtype):
    if autocast_dtype is not None:
        with torch.autocast(input_ids.device.type, dtype=autocast_dtype):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


@torch.no_grad()
def masked_gene_metrics(
    model: torch.nn.Module,
    cells: Sequence[np.ndarray],
    tokenizer: Any,
    *,
    mlm_probability: float = 0.15,
    seed: int = 0,
    max_length: int | None = None,
    max_tokens_per_batch: int = 16_384,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Masked-gene accuracy and perplexity of a Geneformer masked LM on ``cells`` (token ids, special tokens
    included) under fixed seeded masking (see the module docstring). Cells longer than ``max_length`` (default: the
    model's positions) keep their top-ranked genes.

    Returns ``accuracy``, ``top10_accuracy``, ``nll_per_token``, ``perplexity``, ``num_masked_tokens``,
    ``num_cells``, ``num_truncated``, ``mlm_probability``, ``masking_seed``.
    """
    vocabulary = vocabulary_of_tokenizer(tokenizer)
    device = resolve_device(device)
    context = int(max_length or model.config.max_position_embeddings)
    cells, num_truncated = fit_cells_to_context(cells, vocabulary, context)
    masked = [
        fixed_mlm_masking(ids, seed=seed, index=i, special_token_ids=sorted(vocabulary.special_ids),
                          mask_token_id=vocabulary.mask_id, random_token_ids=vocabulary.gene_ids.tolist(),
                          mlm_probability=mlm_probability)  # fmt: skip
        for i, ids in enumerate(cells)
    ]
    was_training = model.training
    model.eval()
    total_nll, total, correct, correct10 = 0.0, 0, 0, 0
    inputs = [m[0].numpy() for m in masked]
    batches = padded_batches(inputs, max_tokens=max_tokens_per_batch, pad_token_id=vocabulary.pad_id)
    with tqdm(total=len(cells), desc="masked genes", unit="cell", disable=not progress, leave=False) as bar:
        for indices, input_ids, attention_mask in batches:
            labels = torch.full_like(input_ids, -100)
            for row, i in enumerate(indices):
                labels[row, : masked[i][1].numel()] = masked[i][1]
            input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
            logits = _forward_logits(model, input_ids, attention_mask, autocast_dtype)
            scored = labels != -100
            target, picked = labels[scored], logits[scored]
            total_nll += F.cross_entropy(picked, target, reduction="sum").item()
            correct += int((picked.argmax(-1) == target).sum())
            top10 = picked.topk(min(10, picked.shape[-1]), dim=-1).indices
            correct10 += int((top10 == target[:, None]).any(-1).sum())
            total += int(target.numel())
            bar.update(len(indices))
    model.train(was_training)
    if total == 0:
        raise ValueError(f"no gene was masked in {len(cells)} cells at mlm_probability={mlm_probability}")
    nll = total_nll / total
    return {
        "accuracy": correct / total,
        "top10_accuracy": correct10 / total,
        "nll_per_token": nll,
        "perplexity": math.exp(nll),
        "num_masked_tokens": total,
        "num_cells": len(cells),
        "num_truncated": num_truncated,
        "mlm_probability": mlm_probability,
        "masking_seed": seed,
    }


def _split(num: int, labels: Sequence[str], seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split, per class (each class with >= 2 cells gives at least one test cell)."""
    digest = hashlib.blake2b(f"probe:{seed}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    train, test = [], []
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for members in by_class.values():
        members = list(rng.permutation(members))
        num_test = int(round(len(members) * test_fraction)) if len(members) > 1 else 0
        num_test = max(num_test, 1) if len(members) > 1 else 0
        test += members[:num_test]
        train += members[num_test:]
    return np.asarray(sorted(train)), np.asarray(sorted(test))


def cell_type_probe(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    max_iter: int = 100,
    l2: float = 1e-3,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of a linear probe predicting ``labels`` from ``features`` ``[N, D]`` (see the module
    docstring), on a seeded per-class split; ``majority_accuracy`` is the most frequent training class's."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} embeddings but {len(labels)} labels")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"the cell-type probe needs at least two labels; got {classes}")
    train, test = _split(len(labels), labels, seed, test_fraction)
    if len(test) == 0 or len(train) == 0:
        raise ValueError("too few labelled cells for a train / test split (each class needs >= 2 cells)")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels])
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")
    x_train, y_train = x[train], y[train]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ w.T + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    predicted = (x[test] @ w.detach().T + b.detach()).argmax(-1)
    truth = y[test]
    f1s = []
    for c in range(len(classes)):
        tp = int(((predicted == c) & (truth == c)).sum())
        fp = int(((predicted == c) & (truth != c)).sum())
        fn = int(((predicted != c) & (truth == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    majority = int(torch.bincount(y_train, minlength=len(classes)).argmax())
    return {
        "accuracy": float((predicted == truth).float().mean()),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "majority_accuracy": float((truth == majority).float().mean()),
        "num_classes": len(classes),
        "num_train": int(len(train)),
        "num_test": int(len(test)),
    }


def evaluate_single_cell_models(
    models: Mapping[str, torch.nn.Module],
    tokenizer: Any,
    data: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    gene_medians: str | os.PathLike[str] | None = None,
    max_cells: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Masked-gene metrics of every model in ``models`` (name → masked-LM model, e.g. ``trained`` and
    ``random_init``) on the cells of ``data``, and the cell-type probe when ``label_column`` is given."""
    vocabulary = vocabulary_of_tokenizer(tokenizer)
    ids, cells, labels, info = read_labelled_cells(data, vocabulary, label_column=label_column,
                                                   gene_medians=gene_medians, limit=max_cells)  # fmt: skip
    device = resolve_device(device)
    masked = {
        name: masked_gene_metrics(model, cells, tokenizer, seed=seed, device=device, autocast_dtype=autocast_dtype,
                                  progress=progress)  # fmt: skip
        for name, model in models.items()
    }
    probe = None
    if labels is not None:
        probe = {}
        for name, model in models.items():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                embeddings = embed_tokenized_cells(model, vocabulary, ids, cells, pooling="mean", device=device,
                                                   progress=progress)  # fmt: skip
            probe[name] = cell_type_probe(embeddings.pooled, labels, seed=seed)
    return {
        "masked_gene": masked,
        "cell_type_probe": probe,
        "label_column": label_column,
        "num_cells": len(cells),
        "data": str(Path(data)),
        **info,
    }


__all__ = [
    "cell_type_probe",
    "evaluate_single_cell_models",
    "masked_gene_metrics",
    "read_labelled_cells",
]
