"""Does the model know protein structure? A linear probe for 8- and 3-state secondary structure on frozen embeddings.

The probe is deliberately weak (one linear layer, multinomial logistic regression fitted by L-BFGS on standardised
per-residue features): whatever it reads out must already be linearly present in the embeddings, so the gain of a
trained model over a randomly initialised one of the same shape measures what pretraining learned. Two reference
points are reported next to it: the majority class, and the same probe on a one-hot encoding of the residue itself
(what the amino-acid letter alone predicts). Proteins are split into probe-train and probe-test by a seeded hash of
the sequence, so a protein duplicated in the data never sits on both sides. Q8 is the accuracy over the 8 DSSP
states, Q3 over the 3 classes (helix H/G/I, strand E/B, coil T/S/~); both are per-residue accuracies on the test
proteins. Long proteins are embedded in consecutive chunks of the model's context (see batching.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bioscale.eval.scoring_inputs import chunk_sequence, encode, padded_batches, resolve_device, special_token_count
from bioscale.data.dssp import DSSP3_LABELS, DSSP8_LABELS, DSSP8_TO_DSSP3_INDEX
from bioscale.data.splits import held_out_fraction_point, is_held_out
from bioscale.models import spec_for_model
from bioscale.use.finetune import encode_token_labels, finetune, load_finetune_config
from bioscale.use.loading import LoadedModel

logger = logging.getLogger(__name__)

SEQUENCE_COLUMN = "Sequence"
LABEL_COLUMN = "Secondary_structure"


def dssp_labels() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The 8 and 3 class names, from the fine-tuning module (one label convention across bioscale)."""

    return tuple(DSSP8_LABELS), tuple(DSSP3_LABELS)


def encode_dssp8(labels: str, where: str) -> np.ndarray:
    """8-class ids of one DSSP string (coil aliases such as ``-``/``C`` accepted); ``ValueError`` names a bad label."""

    return np.asarray(encode_token_labels("dssp8", DSSP8_LABELS, labels, where), dtype=np.int64)


@dataclass
class SecondaryStructureData:
    """Proteins with per-residue DSSP labels, split into probe-train and probe-test by sequence."""

    train: list[tuple[str, np.ndarray]]  # (sequence, 8-class id per residue)
    test: list[tuple[str, np.ndarray]]
    num_skipped: int = 0  # records whose label string does not match the sequence length, or with unknown labels


