"""Reading adapter directories and attaching adapters to a base model.

:func:`read_adapter` reads what an adapter directory holds (peftlab's run or a plain peft
adapter) and checks it against the base before any weights load; :func:`attach` is the one
way an adapter is put on a model (``load_adapter``, ``merge`` / ``combine`` and the server all
use it): peft's ``from_pretrained`` (or ``load_adapter`` beside other adapters) -> the stored
tensors checked against what peft built -> a warning for new base weights the adapter lacks ->
``compat.apply_fixes``. :func:`load_adapter` loads a run directory ready for evaluation or
prediction; a full fine-tuning run (a plain transformers model) loads as it is.

Loading checks every stored tensor against the base model (names and shapes), so an adapter
made for another base fails with a message instead of loading silently. Weights load only
from safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, get_peft_model_state_dict
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftlab import compat, placement
from peftlab.config import ModelConfig, RunConfig, readable_error
from peftlab.errors import AdapterError, ConfigError, PeftlabError, listed
from peftlab.methods import PEFT_SAVES
from peftlab.model import (base_signature, describe_base, fit_embeddings, load_model_config, load_tokenizer,
                           untrained_modules)
from peftlab.progress import note, warn
from peftlab.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG, RunRecord, is_full_run, read_run
from peftlab.tasks import PEFT_TASK_TYPES, get_task

OTHER_BASE = "it was made for a different base model; pass the right one with --base"


@dataclass
class AdapterSource:
    """What an adapter directory holds, read and checked before any weights load."""

    path: Path
    peft_config: PeftConfig
    shapes: dict[str, tuple[int, ...]]  # stored tensor name -> shape
    task: Any  # peftlab.tasks.base.Task
    meta: dict[str, Any]
    config: RunConfig | None  # None for adapters made with plain peft
    model_config: ModelConfig
    record: RunRecord  # empty for adapters made with plain peft


@dataclass
class LoadedAdapter:
    """A base model with an adapter on top, ready for evaluation or prediction."""

    model: PeftModel  # a plain transformers model for a full fine-tuning run
    tokenizer: PreTrainedTokenizerBase
    task: Any  # peftlab.tasks.base.Task
    meta: dict[str, Any]
    config: RunConfig | None  # None for adapters made with plain peft
    model_config: ModelConfig
    record: RunRecord  # empty for adapters made with plain peft
    path: Path
    placement: str | None = None  # where the base's layers went, when spread over devices / disk


# --- reading ---------------------------------------------------------------------------------

def adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The stored tensors' names and shapes (safetensors only; the weights are not read)."""
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path} holds adapter_model.bin (a pickle file); peftlab loads only safetensors",
                               "convert it once with peft: load it in a trusted session and save_pretrained()")
        raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS}", "is this an adapter directory?")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{weights} is corrupted or not a safetensors file: {error}",
                           "re-create or re-download the adapter") from None


def read_peft_config(path: Path) -> PeftConfig:
    """The adapter's peft config; keys from a newer peft are dropped with one warning that names them."""
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}", "is this an adapter directory?")
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict) or "peft_type" not in raw:
            raise ValueError("it is not a JSON object with a peft_type")
        if raw["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise AdapterError(f'{file} names the PEFT method "{raw["peft_type"]}", which peft {peft.__version__} '
                               "does not know", "it was probably made with a newer peft: pip install -U peft")
        with warnings.catch_warnings():  # peft warns about unknown keys; we name them below, once
            warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
            config = PeftConfig.from_pretrained(str(path))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, KeyError) as error:
        raise AdapterError(f"{file} is malformed: {error}") from None
    ignored = sorted(set(raw) - {f.name for f in dataclasses.fields(config)} - {"runtime_config"})
    if ignored:
        warn(f"{file} has settings this peft ({peft.__version__}) does not know, ignored: {', '.join(ignored)}; "
             "it was probably saved by a newer peft (pip install -U peft to use them)")
    return config


