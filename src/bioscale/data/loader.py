"""The resumable training loader: source → input policy → tokens → shuffle → padded or packed micro-batches.

``build_dataloader(cfg, tokenizer, rank=, world_size=)`` returns a :class:`BioscaleDataLoader` (a ``torchdata``
``StatefulDataLoader``) that iterates forever, epoch after epoch, over micro-batches that go straight into
``model(**batch)``. Each rank × worker is one *consumer* with its own deterministic stream:

* Every epoch the units of the source (files, row groups) are permuted from ``(seed, epoch)``, the same way on every
  consumer. With at least as many units as consumers, consumer ``c`` of ``N`` reads units ``c, c + N, …`` whole; with
  fewer (one big FASTA, one genome), every consumer reads everything and each training sequence (record, crop or
  window) goes to the consumer with the fewest tokens dealt so far (ties broken at random from ``(seed, epoch)``),
  see :class:`_TokenBalancedDealer`. A streaming HF dataset is split with
  ``datasets.distributed.split_dataset_by_node``. Either way no two consumers see the same training sequence in an
  epoch, and every one is seen exactly once.
* Sequences are shuffled in blocks of ``shuffle_buffer_size`` from ``(seed, epoch, consumer, block)``, then batched;
  MLM masking draws from ``(seed, epoch, consumer, batch)``. Nothing depends on wall-clock or process state.

So a consumer's position is fully described by ``(epoch, batches yielded in the epoch)``: that (plus the input
policy counts) is its whole state, a few integers. Resuming regenerates the epoch and skips the batches already
delivered — reading and tokenising but not masking or collating them, ~20 µs per record on one core, so at worst
about a minute late in a UniRef50 epoch (60M records) spread over 16 workers — and then yields exactly what an
uninterrupted run would have. The loader's own state records rank, world size, worker count and the config, and refuses (``ValueError``)
to resume under a different layout rather than silently repeat or skip data.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from bioscale.data.cds import CdsPolicy, CodonTokenEncoder, CodonWeightedMLMCollator, load_codon_weights
from bioscale.data.collators import CLMCollator, MLMCollator
from bioscale.data.config import DataConfig
from bioscale.data.image_config import ImageDataConfig
from bioscale.data.packing import check_pack_budget, collate_packed, pack_groups, pad_sequences
from bioscale.data.policy import InputPolicy, PolicyStats
from bioscale.data.singlecell import CellPolicy, GeneTokenEncoder, gene_token_ids, open_cell_source, vocabulary_of_tokenizer
from bioscale.data.sources import SequenceSource, open_source
from bioscale.data.tokenizers import CharTokenEncoder, canonical_token_ids, get_tokenizer, tokenizer_spec

_STATE_VERSION = 1
_DATASET_MARKER = "bioscale.SequenceDataset"
# Config keys that do not change which batches are produced, so they may differ on resume.
# num_workers is checked as part of the layout; dense_uniform_packs changes the trainer's layout, not the stream
_RESUME_INDEPENDENT_KEYS = frozenset({"pin_memory", "num_workers", "dense_uniform_packs"})
# Keys added after states were first saved: a saved config without one ran with this value (the old behaviour).
_ADDED_KEY_OLD_VALUES = {"packing_buffer_size": 0, "codon_weights": None, "cds_checks": "keep", "keep_case": False,
                         "uppercase_labels": False, "ignore_ambiguous_labels": False,
                         "image": ImageDataConfig().to_dict()}

# Domain tags keep the random streams independent although they share (seed, epoch, ...).
_UNIT_ORDER, _BLOCK_SHUFFLE, _CROP, _MASK, _DEAL = 0, 1, 2, 3, 4


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class _TokenBalancedDealer:
    """Deals a stream of training sequences, known in the same order to every consumer, out to ``num_consumers``.

    Each sequence goes to the consumer with the fewest tokens so far (greedy list scheduling), so any two consumers'
    totals differ by at most one sequence's length, whatever the pattern of lengths. Round robin by index does not
    have that bound: windowed records give a repeating pattern (a full window, then a short tail), and with an even
    number of consumers some of them receive only the tails (measured on 8 kb contigs with 8,190-nt windows: every
    other micro-batch 80–320 tokens). Dealing whole records instead would give one genome to a single consumer.
    Ties (every round, when lengths are equal) are broken by keys drawn from ``rng``, so the same windows are not
    grouped the same way every epoch. Every consumer runs its own dealer with the same ``rng`` and lengths, so
    they all agree on the owner of every sequence without communicating.
    """

    def __init__(self, num_consumers: int, rng: np.random.Generator) -> None:
        self._rng = rng
        keys = rng.random(num_consumers)
        self._heap = [(0, float(keys[c]), c) for c in range(num_consumers)]  # (tokens dealt, tie-break key, consumer)
        heapq.heapify(self._heap)

    def __call__(self, num_tokens: int) -> int:
        """The consumer that receives the next sequence, of ``num_tokens`` tokens."""
        load, _, consumer = self._heap[0]
        heapq.heapreplace(self._heap, (load + num_tokens, self._rng.random(), consumer))
        return consumer


class SequenceDataset(IterableDataset):
    """Infinite iterable of collated micro-batches for one rank; each worker process is its own consumer.

    Implements ``state_dict`` / ``load_state_dict`` (torchdata's ``Stateful``), which ``StatefulDataLoader``
    snapshots per worker after every batch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        source: SequenceSource,
        encoder: CharTokenEncoder | CodonTokenEncoder,
        collator: MLMCollator | CLMCollator,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.source = source
        self.encoder = encoder
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.max_residues = cfg.max_seq_length - encoder.num_special
        if self.max_residues < 1:
            raise ValueError(
                f"data.max_seq_length={cfg.max_seq_length} leaves no room for residues next to the tokenizer's "
                f"{encoder.num_special} special tokens"
            )
        # Position: the epoch being read and the batches of it already yielded; counts before this epoch.
        self._epoch = 0
        self._batches_in_epoch = 0
        self._stats_before_epoch = PolicyStats()
        # the running epoch's policy (its stats are this epoch's counts)
        self._policy: InputPolicy | CdsPolicy | None = None

    # ----------------------------------------------------------------------------------------------------------- state
    def _make_policy(self) -> InputPolicy | CdsPolicy:
        if tokenizer_spec(self.cfg.tokenizer).unit == "codon":  # coding sequences: lengths in codons
            return CdsPolicy(
                max_length=self.max_residues,
                crop=self.cfg.resolved_crop,
                window_stride=self.cfg.window_stride,
                unknown_residues=self.cfg.unknown_residues,
                cds_checks=self.cfg.cds_checks,
            )
        if tokenizer_spec(self.cfg.tokenizer).unit == "gene":  # tokenized cells: truncated to their top genes
            assert isinstance(self.encoder, GeneTokenEncoder)
            return CellPolicy(self.encoder.vocabulary, max_genes=self.max_residues)  # type: ignore[return-value]
        return InputPolicy(
            self.cfg.tokenizer,
            max_length=self.max_residues,
            crop=self.cfg.resolved_crop,
            window_stride=self.cfg.window_stride,
            unknown_residues=self.cfg.unknown_residues,
            keep_case=self.cfg.keep_case,
        )

    def policy_stats(self) -> PolicyStats:
        """Input-policy counts of this consumer so far (all epochs)."""
        stats = PolicyStats(**self._stats_before_epoch.as_dict())
        if self._policy is not None:
            stats.add(self._policy.stats)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": _DATASET_MARKER,
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "stats_before_epoch": self._stats_before_epoch.as_dict(),
            "stats": self.policy_stats().as_dict(),  # for reporting (get_policy_stats); not read back
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != _DATASET_MARKER or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a bioscale data state (version {_STATE_VERSION}): kind={state.get('kind')!r}, "
                f"version={state.get('version')!r}"
            )
        self._epoch = int(state["epoch"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._stats_before_epoch = PolicyStats.from_dict(state["stats_before_epoch"])
        self._policy = None

    # -------------------------------------------------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer = self.rank * num_workers + worker
        num_consumers = self.world_size * num_workers
        while True:
            epoch, skip = self._epoch, self._batches_in_epoch
            self._policy = policy = self._make_policy()
            batch_index = 0
            for batch_index, group in enumerate(self._epoch_groups(epoch, consumer, num_consumers, policy), 1):
                if batch_index <= skip:  # resuming: these were delivered before the checkpoint
                    continue
                self._batches_in_epoch = batch_index
                yield self._collate(group, _rng(self.cfg.seed, _MASK, epoch, consumer, batch_index))
            if batch_index == 0:
                raise ValueError(
                    f"data: rank {self.rank} worker {worker} received no training sequences in epoch {epoch} from "
                    f"{self.source.name}: too few records/windows for world_size*num_workers={num_consumers} "
                    f"consumers, or every record was skipped (input-policy counts: {policy.stats.as_dict()})"
                )
            if batch_index < skip:
                raise ValueError(
                    f"data: cannot resume: the checkpoint says {skip} batches of epoch {epoch} were delivered but "
                    f"the source now gives only {batch_index}: did {self.source.name} change?"
                )
            self._stats_before_epoch.add(policy.stats)
            self._policy = None
            self._epoch, self._batches_in_epoch = epoch + 1, 0

    def _records(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[tuple[str, str | None, bool]]:
        """This consumer's raw records of ``epoch`` as ``(id, sequence, owned)``; see ``_epoch_groups``."""
        if self.source.streaming:
            for record_id, seq in self.source.consumer_stream(consumer, num_consumers):
                yield record_id, seq, True
            return
        units = self.source.units()
        if self.cfg.shuffle:
            units = [units[i] for i in _rng(self.cfg.seed, _UNIT_ORDER, epoch).permutation(len(units))]
        if len(units) >= num_consumers:
            for unit in units[consumer::num_consumers]:
                for record_id, seq in self.source.read_unit(unit):
                    yield record_id, seq, True
        else:  # shared: everyone reads everything; records are counted by their owner only
            for index, (record_id, seq) in enumerate(itertools.chain.from_iterable(map(self.source.read_unit, units))):
                yield record_id, seq, index % num_consumers == consumer

    def _epoch_groups(
        self, epoch: int, consumer: int, num_consumers: int, policy: InputPolicy | CdsPolicy
    ) -> Iterator[list[np.ndarray]]:
        """The token sequences of each micro-batch of ``epoch`` for ``consumer``, deterministically."""
        cfg = self.cfg
        shared = not self.source.streaming and len(self.source.units()) < num_consumers
        shadow = self._make_policy()  # applies the policy to records another consumer owns, without counting
        crop_rng = _rng(cfg.seed, _CROP, epoch, consumer)
        where = f" in {self.source.name}"

        def sequences() -> Iterator[np.ndarray]:
            # Shared mode: every consumer sees every training sequence and keeps those dealt to it. Piece lengths
            # do not depend on the crop draws, so all consumers deal alike although their crop streams differ.
            deal = _TokenBalancedDealer(num_consumers, _rng(cfg.seed, _DEAL, epoch)) if shared else None
            num_special = self.encoder.num_special
            for record_id, seq, owned in self._records(epoch, consumer, num_consumers):
                for piece in (policy if owned else shadow)(record_id, seq, crop_rng, where=where):
                    if deal is None or deal(len(piece) + num_special) == consumer:
                        yield self.encoder.encode(piece)

        def shuffled(stream: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
            if not cfg.shuffle:
                yield from stream
                return
            for block_index in itertools.count():
                block = list(itertools.islice(stream, cfg.shuffle_buffer_size))
                if not block:
                    return
                order = _rng(cfg.seed, _BLOCK_SHUFFLE, epoch, consumer, block_index).permutation(len(block))
                yield from (block[i] for i in order)

        stream = shuffled(sequences())
        if cfg.use_sequence_packing:
            yield from pack_groups(stream, cfg.max_tokens_per_batch, split_overflow=cfg.split_overflow,
                                   buffer_size=cfg.packing_buffer_size)
        else:
            while group := list(itertools.islice(stream, cfg.micro_batch_size)):
                yield group

    def _collate(self, group: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor | int]:
        cfg = self.cfg
        pad_id = self.collator.pad_token_id
        if cfg.use_sequence_packing:
            batch = collate_packed(group, pad_to_multiple_of=cfg.pad_to_multiple_of, pad_token_id=pad_id)
        else:
            batch = pad_sequences(group, pad_token_id=pad_id, pad_to_multiple_of=cfg.pad_to_multiple_of)
        batch = self.collator.apply(batch, rng)
        label_counts = getattr(self.collator, "last_label_counts", None)
        if label_counts and self._policy is not None:  # CLM targets changed by the genomic options, counted
            self._policy.stats.add(label_counts)
        return batch


class BioscaleDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state also records the layout (rank, world size, workers) and the data
    config, and refuses to resume under a different one. ``state_dict()`` is a dict of plain python values
    (pickle it, e.g. ``torch.save``); save one per rank."""

    def __init__(self, dataset: SequenceDataset, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: noise in every run, nothing to act on
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            # A generator of its own: iter() draws the workers' base seed from it. From the global torch RNG that
            # draw would shift dropout's stream, and a resumed run calls iter() after its RNG state is restored, so
            # steps after a resume would differ from the uninterrupted run's (the data's randomness is keyed on
            # data.seed, not on this generator).
            kwargs.setdefault("generator", torch.Generator().manual_seed(0))
            super().__init__(dataset, batch_size=None, **kwargs)
        self._bioscale_meta = {
            "version": _STATE_VERSION,
            "rank": dataset.rank,
            "world_size": dataset.world_size,
            "num_workers": self.num_workers,
            "config": {k: v for k, v in dataset.cfg.to_dict().items() if k not in _RESUME_INDEPENDENT_KEYS},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"bioscale": dict(self._bioscale_meta), "loader": super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("bioscale") if isinstance(state_dict, Mapping) else None
        if meta is None or "loader" not in state_dict:
            raise ValueError("not a bioscale data-loader state: expected keys 'bioscale' and 'loader'")
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(f"data-loader state version {meta.get('version')!r}; this bioscale reads {_STATE_VERSION}")
        mine = self._bioscale_meta
        layout = ("rank", "world_size", "num_workers")
        if any(meta[k] != mine[k] for k in layout):
            saved = ", ".join(f"{k}={meta[k]}" for k in layout)
            now = ", ".join(f"{k}={mine[k]}" for k in layout)
            raise ValueError(
                f"cannot resume the data loader: its state was saved with {saved}, this run has {now}. Records are "
                f"dealt out per (rank, worker), so a different layout would silently repeat or skip data. Resume "
                f"with the saved layout, or start the data stream afresh (don't load the data-loader state)."
            )
        saved_config = {**_ADDED_KEY_OLD_VALUES, **meta["config"]}
        changed = sorted(k for k in set(saved_config) | set(mine["config"])
                         if saved_config.get(k) != mine["config"].get(k))
        if changed:
            diff = ", ".join(f"{k}: {saved_config.get(k)!r} -> {mine['config'].get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume the data loader: data config changed since the checkpoint ({diff})")
        super().load_state_dict(state_dict["loader"])


def _dataset_states(state: Any) -> Iterator[Mapping[str, Any]]:
    """Every SequenceDataset state inside a (nested) loader state, whatever torchdata's layout of it."""
    if isinstance(state, Mapping):
        if state.get("kind") == _DATASET_MARKER:
            yield state
            return
        for value in state.values():
            yield from _dataset_states(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _dataset_states(value)


def get_policy_stats(loader: StatefulDataLoader | Mapping[str, Any]) -> dict[str, int]:
    """Input-policy counts of this rank (summed over its workers) up to the last batch the loader delivered.

    Works with any ``num_workers`` (the counts travel in the workers' loader state) and across resumes. Accepts the
    loader or a ``state_dict()`` of it. Sum the dicts over ranks for global counts. "Read" counts may run ahead of
    the delivered batches by one shuffle block (records read into the block but not yet batched).
    """
    if isinstance(loader, StatefulDataLoader) and hasattr(loader, "policy_stats"):
        return loader.policy_stats()  # images count their own policy (bioscale.data.images.ImageDataLoader)
    state = loader.state_dict() if isinstance(loader, StatefulDataLoader) else loader
    total = PolicyStats()
    for dataset_state in _dataset_states(state):
        total.add(dataset_state["stats"])
    return total.as_dict()


def _check_tokenizer_kind(tokenizer: PreTrainedTokenizerBase, kind: str) -> None:
    """``ValueError`` unless ``tokenizer`` looks like the bioscale tokenizer named ``kind``: it has the token that one
    puts before a sequence (``<cls>`` for ESM-2's, ``<bos>`` for the others) and a token for every character the input
    policy keeps, read from the named tokenizer itself."""
    vocab = tokenizer.get_vocab()
    reference = get_tokenizer(kind)
    start = reference.convert_ids_to_tokens(int(CharTokenEncoder(reference).prefix[0]))
    if start not in vocab:
        raise ValueError(f"data.tokenizer={kind!r} but the tokenizer given has no {start} token")
    missing = [c for c in tokenizer_spec(kind).policy_alphabet if c not in vocab]
    if missing:
        raise ValueError(f"data.tokenizer={kind!r} but the tokenizer given has no token for {missing}")


def build_dataloader(
    cfg: DataConfig | Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> BioscaleDataLoader:
    """The infinite, resumable loader of micro-batches for ``rank`` of ``world_size`` (see the module docstring).

    ``tokenizer`` must be character-level (``protein_tokenizer()`` / ``nucleotide_tokenizer()`` /
    ``amplify_tokenizer()`` or one saved from them) or ``codon_tokenizer()`` (coding sequences, read through
    ``bioscale.data.cds``); its kind must match ``cfg.tokenizer``. Source problems (missing
    file or column, unknown type) raise here, not in a worker.
    """
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig.from_dict(cfg)
    cfg.validate()
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"build_dataloader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if cfg.use_sequence_packing:
        check_pack_budget(cfg.max_tokens_per_batch, cfg.pad_to_multiple_of, key="data.max_tokens_per_batch")
    if tokenizer_spec(cfg.tokenizer).unit == "gene":  # tokenized cells (Geneformer): bioscale.data.singlecell
        return _build_cell_dataloader(cfg, tokenizer, rank=rank, world_size=world_size)
    encoder: CharTokenEncoder | CodonTokenEncoder
    if tokenizer_spec(cfg.tokenizer).unit == "codon":
        encoder = CodonTokenEncoder(tokenizer)  # ValueError unless it is CodonFM's 69-token vocabulary
    else:
        encoder = CharTokenEncoder(tokenizer)
        _check_tokenizer_kind(tokenizer, cfg.tokenizer)
    if cfg.objective == "mlm" and cfg.codon_weights is not None:
        collator: MLMCollator | CLMCollator = CodonWeightedMLMCollator(
            tokenizer, cfg.mlm_probability, codon_weights=load_codon_weights(cfg.codon_weights),
            random_token_ids=canonical_token_ids(tokenizer, cfg.tokenizer),
        )  # fmt: skip
    elif cfg.objective == "mlm":
        collator = MLMCollator(
            tokenizer, cfg.mlm_probability, random_token_ids=canonical_token_ids(tokenizer, cfg.tokenizer)
        )
    else:
        collator = CLMCollator(
            tokenizer, uppercase_labels=cfg.uppercase_labels, ignore_ambiguous_labels=cfg.ignore_ambiguous_labels
        )
    source = open_source(
        cfg.source,
        sequence_column=cfg.sequence_column,
        id_column=cfg.id_column,
        hf_split=cfg.hf_split,
        hf_streaming=cfg.hf_streaming,
    )
    dataset = SequenceDataset(cfg, source, encoder, collator, rank=rank, world_size=world_size)
    return BioscaleDataLoader(dataset, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)


def _build_cell_dataloader(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int, world_size: int
) -> BioscaleDataLoader:
    """:func:`build_dataloader` for tokenized cells: the same dataset, state and batches, with the gene vocabulary's
    encoder (V2 ``<cls> … <eos>``), :class:`~bioscale.data.singlecell.CellPolicy` (top genes kept, counted) and MLM
    replacements drawn from the genes only."""
    vocabulary = vocabulary_of_tokenizer(tokenizer)
    expected = "v2" if cfg.tokenizer.endswith("_v2") else "v1"
    if cfg.objective != "mlm" or vocabulary.convention != expected:
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} trains masked LM (data.objective=mlm) with a {expected} gene vocabulary; "
            f"got objective={cfg.objective!r} and a {vocabulary.convention} tokenizer"
        )
    if cfg.crop != "auto":
        raise ValueError(f"data.crop={cfg.crop!r}: cells are truncated to their top-ranked genes; leave data.crop=auto")
    collator = MLMCollator(tokenizer, cfg.mlm_probability, random_token_ids=gene_token_ids(tokenizer))
    source = open_cell_source(cfg.source, column=cfg.sequence_column, id_column=cfg.id_column,
                              vocab_size=len(vocabulary))  # fmt: skip
    dataset = SequenceDataset(cfg, source, GeneTokenEncoder(vocabulary), collator, rank=rank, world_size=world_size)
    return BioscaleDataLoader(dataset, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)


__all__ = ["BioscaleDataLoader", "SequenceDataset", "build_dataloader", "get_policy_stats"]
