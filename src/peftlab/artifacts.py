"""The run directory: standard peft adapter files plus peftlab's record of the run.

    adapter_config.json         peft's config (plain ``PeftModel.from_pretrained`` loads it)
    adapter_model.safetensors   trainable weights, incl. a classification head
    tokenizer files
    peftlab.yaml                the resolved run config
    peftlab.json                task metadata (labels), method, sizes, timing, library versions
    metrics.json                final metrics (and the per-evaluation history)

Full fine-tuning (method ``full``) has no adapter: its run directory holds a plain
transformers model (``config.json``, ``model.safetensors``) beside the same tokenizer and
peftlab files, and :func:`load_adapter` loads it as it is. PiSSA / OLoRA adapters are saved
converted (peft's ``path_initial_model_for_weight_conversion``): a plain LoRA of rank 2r
that applies to the original base model.

A run directory is written to a temporary sibling (``.NAME.tmp-<pid>-<hex>``) and renamed
into place at the end, so a failed or interrupted run never leaves a half-written output
directory; the next run into the same place removes the temporary siblings of killed runs.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import platform
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import peft
import torch
import yaml
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pydantic import ValidationError

from peftlab import compat, placement
from peftlab.version import __version__
from peftlab.config import ModelConfig, RunConfig, readable_error
from peftlab.methods import PEFT_SAVES
from peftlab.recipe import build_config
from peftlab.tasks import PEFT_TASK_TYPES, get_task
from peftlab.errors import AdapterError, ConfigError, PeftlabError
from peftlab.model import (base_signature, describe_base, embedding_rows, fit_embeddings, load_model_config,
                           load_tokenizer, untrained_modules)
from peftlab.progress import note, warn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"  # full fine-tuning: the whole model (transformers' file name)
RUN_CONFIG = "peftlab.yaml"
RUN_RECORD = "peftlab.json"
METRICS = "metrics.json"
MERGE_RECORD = "peftlab-merge.json"  # beside a merged model (peftlab merge)


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers

    return {
        "peftlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- writing ----------------------------------------------------------------------------

def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work if the output directory would be clobbered or cannot be written."""
    if path.exists() and not path.is_dir():
        raise PeftlabError(f"output_dir {path} is a file, not a directory", "choose another output_dir")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise PeftlabError(f"output directory {path} already exists and is not empty",
                               "choose another output_dir, or pass --overwrite")
        if not is_peftlab_output(path):
            found = sorted(p.name for p in path.iterdir())
            listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise PeftlabError(f"output directory {path} holds files peftlab did not write ({listed}); "
                               "--overwrite only replaces a peftlab run",
                               "choose another output_dir (a new or empty folder); nothing was changed")
    parent = path.absolute().parent
    while not parent.exists():  # the nearest folder that exists: the run's folders are made inside it
        parent = parent.parent
    if not parent.is_dir():
        raise PeftlabError(f"cannot create output directory {path}: {parent} is a file, not a directory",
                           "choose another output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PeftlabError(f"cannot write output directory {path}: {parent} is not writable",
                           "choose an output_dir in a folder you can write to")


PEFTLAB_RECORDS = (RUN_RECORD, MERGE_RECORD)  # a run (train, combine) / a merged model (merge)


def is_peftlab_output(path: Path) -> bool:
    """A folder peftlab wrote: a run or a merged model (what --overwrite may replace)."""
    return any((path / name).is_file() for name in PEFTLAB_RECORDS)


_STAGING = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def _staging_name(final: Path, kind: str) -> Path:
    """``.NAME.tmp-<pid>-<hex>``: the pid tells a later run whether its writer is still alive."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if os.name == "nt" or pid == os.getpid():  # os.kill(pid, 0) is not a probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        pass
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Delete the temporary siblings of ``final`` left by runs that were killed (their process is gone).

    A dead run's ``.old-`` folder (the previous run, moved aside) is kept while ``final``
    does not exist: it may be the only copy.
    """
    removed = []
    for sibling in final.parent.glob(f".{glob.escape(final.name)}.*"):
        match = _STAGING.fullmatch(sibling.name[len(final.name) + 1:])
        if not match or _alive(int(match["pid"])) or (match["kind"] == "old" and not final.exists()):
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
    if removed:
        warn(f"removed {', '.join(p.name for p in removed)} beside {final}: left by a run that was killed")
    return removed