def _original_base(peft_config: PeftConfig, model_cfg: ModelConfig) -> dict[str, Any] | None:
    """A plain peft adapter's own base, when it is at hand locally and is not the one being used."""
    name = peft_config.base_model_name_or_path
    if not name or name == model_cfg.name or not (Path(name) / "config.json").is_file():
        return None
    try:
        return base_signature(load_model_config(ModelConfig(name=name)))
    except PeftlabError:
        return None


def check_base(path: Path, model_cfg: ModelConfig, made_for: dict[str, Any] | None) -> None:
    """Refuse, before any weights load, a base whose architecture or hidden size differs from the adapter's."""
    if not made_for:
        return
    have = base_signature(load_model_config(model_cfg))
    if any(have[key] != made_for.get(key) for key in ("model_type", "hidden_size") if made_for.get(key) is not None):
        raise AdapterError(f"the adapter in {path} does not fit the base model {model_cfg.name}: the adapter was "
                           f"made for {describe_base(made_for)}, {model_cfg.name} is {describe_base(have)}",
                           OTHER_BASE)


def read_adapter(path: str | Path, base: str | None = None,
                 model_options: dict[str, Any] | None = None) -> AdapterSource:
    """Read an adapter directory (peftlab's or plain peft's): configs, tensor shapes, task, base; no weights.

    ``model_options`` override the run's ``model:`` settings for loading (placement, quantization).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    if is_full_run(path):
        raise AdapterError(f"{path} is a full fine-tuning run: it holds a whole model, not an adapter",
                           f"use it as a base model (e.g. peftlab serve --base {path})")
    peft_config = read_peft_config(path)
    shapes = adapter_shapes(path)
    config, record = read_run(path)
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    if config is not None:
        model_cfg = config.model.model_copy(update={"name": base} if base else {})
        task = get_task(config.task)
        meta = record.meta
    else:
        task_type = str(getattr(peft_config.task_type, "value", peft_config.task_type))
        if task_type not in PEFT_TASK_TYPES:
            raise AdapterError(f"the adapter's task_type {task_type!r} is not a peftlab task family",
                               f"supported: {', '.join(PEFT_TASK_TYPES)}")
        name = base or peft_config.base_model_name_or_path
        if not name:
            raise AdapterError("the adapter does not name its base model", "pass --base MODEL")
        model_cfg = ModelConfig(name=name, revision=None if base else peft_config.revision)
        task = get_task(PEFT_TASK_TYPES[task_type])
        meta = task.meta_from_adapter(shapes, load_model_config(model_cfg))

    if options:
        try:
            model_cfg = ModelConfig.model_validate({**model_cfg.model_dump(), **options})
        except ValidationError as error:
            raise ConfigError(f"invalid model options: {readable_error(error, ModelConfig, 'model.')}") from None
    check_base(path, model_cfg, record.base or _original_base(peft_config, model_cfg))
    return AdapterSource(path=path, peft_config=peft_config, shapes=shapes, task=task, meta=meta, config=config,
                         model_config=model_cfg, record=record)


def load_tokenizer_of(source: AdapterSource) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the adapter, or its base model's."""
    has_tokenizer = (source.path / "tokenizer_config.json").is_file()
    return load_tokenizer(source.model_config, str(source.path) if has_tokenizer else None)


# --- attaching -------------------------------------------------------------------------------

def _normalise(key: str, adapter_name: str = "default") -> str:
    # peft stores keys without the adapter name; the live state dict may include it
    return key.replace(f".{adapter_name}", "")


