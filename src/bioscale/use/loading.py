"""Loading a model for use: a bioscale checkpoint, a plain ``transformers`` checkpoint of a type a bioscale family
converts (ESM, Llama, ...), a checkpoint in a format a family reads itself (chandar-lab's AMPLIFY), or a Hub id.

Every ``bioscale embed|finetune|generate|export`` command takes a MODEL argument and goes through
:func:`load_model`, so they accept the same things and fail the same way: a local directory written by
``save_pretrained`` (bioscale's ``final_model`` or a plain ``transformers`` ``EsmForMaskedLM`` / ``LlamaForCausalLM``
such as ``final_model_hf``), or a Hub id (``facebook/esm2_t33_650M_UR50D``). Plain ``transformers`` checkpoints are
converted exactly with :func:`bioscale.models.from_hf`; a head the checkpoint does not hold (a new classifier for
fine-tuning) is initialised fresh on top of the loaded encoder. The tokenizer saved with the model is used when there
is one, else the family's bioscale tokenizer (ESM-2's alphabet, or the nucleotide one), whose ids the model must fit.

Foreign checkpoints. Some published checkpoints are Hugging Face *remote code* (``chandar-lab/AMPLIFY_*``:
``config.json`` with ``model_type: "AMPLIFY"`` and an ``auto_map`` to ``amplify.py``), which ``AutoConfig`` cannot read
without ``trust_remote_code``. When a ``config.json``'s ``model_type`` is not one stock ``transformers`` (or bioscale)
knows and a family lists it in ``hf_model_types`` with a ``ModelSpec.foreign_checkpoint``, that family reads the config
dict and the tensors; this module reads the files: ``config.json`` and ``model.safetensors`` (or its sharded index,
or the one ``*.safetensors`` file of a checkpoint that names its weights after itself), locally or with
``huggingface_hub.hf_hub_download`` for a Hub id. A ``config.json`` with no ``model_type`` at all (CodonFM's EnCodon
checkpoints hold their training wrapper's arguments) is matched by ``ModelSpec.foreign_config_match``. Code in the
checkpoint is never run and pickled weights (``pytorch_model.bin``, ``*.ckpt``) are refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from bioscale.data.images import image_processor_for, processor_image_size
from bioscale.data.tokenizers import TOKENIZERS, get_tokenizer, record_affixes, tokenizer_kind
from bioscale.models import ModelSpec, from_hf, get_model_spec, is_bioscale_config, list_models, spec_for_any_config

logger = logging.getLogger(__name__)

# A Hub id names its owner (``facebook/esm2_t6_8M_UR50D``): a bare name is taken for a missing local directory, so a
# typo fails at once instead of after the Hub client's network retries.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    """A model ready for use and the tokenizer that goes with it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str
    source: str


def family_of(config: PretrainedConfig) -> str:
    """The bioscale family (``"esm2"``, ``"llama3"``, ...) of a bioscale or stock ``transformers`` config
    (``ValueError`` naming the type otherwise)."""
    return spec_for_any_config(config).name


def family_of_model(model: PreTrainedModel) -> str:
    return family_of(model.config)


def family_tasks(family: str) -> tuple[str, ...]:
    """The tasks a caller can ask :func:`load_model` for, for ``family``."""
    return get_model_spec(family).tasks


def _checkpoint_inside(path: Path) -> Path | None:
    """The checkpoint in a directory that wraps one: a pipeline model artifact (``metadata.json`` of kind ``model``,
    its ``paths.model``) or a training run's checkpoint directory (``final_model/``); ``None`` otherwise."""
    meta = path / "metadata.json"
    if meta.is_file():
        try:
            raw = json.loads(meta.read_text())
        except (ValueError, UnicodeDecodeError):
            raw = None
        paths = raw.get("paths") if isinstance(raw, dict) and raw.get("kind") == "model" else None
        if isinstance(paths, dict) and isinstance(paths.get("model"), str) and (path / paths["model"]).is_dir():
            if (path / paths["model"] / "config.json").is_file():
                return path / paths["model"]
    if (path / "final_model" / "config.json").is_file():
        return path / "final_model"
    return None