def _disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)} or any(
        text in str(error) for text in ("No space left", "StorageFull", "Disk quota exceeded"))


def _write_error(error: BaseException, final: Path) -> PeftlabError:
    unchanged = f"nothing was changed: {final} is as it was" if final.exists() else f"{final} was not created"
    if _disk_full(error):
        return PeftlabError(f"the disk is full ({getattr(error, 'strerror', None) or error}): could not write the "
                            f"run; {unchanged}",
                            "free some disk space (or choose an output_dir on another disk) and run again")
    return PeftlabError(f"could not write the run: {error}; {unchanged}",
                        "check that the output folder is writable, then run again")


@contextmanager
def staging_dir(final: Path, overwrite: bool):
    """A temporary directory beside ``final`` that replaces it only if the block succeeds.

    Any failure removes it; operating-system errors (a full disk, a lost mount) become a
    :class:`PeftlabError` that says the previous ``final`` is untouched.
    """
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    tmp = _staging_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(error, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _staging_name(final, "old") if final.exists() else None
    try:
        if old:
            final.rename(old)
        tmp.rename(final)
    except OSError as error:
        if old and old.exists() and not final.exists():
            old.rename(final)  # put the previous run back
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(error, final) from None
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _model_files(directory: Path) -> list[Path]:
    """A saved transformers model's weights: model.safetensors, or its shards (model-00001-of-00003...)."""
    return sorted(directory.glob("model*.safetensors"))


def weights_bytes(directory: Path) -> int:
    """The size of the run's weights: the adapter file, or the whole model of a full fine-tuning run (0: none)."""
    files = _model_files(directory) if is_full_run(directory) else [directory / ADAPTER_WEIGHTS]
    return sum(f.stat().st_size for f in files if f.is_file())


def is_full_run(directory: Path) -> bool:
    """A full fine-tuning run directory: a plain transformers model (no adapter) with peftlab's record."""
    return (directory / "config.json").is_file() and not (directory / ADAPTER_CONFIG).is_file() and bool(
        _model_files(directory))


def initial_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the adapter's starting values (PiSSA / OLoRA), for the conversion on save."""
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()
            if param.requires_grad}