def check_loaded(model: PeftModel, shapes: dict[str, tuple[int, ...]], path: Path, base: str,
                 adapter_name: str = "default") -> None:
    """The adapter file and the adapter peft built on the base hold the same tensors, of the same shapes.

    A stored tensor without a counterpart, or of another shape, means another base; an adapter
    tensor of the model that the file lacks (a base with more layers, other layer names) would
    silently keep its initial value, so it is refused as well.
    """
    with warnings.catch_warnings():  # peft notes that it would save a resized embedding: not a save here
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`")
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        live = {_normalise(k, adapter_name): tuple(v.shape) for k, v in state.items()}
        # without the embedding layers peft may add when the vocabulary was resized: those are optional in a file
        required = {_normalise(k, adapter_name) for k in get_peft_model_state_dict(
            model, adapter_name=adapter_name, save_embedding_layers=False)}
    for key, shape in shapes.items():
        have = live.get(_normalise(key, adapter_name))
        if have is None or have != shape:
            raise AdapterError(
                f"the adapter in {path} does not fit the base model {base}: "
                + (f"tensor {key} has no counterpart" if have is None else f"{key} is {shape}, the model has {have}"),
                OTHER_BASE)
    missing = sorted(required - {_normalise(key, adapter_name) for key in shapes})
    if missing:
        raise AdapterError(
            f"the adapter in {path} does not fit the base model {base}: the model has {len(missing)} adapter "
            f"tensor(s) the adapter file lacks ({listed(missing)}), so they would keep their initial values "
            "(a base with more layers or other layer names?)", OTHER_BASE)


def _placement_kwargs(base_model: PreTrainedModel, model_cfg: ModelConfig) -> dict[str, Any]:
    """What PeftModel.from_pretrained needs to re-place a base with layers on the CPU or disk."""
    device_map = getattr(base_model, "hf_device_map", None)
    if not device_map or not {"cpu", "disk"} & set(device_map.values()):
        return {}
    # peft re-dispatches the wrapped model: the same placement, under the wrapped module names
    kwargs: dict[str, Any] = {"device_map": {f"base_model.model.{k}" if k else "base_model.model": v
                                             for k, v in device_map.items()}}
    if "disk" in device_map.values():
        compat.redirect_offloaded_weights(base_model, model_cfg.offload_folder)
        kwargs["offload_folder"] = model_cfg.offload_folder
    return kwargs


def _warn_unsaved_new_weights(base_model: PreTrainedModel, peft_config: PeftConfig,
                              shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Say so when the base draws weights at random on every load (the checkpoint lacks them: DeBERTa's pooler)
    and the adapter does not hold them (made before peftlab saved them, or with plain peft): its outputs then
    change from one load to the next."""
    task_type = str(getattr(peft_config.task_type, "value", peft_config.task_type))
    unsaved = [name for name in untrained_modules(base_model, PEFT_SAVES.get(task_type, ()))
               if not any(f".{name}." in f".{key}" for key in shapes)]
    if unsaved:
        warn(f"the base model's checkpoint lacks {', '.join(unsaved)} and the adapter in {path} does not hold "
             "them: they are drawn at random on every load, so this adapter's outputs differ from one load to the "
             "next; train it again with this peftlab, which saves them with the adapter")


def attach(model: PreTrainedModel | PeftModel, source: AdapterSource, adapter_name: str = "default") -> PeftModel:
    """Put the adapter ``source`` describes on ``model``, checked: the one way peftlab attaches an adapter.

    A plain transformers model is wrapped (peft's ``PeftModel.from_pretrained``; a base spread over
    CPU / disk keeps its placement); a ``PeftModel`` gets the adapter beside the ones it holds
    (peft's ``load_adapter``; the active adapter stays). Then the stored tensors must be the ones
    peft built (:func:`check_loaded`), new base weights the adapter does not hold are warned about,
    and ``compat.apply_fixes`` runs. Any misfit raises :class:`AdapterError`, and a ``PeftModel``
    is left with the adapters it had.
    """
    path, base = source.path, source.model_config.name
    beside = isinstance(model, PeftModel)
    try:
        with warnings.catch_warnings(), placement.quiet_dispatch():
            if beside:
                warnings.simplefilter("ignore")
                model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=False)
                peft_model = model
            else:
                # on an offloaded base, peft's re-dispatch puts the adapter weights with the layers (expected no-op)
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
                warnings.filterwarnings("ignore", message="Found missing adapter keys")  # check_loaded names them
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name,
                                                       is_trainable=False, config=source.peft_config,
                                                       **_placement_kwargs(model, source.model_config))
    except (RuntimeError, ValueError, KeyError) as error:
        if beside:
            detach(model, adapter_name)
        problem = f"no match for tensor {error.args[0]}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise AdapterError(f"the adapter in {path} does not fit the base model {base}: {problem}",
                           OTHER_BASE) from None
    try:
        check_loaded(peft_model, source.shapes, path, base, adapter_name=adapter_name)
    except AdapterError:
        if beside:
            detach(model, adapter_name)
        raise
    _warn_unsaved_new_weights(peft_model.get_base_model(), source.peft_config, source.shapes, path)
    return compat.apply_fixes(peft_model)


def detach(model: PeftModel, adapter_name: str) -> None:
    """Remove one adapter from a PeftModel that holds others (another one becomes active if it was)."""
    if adapter_name not in model.peft_config:
        return
    if model.active_adapter == adapter_name:
        others = [n for n in model.peft_config if n != adapter_name]
        if others:
            model.set_adapter(others[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.delete_adapter(adapter_name)


# --- loading a run ---------------------------------------------------------------------------

def load_adapter(path: str | Path, base: str | None = None, device: str | None = None,
                 model_options: dict[str, Any] | None = None) -> LoadedAdapter:
    """Load an adapter directory (peftlab's or plain peft's) onto its base model.

    ``model_options`` override the run's ``model:`` settings for loading, e.g. a
    ``device_map`` / ``max_memory`` / ``offload_folder`` for a base bigger than memory, or
    ``quantization`` (docs/big-models.md).
    """
    if Path(path).is_dir() and is_full_run(Path(path)):
        return _load_full_run(Path(path), base, device, model_options)
    source = read_adapter(path, base, model_options)
    tokenizer = load_tokenizer_of(source)
    base_model: PreTrainedModel = source.task.load_model(source.model_config, source.meta)
    # added tokens: the base grows to the vocabulary the adapter was trained with, before peft attaches it
    fit_embeddings(base_model, tokenizer, (source.record.base or {}).get("vocab_size"))
    model = attach(base_model, source)
    if device and not placement.device_map_of(model):
        model.to(device)
    model.eval()
    where = placement.describe(model)
    if where:
        note(f"base model layers: {where}")
    return LoadedAdapter(model=model, tokenizer=tokenizer, task=source.task, meta=source.meta, config=source.config,
                         model_config=source.model_config, record=source.record, path=source.path, placement=where)


def _load_full_run(path: Path, base: str | None, device: str | None,
                   model_options: dict[str, Any] | None = None) -> LoadedAdapter:
    """A full fine-tuning run: the directory is the model (no base to put an adapter on)."""
    if base:
        raise AdapterError(f"{path} is a full fine-tuning run: it holds the whole model, so --base does not apply",
                           "leave out --base")
    if not (path / RUN_CONFIG).is_file():
        raise AdapterError(f"{path} holds a model but no {RUN_CONFIG}: it is not a peftlab run",
                           "load it with transformers' from_pretrained")
    config, record = read_run(path)
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    model_cfg = config.model.model_copy(update={"name": str(path), "revision": None, "add_tokens": [],
                                                "add_special_tokens": {}, **options})
    task = get_task(config.task)
    tokenizer = load_tokenizer(model_cfg, str(path))
    model = task.load_model(model_cfg, record.meta)
    if device and not placement.device_map_of(model):
        model.to(device)
    model.eval()
    return LoadedAdapter(model=model, tokenizer=tokenizer, task=task, meta=record.meta, config=config,
                         model_config=model_cfg, record=record, path=path)


def from_run(result: Any) -> LoadedAdapter:
    """The adapter a finished run holds in memory (``RunResult.model``), with its run's record, as
    :func:`load_adapter` gives it from disk: ``predict`` and ``logits`` take either."""
    if getattr(result, "model", None) is None:
        raise AdapterError("this run result holds no model in memory", "load it from disk: load_adapter(output_dir)")
    path = Path(result.output_dir)
    config, record = read_run(path)
    if config is None:
        raise AdapterError(f"{path} holds no {RUN_CONFIG}: it is not a finished peftlab run")
    return LoadedAdapter(model=result.model.eval(), tokenizer=result.tokenizer, task=get_task(config.task),
                         meta=record.meta, config=config, model_config=config.model, record=record, path=path,
                         placement=placement.describe(result.model))