def _resolve_source(source: str | Path) -> str:
    """The string ``from_pretrained`` takes; ``ValueError`` for a path that does not exist or holds no model.

    A directory that wraps a checkpoint (a ``bioscale train`` model artifact, or a run's checkpoint directory with
    ``final_model/``) resolves to that checkpoint.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {text!r} is a file; expected a checkpoint directory (with config.json)")
        if not (path / "config.json").is_file():
            inner = _checkpoint_inside(path)
            if inner is not None:
                logger.info("%s holds no checkpoint itself; using %s", text, inner)
                return str(inner)
            hint = ""
            if (path / "adapter_config.json").is_file():
                hint = " (it holds a LoRA adapter: load it with bioscale.use.load_finetuned)"
            raise ValueError(f"model directory {text!r} has no config.json{hint}")
        return str(path)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_like_path or not _HUB_ID.match(text):
        raise ValueError(f"model path {text!r} does not exist (and it is not a Hub id of the form owner/name)")
    return text  # a Hub id: from_pretrained downloads (or reads the local cache)


@dataclass
class ForeignCheckpoint:
    """A checkpoint in a format stock ``transformers`` has no class for: the family (``spec``) that reads it, and its
    ``config.json``."""

    spec: ModelSpec
    config_json: dict[str, Any]


def _fetch(resolved: str, filename: str) -> Path | None:
    """``filename`` of a checkpoint directory, or of a Hub repo (downloaded to the cache); ``None`` if absent."""
    path = Path(resolved)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(resolved, filename))
    except EntryNotFoundError:
        return None


def foreign_checkpoint(resolved: str) -> ForeignCheckpoint | None:
    """The foreign format of ``resolved`` (see the module docstring), or ``None`` for a checkpoint ``AutoConfig``
    reads (bioscale, stock ``transformers``) or whose ``config.json`` cannot be fetched (``AutoConfig`` then reports
    why)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_path = _fetch(resolved, "config.json")
        raw = json.loads(config_path.read_text()) if config_path is not None else None
    except (OSError, ValueError):  # offline, no such repo, not JSON: AutoConfig gives the real error
        return None
    if not isinstance(raw, dict):
        return None
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return None
    for name in list_models():
        spec = get_model_spec(name)
        if spec.foreign_checkpoint is None:
            continue
        if isinstance(model_type, str) and model_type in spec.hf_model_types:
            return ForeignCheckpoint(spec=spec, config_json=raw)
        # A format whose config.json names no model_type (CodonFM's EnCodon): the family recognises its fields.
        if spec.foreign_config_match is not None and spec.foreign_config_match(raw):
            return ForeignCheckpoint(spec=spec, config_json=raw)
    return None


def _other_safetensors(resolved: str) -> list[str]:
    """Top-level ``*.safetensors`` files of a checkpoint directory or Hub repo other than ``model.safetensors``
    (CodonFM publishes its weights under the checkpoint's own name); ``[]`` when a Hub repo cannot be listed."""
    path = Path(resolved)
    if path.is_dir():
        return sorted(p.name for p in path.glob("*.safetensors") if p.name != "model.safetensors")
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(resolved)
    except Exception:  # noqa: BLE001  (offline or no such repo: the caller reports the missing weights)
        return []
    return sorted(f for f in files if f.endswith(".safetensors") and "/" not in f and f != "model.safetensors")


def _read_foreign_tensors(resolved: str) -> dict[str, torch.Tensor]:
    """Every tensor of a foreign checkpoint, from ``model.safetensors`` or the shards its index lists."""
    from safetensors.torch import load_file

    single = _fetch(resolved, "model.safetensors")
    if single is not None:
        return load_file(str(single))
    index = _fetch(resolved, "model.safetensors.index.json")
    if index is not None:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            shard_path = _fetch(resolved, shard)
            if shard_path is None:
                raise ValueError(f"{resolved!r}: model.safetensors.index.json names {shard}, which is missing")
            state.update(load_file(str(shard_path)))
        return state
    others = _other_safetensors(resolved)
    if len(others) == 1:  # one weights file under another name: the checkpoint's weights
        single = _fetch(resolved, others[0])
        if single is not None:
            return load_file(str(single))
    if len(others) > 1:
        raise ValueError(
            f"{resolved!r} has no model.safetensors but several weight files {others}: which one is meant?"
        )
    pickles = [p.name for p in sorted(Path(resolved).glob("*")) if p.name == "pytorch_model.bin" or p.suffix == ".ckpt"]
    pickled = f" (it has {', '.join(pickles)}: pickled weights can run code and are not read)"
    has_pickle = Path(resolved).is_dir() and bool(pickles)
    raise ValueError(f"{resolved!r} has no model.safetensors{pickled if has_pickle else ''}")