def _save_converted(directory: Path, model: PeftModel, initial: dict[str, torch.Tensor]) -> None:
    """Save a PiSSA / OLoRA adapter as a plain LoRA of the original base model (peft's conversion).

    peft reads the starting adapter from a folder: it is written inside ``directory`` and
    removed afterwards. peft 0.21's conversion keeps only the LoRA tensors, so the other saved
    tensors (a classification head in modules_to_save) are put back (compat.py).
    """
    from safetensors.torch import save_file

    work = directory / ".peftlab-initial"
    start = work / "initial"
    start.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=initial).items()},
                  str(start / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(init_lora_weights|pissa|olora|PiSSA|OLoRA).*")
            model.save_pretrained(str(directory), safe_serialization=True,
                                  path_initial_model_for_weight_conversion=str(start))
        compat.restore_dropped_tensors(directory / ADAPTER_WEIGHTS, get_peft_model_state_dict(model))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_run(directory: Path, model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             config: RunConfig, record: dict[str, Any], metrics: dict[str, Any],
             state_dict: dict[str, torch.Tensor] | None = None,
             initial_adapter: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter (or, for full fine-tuning, the model), tokenizer, config, record and metrics.

    ``state_dict``: the trainable weights when they had to be gathered from several processes.
    ``initial_adapter``: PiSSA / OLoRA's starting adapter: the adapter is saved converted to a
    plain LoRA of the original base (the model must hold the kept weights).
    """
    if not isinstance(model, PeftModel):  # full fine-tuning: a plain transformers model
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
        base = model
    elif initial_adapter is not None:
        _save_converted(directory, model, initial_adapter)
        base = model.get_base_model()
    else:
        if state_dict is not None:  # buffers the adapter saves too (VeRA's shared projections) are not trainable
            state_dict = {**{k: v for k, v in model.state_dict().items() if k not in state_dict}, **state_dict}
        # added tokens trained as rows (trainable_token_indices) are saved as those rows, not the whole resized
        # embedding matrix peft would otherwise add; LoRA on the embeddings keeps peft's "auto" (full layers)
        rows_only = bool(getattr(model.active_peft_config, "trainable_token_indices", None))
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict,
                              save_embedding_layers=False if rows_only else "auto")
        base = model.get_base_model()
    tokenizer.save_pretrained(str(directory))
    config.save(directory / RUN_CONFIG)
    record = {**record, "base": base_signature(base.config, embedding_rows(base)), "versions": library_versions(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "adapter_bytes": weights_bytes(directory)}
    write_json(directory / RUN_RECORD, record)
    write_json(directory / METRICS, metrics)


# --- reading ----------------------------------------------------------------------------

@dataclass
class LoadedAdapter:
    """A base model with an adapter on top, ready for evaluation or prediction."""

    model: PeftModel  # a plain transformers model for a full fine-tuning run
    tokenizer: PreTrainedTokenizerBase
    task: Any  # peftlab.tasks.base.Task
    meta: dict[str, Any]
    config: RunConfig | None  # None for adapters made with plain peft
    model_config: ModelConfig
    record: dict[str, Any]
    path: Path
    placement: str | None = None  # where the base's layers went, when spread over devices / disk


def from_run(result: Any) -> LoadedAdapter:
    """The adapter a finished run holds in memory (``RunResult.model``), with its run's record, as
    :func:`load_adapter` gives it from disk: ``predict`` and ``logits`` take either."""
    if getattr(result, "model", None) is None:
        raise AdapterError("this run result holds no model in memory", "load it from disk: load_adapter(output_dir)")
    path = Path(result.output_dir)
    config = build_config(yaml.safe_load((path / RUN_CONFIG).read_text()))
    record = json.loads((path / RUN_RECORD).read_text())
    return LoadedAdapter(model=result.model.eval(), tokenizer=result.tokenizer, task=get_task(config.task),
                         meta=record["meta"], config=config, model_config=config.model, record=record, path=path,
                         placement=placement.describe(result.model))


def _adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
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


def _peft_config(path: Path) -> PeftConfig:
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


def _normalise(key: str, adapter_name: str = "default") -> str:
    # peft stores keys without the adapter name; the live state dict may include it
    return key.replace(f".{adapter_name}", "")


def _listed(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


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
    hint = "it was made for a different base model; pass the right one with --base"
    for key, shape in shapes.items():
        have = live.get(_normalise(key, adapter_name))
        if have is None or have != shape:
            raise AdapterError(
                f"the adapter in {path} does not fit the base model {base}: "
                + (f"tensor {key} has no counterpart" if have is None else f"{key} is {shape}, the model has {have}"),
                hint)
    missing = sorted(required - {_normalise(key, adapter_name) for key in shapes})
    if missing:
        raise AdapterError(
            f"the adapter in {path} does not fit the base model {base}: the model has {len(missing)} adapter "
            f"tensor(s) the adapter file lacks ({_listed(missing)}), so they would keep their initial values "
            "(a base with more layers or other layer names?)", hint)


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
                           "it was made for a different base model; pass the right one with --base")


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
    record: dict[str, Any]


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
    peft_config = _peft_config(path)
    shapes = _adapter_shapes(path)

    config: RunConfig | None = None
    record: dict[str, Any] = {}
    if (path / RUN_CONFIG).is_file():
        try:
            config = build_config(yaml.safe_load((path / RUN_CONFIG).read_text()))
            record = json.loads((path / RUN_RECORD).read_text())
        except (yaml.YAMLError, json.JSONDecodeError, FileNotFoundError) as error:
            raise AdapterError(f"peftlab's record in {path} is unreadable: {error}",
                               f"delete {RUN_CONFIG} and {RUN_RECORD} to load it as a plain peft adapter") from None
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    if config is not None:
        model_cfg = config.model.model_copy(update={"name": base} if base else {})
        task = get_task(config.task)
        meta = record["meta"]
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
    check_base(path, model_cfg, record.get("base") or _original_base(peft_config, model_cfg))
    return AdapterSource(path=path, peft_config=peft_config, shapes=shapes, task=task, meta=meta, config=config,
                         model_config=model_cfg, record=record)


def load_tokenizer_of(source: AdapterSource) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the adapter, or its base model's."""
    has_tokenizer = (source.path / "tokenizer_config.json").is_file()
    return load_tokenizer(source.model_config, str(source.path) if has_tokenizer else None)


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
    path, peft_config, shapes, task, meta = source.path, source.peft_config, source.shapes, source.task, source.meta
    config, model_cfg, record = source.config, source.model_config, source.record
    tokenizer = load_tokenizer_of(source)
    base_model: PreTrainedModel = task.load_model(model_cfg, meta)
    # added tokens: the base grows to the vocabulary the adapter was trained with, before peft attaches it
    fit_embeddings(base_model, tokenizer, (record.get("base") or {}).get("vocab_size"))
    try:
        with warnings.catch_warnings(), placement.quiet_dispatch():
            # on an offloaded base, peft's re-dispatch puts the adapter weights with the layers (expected no-op copy)
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # check_loaded names them
            model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False, config=peft_config,
                                              **_placement_kwargs(base_model, model_cfg))
    except (RuntimeError, ValueError, KeyError) as error:
        problem = f"no match for tensor {error.args[0]}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise AdapterError(
            f"the adapter in {path} does not fit the base model {model_cfg.name}: {problem}",
            "it was made for a different base model; pass the right one with --base",
        ) from None
    check_loaded(model, shapes, path, model_cfg.name)
    _warn_unsaved_new_weights(base_model, peft_config, shapes, path)
    compat.apply_fixes(model)
    if device and not placement.device_map_of(model):
        model.to(device)
    model.eval()
    where = placement.describe(model)
    if where:
        note(f"base model layers: {where}")
    return LoadedAdapter(model=model, tokenizer=tokenizer, task=task, meta=meta, config=config,
                         model_config=model_cfg, record=record, path=path, placement=where)


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


