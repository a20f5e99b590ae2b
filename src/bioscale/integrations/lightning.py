"""bioscale models and data under PyTorch Lightning: a ``LightningModule``, a ``LightningDataModule`` and an FSDP
strategy for them.

- :class:`BioscaleLightningModule` wraps any bioscale model (built from a registry name and size, or loaded from a
  checkpoint directory) for pre-training or fine-tuning: the forward is the model's own (padded or packed batches),
  the loss of a step is the sum of its token losses over the label tokens of that micro-batch *on every rank* (what
  torchtitan and ``bioscale train`` normalise by: masked-LM batches hold different numbers of labels), AdamW with
  linear warmup and cosine decay, and ``save_pretrained`` of the trained model at the end of ``fit`` (a directory
  ``AutoModel*.from_pretrained`` loads). Lightning checkpoints hold the model's own state dict under ``model.`` and
  the hyperparameters to rebuild it, so ``load_from_checkpoint`` and ``fit(ckpt_path=...)`` round-trip.
- :class:`BioscaleDataModule` serves bioscale's resumable loader (``bioscale.data.build_dataloader``: sources, input
  policy, masking, packing) for the rank Lightning assigns, so Lightning never re-shards it; its ``state_dict``
  holds every rank's loader position, and a resumed run continues each rank's stream exactly.
- :func:`fsdp_strategy`: Lightning's ``FSDPStrategy`` wrapping each transformer block (the model's
  ``_no_split_modules``), full state dicts for checkpoints and ``save_pretrained``.

Lightning is an optional extra (``pip install 'bioscale[lightning]'``); nothing else in bioscale imports this module.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from bioscale.data import DataConfig, build_dataloader, get_tokenizer
from bioscale.models import build_config, build_model, get_model_spec
from bioscale.models.registry import AUTO_CLASS_FOR_TASK

try:
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "bioscale.integrations.lightning needs PyTorch Lightning, an optional extra: "
        f"pip install 'bioscale[lightning]' ({exc})"
    ) from exc


class BioscaleLightningModule(L.LightningModule):
    """A bioscale model as a ``LightningModule`` (see the module docstring).

    Args:
        model_name, size, task, config_overrides: the registry entry to build (``build_config(model_name, size,
            **config_overrides)``; ``task`` defaults to the family's pre-training task).
        pretrained: a checkpoint directory to start from instead (bioscale or stock ``transformers`` format that
            ``AutoModel*.from_pretrained`` reads for the task).
        learning_rate, weight_decay, warmup_steps, max_steps, min_lr_ratio: AdamW and the warmup-cosine schedule
            (``max_steps`` defaults to the ``Trainer``'s).
        save_pretrained_dir: where ``on_fit_end`` writes ``save_pretrained`` (``None``: nothing written).
    """

    def __init__(
        self,
        model_name: str = "codonfm",
        size: str = "debug",
        *,
        task: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        save_pretrained_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = self._build()

    def _build(self) -> PreTrainedModel:
        spec = get_model_spec(self.hparams.model_name)
        task = self.hparams.task or spec.default_task
        if self.hparams.pretrained is not None:
            return spec.model_class(task).from_pretrained(self.hparams.pretrained)
        config = build_config(self.hparams.model_name, self.hparams.size, **dict(self.hparams.config_overrides or {}))
        return build_model(config, task=task, device="cpu")

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # Sum over this micro-batch's label tokens, divided by their count on every rank and multiplied by the world
        # size (data parallelism averages gradients over ranks): each label token weighs the same wherever it is.
        out = self.model(**batch, loss_reduction="sum")
        count = out.num_label_tokens.detach().float()
        total = self.trainer.strategy.reduce(count, reduce_op="sum")
        return out.loss * self.trainer.world_size / total.clamp(min=1), total

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, tokens = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/label_tokens", tokens, reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=1)
        return loss

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.learning_rate,
        )
        total = self.hparams.max_steps or max(1, self.trainer.max_steps)
        warmup, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_end(self) -> None:
        """``save_pretrained`` of the trained model (a full state dict gathered under FSDP) into
        ``save_pretrained_dir``, on global rank 0."""
        directory = self.hparams.save_pretrained_dir
        if directory is None:
            return
        state = self.trainer.strategy.lightning_module_state_dict()  # every rank takes part (FSDP gathers)
        if self.trainer.is_global_zero:
            own = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
            self.model.save_pretrained(directory, state_dict=own)
        self.trainer.strategy.barrier("bioscale_save_pretrained")


class BioscaleDataModule(L.LightningDataModule):
    """bioscale's loader (``bioscale.data.build_dataloader``) for the rank Lightning assigns.

    Args:
        train: the training data config (a ``DataConfig`` or its dict: source, tokenizer, objective, packing...).
        val: a config for validation batches (``None``: no validation). Both loaders iterate forever, as bioscale's
            do: bound them with the ``Trainer``'s ``max_steps`` and ``limit_val_batches``.
        tokenizer: a bioscale tokenizer name or instance (default: ``train.tokenizer``'s).
    """

    def __init__(
        self,
        train: DataConfig | Mapping[str, Any],
        val: DataConfig | Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.train_config = train if isinstance(train, DataConfig) else DataConfig.from_dict(train)
        self.val_config = val if val is None or isinstance(val, DataConfig) else DataConfig.from_dict(val)
        kind = tokenizer if isinstance(tokenizer, str) else self.train_config.tokenizer
        self.tokenizer = get_tokenizer(kind) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self._train_stream: _RankStream | None = None
        self._consumed_state: Any = None
        self._pending_state: list[Any] | None = None

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> Iterable[Any]:
        rank, world_size = self._rank()
        loader = build_dataloader(self.train_config, self.tokenizer, rank=rank, world_size=world_size)
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state[rank])
            self._pending_state = None
        self._consumed_state = loader.state_dict()
        self._train_stream = _RankStream(loader)
        return self._train_stream

    def val_dataloader(self) -> Iterable[Any]:
        if self.val_config is None:
            return []
        rank, world_size = self._rank()
        return _RankStream(build_dataloader(self.val_config, self.tokenizer, rank=rank, world_size=world_size))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning fetches a batch ahead of the step that uses it: the position to resume from is the one after the
        # batch the step now receives, not after the last one read.
        stream = self._train_stream
        if self.trainer is not None and self.trainer.training and stream is not None and stream.states:
            self._consumed_state = stream.states.popleft()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's training-loader position after the last batch a step used (gathered: Lightning writes the
        checkpoint from rank 0)."""
        if self._train_stream is None:
            return {}
        state = self._consumed_state
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"loader_states": states}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # Applied when the loader is built (train_dataloader), for this rank; a different world size is refused there.
        states = state_dict.get("loader_states")
        rank, world_size = self._rank()
        if states is not None and len(states) != world_size:
            raise ValueError(
                f"the checkpoint holds data-loader states for {len(states)} ranks; this run has {world_size}"
            )
        self._pending_state = list(states) if states is not None else None


class _RankStream:
    """One rank's bioscale loader as a plain iterable. Lightning must not see it as a ``DataLoader`` (it would add a
    distributed sampler) nor as stateful (it saves one loader state, rank 0's, and loads it on every rank: bioscale's
    loader refuses another rank's state). :class:`BioscaleDataModule` saves every rank's state itself, from
    ``states``: the loader's position after each batch read and not yet used by a step."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.states: deque[Any] = deque()

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.states.append(self.loader.state_dict())
            yield batch


def fsdp_strategy(model: PreTrainedModel | str, **kwargs: Any) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` for a bioscale model (an instance, or a registry name): each transformer block its
    own FSDP unit (the classes named in ``_no_split_modules``), full state dicts (checkpoints and ``save_pretrained``
    hold ordinary tensors). ``kwargs`` override, e.g. ``activation_checkpointing_policy``. GPUs only (NCCL)."""
    if isinstance(model, str):  # the debug size on meta, only to find the block classes
        model = build_model(build_config(model, "debug"), device="meta")
    names = set(model._no_split_modules or ())
    blocks = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not blocks:
        raise ValueError(f"{type(model).__name__} lists no block class in _no_split_modules that its modules use")
    return FSDPStrategy(**{"auto_wrap_policy": blocks, "state_dict_type": "full", **kwargs})


def load_pretrained(directory: str | Path, task: str = "base") -> PreTrainedModel:
    """The model a :class:`BioscaleLightningModule` wrote with ``save_pretrained``, through the ``transformers``
    Auto class of ``task`` (``"masked_lm"`` -> ``AutoModelForMaskedLM``, ...)."""
    return getattr(transformers, AUTO_CLASS_FOR_TASK[task]).from_pretrained(directory)