def load_config(source: str | Path) -> PretrainedConfig:
    """The model config of ``source`` (``ValueError`` naming it when it cannot be read)."""
    return _read_config(_resolve_source(source), source)[0]


def _read_config(resolved: str, source: str | Path) -> tuple[PretrainedConfig, ForeignCheckpoint | None]:
    """The config of ``resolved`` and, for a foreign checkpoint (tried only where ``AutoConfig`` fails), its format."""
    try:
        # trust_remote_code=False: never run (nor offer to run, as transformers does at a terminal) a checkpoint's code.
        return AutoConfig.from_pretrained(resolved, trust_remote_code=False), None
    except (OSError, ValueError) as err:
        foreign = foreign_checkpoint(resolved)
        if foreign is not None:
            assert foreign.spec.foreign_checkpoint is not None
            read_config = foreign.spec.foreign_checkpoint[0]
            return read_config(foreign.config_json), foreign
        where = (
            "" if Path(resolved).is_dir() else " (not a local directory, and not loadable from the Hugging Face Hub)"
        )
        raise ValueError(f"cannot load a model config from {str(source)!r}{where}: {err}") from err


def load_model(
    source: str | Path,
    *,
    task: str = "base",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load ``source`` as the bioscale model class for ``task``, with its tokenizer.

    Args:
        source: checkpoint directory or Hub id (bioscale or plain ``transformers`` ESM-2 / Llama).
        task: ``"base"`` (the encoder / decoder without head), ``"masked_lm"``, ``"causal_lm"``,
            ``"token_classification"`` or ``"sequence_classification"``. A head missing from the checkpoint is
            initialised fresh (``config_overrides`` sets ``num_labels``, ``id2label``, ``problem_type``...).
        device, dtype: where and in which dtype to put the weights (default: CPU, as saved).
        config_overrides: config attributes to set before the model is built.

    Raises:
        ValueError: an unknown path, a directory without a model, an unsupported model type, or a task the family
            has no head for.
    """
    resolved = _resolve_source(source)
    config, foreign = _read_config(resolved, source)
    family = family_of(config)
    tasks = family_tasks(family)
    if task not in tasks:
        raise ValueError(f"task {task!r} is not available for {family} models; choose one of {tasks}")
    overrides = dict(config_overrides or {})
    is_bioscale = is_bioscale_config(config) and foreign is None
    load_task = task
    if task == "base" and not overrides:
        # Load the class the checkpoint was saved as and keep its base model: loading a head checkpoint into the
        # bare base class works too, but transformers then reports every head tensor as unexpected.
        stored = saved_task(config)
        if stored in tasks:
            load_task = stored
    if foreign is not None:
        model = _load_foreign(resolved, foreign, load_task, overrides)
    else:
        load = _load_bioscale if is_bioscale else _load_converted
        model = load(resolved, family, load_task, overrides)
    if load_task != task:
        model = getattr(model, model.base_model_prefix)
    model.to(device=device, dtype=dtype)
    model.eval()
    if get_model_spec(family).modality == "image":  # images: the image processor takes the tokenizer's place
        tokenizer = load_image_processor(resolved, model.config)
    elif foreign is not None:
        tokenizer = _foreign_tokenizer(resolved, family, model.config)
    else:
        tokenizer = load_tokenizer(resolved, family, model.config)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=str(source))


def model_class(family: str, task: str) -> type[PreTrainedModel]:
    """The bioscale class implementing ``task`` for ``family``."""
    return get_model_spec(family).model_class(task)


def saved_task(config: PretrainedConfig) -> str:
    """The task a checkpoint was saved for, from ``config.architectures`` (``"base"`` when it names no head)."""
    architectures = list(getattr(config, "architectures", None) or [])
    name = architectures[0] if architectures else ""
    for suffix, task in (
        ("ForMaskedLM", "masked_lm"),
        ("ForCausalLM", "causal_lm"),
        ("ForTokenClassification", "token_classification"),
        ("ForSequenceClassification", "sequence_classification"),
        ("ForImageClassification", "image_classification"),
    ):
        if name.endswith(suffix):
            return task
    return "base"


def _load_bioscale(resolved: str, family: str, task: str, overrides: dict[str, Any]) -> PreTrainedModel:
    # from_pretrained maps between "esm.*"-prefixed head checkpoints and bare base models both ways, and initialises
    # a head that is not in the checkpoint through the model's loading-safe _init_weights hook.
    return model_class(family, task).from_pretrained(resolved, **overrides)


def _load_converted(resolved: str, family: str, task: str, overrides: dict[str, Any]) -> PreTrainedModel:
    """A plain ``transformers`` checkpoint: load it with the family's stock class, convert exactly with ``from_hf``.

    A task without a stock counterpart (``ModelSpec.hf_classes``; e.g. bioscale's mean-pooling sequence head, where
    ESM's reads ``<cls>``) converts the stock base model and puts a freshly initialised bioscale head on it.
    """
    import transformers

    spec = get_model_spec(family)
    _refuse_engine_layout(resolved)
    if task in spec.hf_classes:
        class_name, load_kwargs = spec.hf_classes[task]
        hf_model = getattr(transformers, class_name).from_pretrained(resolved, **{**load_kwargs, **overrides})
        return from_hf(hf_model)
    if "base" not in spec.hf_classes:
        raise ValueError(f"{resolved!r} is a stock transformers checkpoint, and {family} converts none for {task!r}")
    class_name, load_kwargs = spec.hf_classes["base"]
    encoder = from_hf(getattr(transformers, class_name).from_pretrained(resolved, **load_kwargs))
    config = encoder.config
    for key, value in overrides.items():
        setattr(config, key, value)
    model = model_class(family, task)(config)
    base = getattr(model, model.base_model_prefix)
    missing, unexpected = base.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "contact_head" not in k], missing
    return model


def _refuse_engine_layout(resolved: str) -> None:
    """``ValueError`` for a checkpoint whose ``config.json`` says ``model_type: llama`` but whose weights are in
    Transformer Engine's layout (the reference recipe's ``NVLlamaForCausalLM`` training checkpoints: fused
    ``layernorm_qkv`` / ``fc1`` tensors), which the stock class would load as missing keys, i.e. random weights."""
    path = Path(resolved) / "config.json"
    if not path.is_file():
        return
    try:
        architectures = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    engine = [name for name in architectures if isinstance(name, str) and name.startswith("NVLlama")]
    if engine:
        raise ValueError(
            f"{resolved!r} is a Transformer Engine checkpoint ({engine[0]}); its weights are not in the stock "
            "LlamaForCausalLM layout. Convert it with the reference recipe's export (bionemo-recipes models/llama3/"
            "export_llama3.py writes a plain LlamaForCausalLM directory) and load that"
        )


def _load_foreign(resolved: str, foreign: ForeignCheckpoint, task: str, overrides: dict[str, Any]) -> PreTrainedModel:
    """A foreign checkpoint: the family converts its config dict and its safetensors tensors (see the module docs)."""
    assert foreign.spec.foreign_checkpoint is not None
    read_config, build_model = foreign.spec.foreign_checkpoint
    config = read_config(foreign.config_json, **overrides)
    return build_model(_read_foreign_tensors(resolved), config, task)


def _foreign_tokenizer(source: str, family: str, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """:func:`load_tokenizer`, falling back to the family's tokenizer when the saved one needs the checkpoint's code
    (its ``tokenizer_config.json`` may name no class, so ``AutoTokenizer`` would ask for the remote config)."""
    try:
        # A plain config: the tokenizer class then comes from tokenizer_config.json alone.
        return load_tokenizer(source, family, config, auto_config=PretrainedConfig())
    except ValueError as err:
        logger.warning("%s; using the bioscale %s tokenizer instead", err, family)
        tokenizer = default_tokenizer(family)
        check_tokenizer_fits(tokenizer, config, source)
        return tokenizer


def load_tokenizer(
    source: str, family: str, config: PretrainedConfig, *, auto_config: PretrainedConfig | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``source``, else the family's bioscale tokenizer; checked against the vocabulary.

    ``auto_config`` is handed to ``AutoTokenizer`` instead of the checkpoint's ``config.json`` (which it cannot read
    for a foreign checkpoint)."""
    tokenizer: PreTrainedTokenizerBase | None = None
    path = Path(source)
    has_files = path.is_dir() and any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    )
    if has_files or not path.exists():
        try:
            extra = {"config": auto_config} if auto_config is not None else {}
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
        except (OSError, ValueError) as err:
            if has_files:
                raise ValueError(f"cannot load the tokenizer saved in {source!r}: {err}") from err
            tokenizer = None  # a Hub repo without tokenizer files: fall back below
    if tokenizer is None:
        tokenizer = default_tokenizer(family, config)
        logger.info("no tokenizer saved with %s; using the bioscale %s tokenizer", source, family)
    else:
        tokenizer = open_prompt_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, config, source)
    return tokenizer