def _load_full_run(path: Path, base: str | None, device: str | None,
                   model_options: dict[str, Any] | None = None) -> LoadedAdapter:
    """A full fine-tuning run: the directory is the model (no base to put an adapter on)."""
    if base:
        raise AdapterError(f"{path} is a full fine-tuning run: it holds the whole model, so --base does not apply",
                           "leave out --base")
    if not (path / RUN_CONFIG).is_file():
        raise AdapterError(f"{path} holds a model but no {RUN_CONFIG}: it is not a peftlab run",
                           "load it with transformers' from_pretrained")
    try:
        config = build_config(yaml.safe_load((path / RUN_CONFIG).read_text()))
        record = json.loads((path / RUN_RECORD).read_text())
    except (yaml.YAMLError, json.JSONDecodeError, FileNotFoundError) as error:
        raise AdapterError(f"peftlab's record in {path} is unreadable: {error}") from None
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    model_cfg = config.model.model_copy(update={"name": str(path), "revision": None, "add_tokens": [],
                                                "add_special_tokens": {}, **options})
    task = get_task(config.task)
    tokenizer = load_tokenizer(model_cfg, str(path))
    model = task.load_model(model_cfg, record["meta"])
    if device and not placement.device_map_of(model):
        model.to(device)
    model.eval()
    return LoadedAdapter(model=model, tokenizer=tokenizer, task=task, meta=record["meta"], config=config,
                         model_config=model_cfg, record=record, path=path)