def load_secondary_structure(
    path: str | Path,
    *,
    max_proteins: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SecondaryStructureData:
    """Read a Porter6-style parquet (``Sequence``, ``Secondary_structure``) and split it by sequence.

    ``max_proteins`` keeps a seeded random subset (chosen by the same kind of hash, so it is nested: a larger subset
    contains a smaller one). Records whose labels do not line up with the sequence are skipped and counted.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"secondary-structure data {path} not found")
    schema = pq.read_schema(path)
    for column in (SEQUENCE_COLUMN, LABEL_COLUMN):
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
    table = pq.read_table(path, columns=[SEQUENCE_COLUMN, LABEL_COLUMN]).to_pydict()
    records, skipped = [], 0
    for row, (seq, labels) in enumerate(zip(table[SEQUENCE_COLUMN], table[LABEL_COLUMN], strict=True)):
        if not seq or not labels or len(seq) != len(labels):
            skipped += 1
            continue
        try:
            records.append((seq.upper(), encode_dssp8(labels, f"{path} row {row}")))
        except ValueError as err:
            logger.debug("skipping: %s", err)
            skipped += 1
    if not records:
        raise ValueError(f"{path}: no usable record (each needs a sequence and a label string of the same length)")
    if max_proteins is not None and max_proteins < len(records):
        # Subset key uses a different seed stream than the split, so the subset is not biased towards one side.
        records.sort(key=lambda r: held_out_fraction_point(r[0], seed=seed + 1_000_003))
        records = records[:max_proteins]
    train = [r for r in records if not is_held_out(r[0], seed=seed, fraction=test_fraction)]
    test = [r for r in records if is_held_out(r[0], seed=seed, fraction=test_fraction)]
    if not train or not test:
        raise ValueError(
            f"{path}: the split by sequence left {len(train)} train and {len(test)} test proteins; use more proteins"
        )
    return SecondaryStructureData(train=train, test=test, num_skipped=skipped)


@torch.no_grad()
def residue_embeddings(
    model: torch.nn.Module,
    sequences: Sequence[str],
    tokenizer,
    *,
    max_length: int = 1024,
    max_tokens_per_batch: int = 16_384,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Per-residue embeddings ``[len(seq), hidden]`` (float32, CPU) from the model's last hidden state.

    ``model`` is a base model (``last_hidden_state``) or a model with a head, whose ``base_model`` is used. Special
    tokens are dropped; chunks of long sequences are concatenated back in order.
    """
    device = resolve_device(device)
    base = getattr(model, "base_model", model)
    num_special = special_token_count(tokenizer)
    max_residues = max_length - num_special
    pieces: list[tuple[int, str]] = [
        (i, piece) for i, seq in enumerate(sequences) for piece in chunk_sequence(seq, max_residues)
    ]
    token_lists = encode(tokenizer, [p for _, p in pieces])
    prefix = _prefix_len(tokenizer)
    outputs: list[torch.Tensor | None] = [None] * len(pieces)
    was_training = base.training
    base.eval()
    batches = padded_batches(token_lists, max_tokens=max_tokens_per_batch, pad_token_id=tokenizer.pad_token_id)
    with tqdm(total=len(pieces), desc="embed", unit="seq", disable=not progress, leave=False) as bar:
        for indices, input_ids, attention_mask in batches:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            else:
                hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            hidden = hidden.float().cpu()
            for row, i in enumerate(indices):
                num_residues = len(pieces[i][1])
                outputs[i] = hidden[row, prefix : prefix + num_residues]
            bar.update(len(indices))
    base.train(was_training)
    per_sequence: list[list[torch.Tensor]] = [[] for _ in sequences]
    for (i, _), emb in zip(pieces, outputs, strict=True):
        assert emb is not None
        per_sequence[i].append(emb)
    return [torch.cat(parts) for parts in per_sequence]


def _prefix_len(tokenizer) -> int:
    """Special tokens before the residues (1 for ``<cls>``)."""
    ids = tokenizer("A", add_special_tokens=True)["input_ids"]
    core = tokenizer("A", add_special_tokens=False)["input_ids"]
    return ids.index(core[0])


def one_hot_residue_features(sequences: Sequence[str], tokenizer) -> list[torch.Tensor]:
    """The "residue identity only" baseline: one-hot token ids per residue."""
    prefix, num_special = _prefix_len(tokenizer), special_token_count(tokenizer)
    vocab = len(tokenizer)
    features = []
    for ids in encode(tokenizer, list(sequences)):
        body = torch.from_numpy(ids[prefix : len(ids) - (num_special - prefix)])
        features.append(F.one_hot(body, vocab).float())
    return features


def label_tensors(labels: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """8-class and 3-class ids of every residue, concatenated over proteins."""

    y8 = np.concatenate(list(labels))
    return torch.from_numpy(y8), torch.from_numpy(np.asarray(DSSP8_TO_DSSP3_INDEX)[y8])


@dataclass
class LinearProbe:
    """A fitted probe: standardisation statistics and one linear layer per label set."""

    mean: torch.Tensor
    std: torch.Tensor
    weight8: torch.Tensor
    bias8: torch.Tensor
    weight3: torch.Tensor
    bias3: torch.Tensor

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (features.to(self.mean.device) - self.mean) / self.std
        return (x @ self.weight8.T + self.bias8).argmax(-1), (x @ self.weight3.T + self.bias3).argmax(-1)


def fit_linear_probe(
    features: torch.Tensor,
    y8: torch.Tensor,
    y3: torch.Tensor,
    *,
    num_classes8: int,
    num_classes3: int,
    max_iter: int = 200,
    l2: float = 1e-4,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """Multinomial logistic regression for both label sets, full batch, L-BFGS (deterministic for fixed inputs).

    The two heads share nothing, so fitting them jointly (one loss, summed) is the same as fitting each alone.
    Features are standardised with the training mean and standard deviation, which puts a random-init model's
    small-scale embeddings on the same footing as a trained one's.
    """
    device = resolve_device(device)
    x = features.to(device=device, dtype=torch.float32)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y8, y3 = y8.to(device), y3.to(device)
    dim = x.shape[1]
    w = torch.zeros(num_classes8 + num_classes3, dim, device=device, requires_grad=True)
    b = torch.zeros(num_classes8 + num_classes3, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ w.T + b
        loss = F.cross_entropy(logits[:, :num_classes8], y8) + F.cross_entropy(logits[:, num_classes8:], y3)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = w.detach(), b.detach()
    return LinearProbe(
        mean=mean, std=std, weight8=w[:num_classes8], bias8=b[:num_classes8],
        weight3=w[num_classes8:], bias3=b[num_classes8:],
    )


def probe_accuracy(
    train_features: Sequence[torch.Tensor],
    test_features: Sequence[torch.Tensor],
    data: SecondaryStructureData,
    *,
    max_iter: int = 200,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Fit the probe on the train proteins' features and return ``q8`` and ``q3`` on the test proteins."""
    labels8, labels3 = dssp_labels()
    train_y8, train_y3 = label_tensors([labels for _, labels in data.train])
    test_y8, test_y3 = label_tensors([labels for _, labels in data.test])
    train_x, test_x = torch.cat(list(train_features)), torch.cat(list(test_features))
    assert train_x.shape[0] == train_y8.shape[0] and test_x.shape[0] == test_y8.shape[0], "one feature row per residue"
    probe = fit_linear_probe(
        train_x, train_y8, train_y3, num_classes8=len(labels8), num_classes3=len(labels3), max_iter=max_iter,
        device=device,
    )
    pred8, pred3 = probe.predict(test_x)
    return {
        "q8": (pred8.cpu() == test_y8).float().mean().item(),
        "q3": (pred3.cpu() == test_y3).float().mean().item(),
    }


def majority_baseline(data: SecondaryStructureData) -> dict[str, float]:
    """Accuracy of always predicting the most frequent train class (the floor any probe must beat)."""
    train_y8, train_y3 = label_tensors([labels for _, labels in data.train])
    test_y8, test_y3 = label_tensors([labels for _, labels in data.test])
    return {
        "q8": (test_y8 == torch.bincount(train_y8).argmax()).float().mean().item(),
        "q3": (test_y3 == torch.bincount(train_y3).argmax()).float().mean().item(),
    }


def secondary_structure_probe(
    models: dict[str, torch.nn.Module],
    tokenizer,
    data: SecondaryStructureData,
    *,
    max_length: int = 1024,
    max_iter: int = 200,
    max_tokens_per_batch: int = 16_384,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Q3/Q8 of the linear probe on each named model's embeddings, plus the majority and residue-identity baselines.

    Returns ``{"<name>": {"q3", "q8"}, ..., "majority": {...}, "residue_identity": {...}, "num_train_proteins",
    "num_test_proteins", "num_train_residues", "num_test_residues"}``.
    """
    train_seqs = [seq for seq, _ in data.train]
    test_seqs = [seq for seq, _ in data.test]
    result: dict[str, Any] = {}
    for name, model in models.items():
        logger.info("secondary-structure probe: embedding with the %s model", name)
        embed_kwargs = dict(
            max_length=max_length, max_tokens_per_batch=max_tokens_per_batch, device=device,
            autocast_dtype=autocast_dtype, progress=progress,
        )
        train_x = residue_embeddings(model, train_seqs, tokenizer, **embed_kwargs)
        test_x = residue_embeddings(model, test_seqs, tokenizer, **embed_kwargs)
        result[name] = probe_accuracy(train_x, test_x, data, max_iter=max_iter, device=device)
    result["residue_identity"] = probe_accuracy(
        one_hot_residue_features(train_seqs, tokenizer), one_hot_residue_features(test_seqs, tokenizer), data,
        max_iter=max_iter, device=device,
    )
    result["majority"] = majority_baseline(data)
    result.update(
        num_train_proteins=len(data.train),
        num_test_proteins=len(data.test),
        num_train_residues=sum(len(s) for s in train_seqs),
        num_test_residues=sum(len(s) for s in test_seqs),
        num_skipped_records=data.num_skipped,
    )
    return result


def secondary_structure_finetune(
    models: dict[str, torch.nn.Module],
    tokenizer,
    data: SecondaryStructureData,
    *,
    lora: bool = True,
    max_steps: int = 200,
    lr: float | None = None,
    max_length: int = 1024,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Q3/Q8 after fine-tuning a per-residue head on each named ESM-2 model (LoRA adapters, or all weights).

    The option to the linear probe that the issue asks for: the same probe-train/probe-test proteins, trained with
    :func:`bioscale.use.finetune.finetune` (``lr`` default: 1e-3 with LoRA, 1e-4 for a full fine-tune). Each model's
    encoder is copied into a fresh ``Esm2ForTokenClassification``, so the models passed in are left untouched.
    Returns ``{"<name>": {"q3", "q8", "loss"}, ..., "method", "max_steps", "num_train_proteins", "num_test_proteins"}``.
    """
    import copy
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq


    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not data.train or not data.test:
        raise ValueError("secondary-structure fine-tuning needs proteins on both sides of the split")
    method = "lora" if lora else "full"
    lr = (1e-3 if lora else 1e-4) if lr is None else lr
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bioscale-ss-") as tmp:
        files = {}
        for split, rows in (("train", data.train), ("test", data.test)):
            files[split] = Path(tmp) / f"{split}.parquet"
            labels = ["".join(DSSP8_LABELS[int(i)] for i in ids) for _, ids in rows]
            pq.write_table(pa.table({"Sequence": [s for s, _ in rows], "Secondary_structure": labels}), files[split])
        for name, model in models.items():
            spec = spec_for_model(model)
            if spec.modality != "protein" or "token_classification" not in spec.tasks:
                raise ValueError(
                    f"secondary-structure fine-tuning needs a protein model with a token-classification head, got "
                    f"{type(model).__name__} ({spec.name}, {spec.modality})"
                )
            config = copy.deepcopy(model.config)
            config.num_labels = len(DSSP8_LABELS)
            config.id2label = dict(enumerate(DSSP8_LABELS))
            config.label2id = {label: i for i, label in enumerate(DSSP8_LABELS)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = spec.model_class("token_classification")(config)
            encoder = getattr(model, model.base_model_prefix, model)
            getattr(head, head.base_model_prefix).load_state_dict(encoder.state_dict())
            settings = load_finetune_config("token_classification", [
                "model=in-memory", f"data={files['train']}", f"val_data={files['test']}",
                f"output_dir={Path(tmp) / name}", f"max_steps={max_steps}", f"lr={lr}", f"seed={seed}",
                f"max_length={max_length}", f"max_tokens_per_batch={max(16_384, max_length)}",
                f"eval_every={max_steps}", f"warmup_steps={min(50, max(1, max_steps // 10))}",
                f"lora.enabled={str(lora).lower()}", *([f"device={device}"] if device is not None else []),
            ])  # fmt: skip
            logger.info("secondary-structure %s fine-tune of the %s model: %d steps", method, name, max_steps)
            loaded = LoadedModel(model=head, tokenizer=tokenizer, family=spec.name, source=name)
            metrics = finetune(settings, loaded=loaded, progress=False).metrics
            result[name] = {"q3": float(metrics["q3"]), "q8": float(metrics["q8"]), "loss": float(metrics["loss"])}
    result.update(
        method=method, max_steps=max_steps, lr=lr, num_train_proteins=len(data.train), num_test_proteins=len(data.test)
    )
    return result