def open_prompt_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer``, or, for a saved DNA tokenizer that appends ``<eos>`` to every encoding (one saved before
    bioscale's stopped, or the reference's byte-level tokenizer), the bioscale tokenizer with the same vocabulary,
    which does not: the same ids, but ``tokenizer(prompt)`` ends after the prompt's last base, so a stock
    ``model.generate(**tokenizer(prompt))`` (and an export served by vLLM / SGLang) continues the prompt."""
    kind = tokenizer_kind(tokenizer)
    if kind is None or not TOKENIZERS[kind].record_eos:
        return tokenizer
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer("A")["input_ids"][-1:] != [eos]:
        return tokenizer
    rebuilt = get_tokenizer(kind)
    same_specials = set(rebuilt.all_special_ids) == set(tokenizer.all_special_ids)
    if not same_specials or record_affixes(rebuilt) != record_affixes(tokenizer):
        return tokenizer  # same vocabulary, other special tokens: not one of ours; leave it alone
    rebuilt.model_max_length = tokenizer.model_max_length
    logger.info("the saved %s tokenizer appends <eos> to every encoding; using bioscale's (same ids, no <eos> after "
                "a prompt)", kind)  # fmt: skip
    return rebuilt


def load_image_processor(source: str, config: PretrainedConfig) -> Any:
    """The image processor saved with ``source`` (``preprocessor_config.json``, through ``AutoImageProcessor``), else
    bioscale's default for the model's image size (:func:`bioscale.data.images.image_processor_for`); ``ValueError``
    when the saved one resizes to another size than the model takes."""
    from transformers import AutoImageProcessor

    path = Path(source)
    processor = None
    if (path / "preprocessor_config.json").is_file() or not path.exists():
        try:
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as err:
            if path.exists():
                raise ValueError(f"cannot load the image processor saved in {source!r}: {err}") from err
    if processor is None:
        logger.info("no image processor saved with %s; using bioscale's (resize to %d, mean = std = 0.5)", source,
                    config.image_size)  # fmt: skip
        return image_processor_for(config.image_size)
    size = processor_image_size(processor)
    if size is not None and size != config.image_size:
        raise ValueError(f"the image processor of {source!r} resizes to {size} but the model takes "
                         f"{config.image_size}x{config.image_size} images")  # fmt: skip
    return processor


def default_tokenizer(family: str, config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """bioscale's tokenizer for ``family`` (its ``ModelSpec.tokenizer``: ESM-2's protein alphabet, the nucleotide
    tokenizer, ...).

    With ``config``, a tokenizer of the same alphabet whose size and special ids match the model's instead, when the
    default's do not: a Llama checkpoint of ``vocab_size`` 256 with ``bos``/``eos``/``pad`` 2/0/1 (the reference's
    genomic checkpoints) gets the byte-level ``nucleotide_ascii`` tokenizer, not the compact 20-token one.
    """
    default = get_model_spec(family).tokenizer
    if config is None:
        return get_tokenizer(default)
    wanted = tuple(getattr(config, f"{name}_token_id", None) for name in ("bos", "eos", "pad"))
    candidates = [default] + [kind for kind, spec in TOKENIZERS.items()
                              if kind != default and spec.policy_alphabet == TOKENIZERS[default].policy_alphabet
                              and spec.unit == TOKENIZERS[default].unit]  # fmt: skip
    for kind in candidates:
        spec = TOKENIZERS[kind]
        if not spec.vocab or len(spec.vocab) > int(config.vocab_size):
            continue
        tokenizer = get_tokenizer(kind)
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        if all(w is None or w == i for w, i in zip(wanted, ids)):
            return tokenizer
    return get_tokenizer(default)


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, source: str) -> None:
    """``ValueError`` when the tokenizer can produce ids the model has no embedding for."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= config.vocab_size:
        raise ValueError(
            f"the tokenizer of {source!r} has token id {largest} but the model's vocab_size is {config.vocab_size}; "
            "the tokenizer does not belong to this model"
        )
