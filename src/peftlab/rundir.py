"""The run directory: its layout, its staged (atomic) writing, and its record.

    adapter_config.json         peft's config (plain ``PeftModel.from_pretrained`` loads it)
    adapter_model.safetensors   trainable weights, incl. a classification head
    tokenizer files
    peftlab.yaml                the resolved run config
    peftlab.json                the run record (:class:`RunRecord`): task meta (labels), method,
                                sizes, timing, library versions
    metrics.json                final metrics (and the per-evaluation history)
    README.md                   the model card (peftlab.card), written from the files above
    loss_curve.png              the training loss, shown in the card

Full fine-tuning (method ``full``) has no adapter: its run directory holds a plain
transformers model (``config.json``, ``model.safetensors``) beside the same tokenizer and
peftlab files.

A run directory is written to a temporary sibling (``.NAME.tmp-<pid>-<hex>``) and renamed
into place at the end, so a failed or interrupted run never leaves a half-written output
directory; the next run into the same place removes the temporary siblings of killed runs.

The record has one reader, :func:`read_run`, and one writer, ``artifacts.write_record``.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError

from peftlab.config import RunConfig
from peftlab.errors import AdapterError, PeftlabError, listed
from peftlab.progress import warn
from peftlab.recipe import build_config
from peftlab.version import __version__

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"  # full fine-tuning: the whole model (transformers' file name)
RUN_CONFIG = "peftlab.yaml"
RUN_RECORD = "peftlab.json"
METRICS = "metrics.json"
MERGE_RECORD = "peftlab-merge.json"  # beside a merged model (peftlab merge)
EXPORT_RECORD = "peftlab-export.json"  # beside GGUF files (peftlab export)
PEFTLAB_RECORDS = (RUN_RECORD, MERGE_RECORD, EXPORT_RECORD)  # a run (train, combine) / merged model / export


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


def hardware(device: torch.device) -> str:
    """What a run trained on: the GPU's name, or the CPU (architecture, threads torch uses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.machine()}; torch threads: {torch.get_num_threads()})"
    return device.type


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- the run record ------------------------------------------------------------------------

@dataclass
class RunRecord:
    """``peftlab.json``: what a run was and how it went.

    Written by train (``artifacts.save_run``) and combine, read by :func:`read_run`. Every key but
    ``meta`` is optional (records of older peftlab versions lack some; a plain peft adapter has an
    empty record); a field left at None is not written. Keys this version does not know are kept
    in ``extra`` and written back as they were.
    """

    task: str | None = None
    method: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the task family's meta (labels, mode, ...)
    main_metric: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    train_seconds: float | None = None
    steps: int | None = None
    kept: dict[str, Any] | None = None  # {"which": "best" | "last", "step", "epoch"}
    max_length: int | None = None  # longest input in tokens the run trained with
    precision: str | None = None
    fast_path: dict[str, Any] | None = None  # fastpath's resolved switches
    num_processes: int | None = None
    hardware: str | None = None  # hardware(): the GPU's name, or the CPU
    split_rows: dict[str, int] | None = None  # rows of each split the run read: train, eval[, test]
    notes: list[str] | None = None
    class_weights: dict[str, float] | None = None  # training.class_weights resolved: label -> weight
    base: dict[str, Any] | None = None  # model.base_signature: model_type, hidden_size, vocab_size (rows)
    versions: dict[str, str] | None = None  # library_versions()
    created: str | None = None  # ISO 8601, UTC
    adapter_bytes: int | None = None  # weights_bytes() of the directory
    combined_from: list[str] | None = None  # combine: the adapters, their weights and peft's combination type
    weights: list[float] | None = None
    combination: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``peftlab.json``: known keys in their order, then the unknown ones."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in data.items() if v is not None}, **self.extra}


def read_run(path: str | Path) -> tuple[RunConfig | None, RunRecord]:
    """A run directory's config and record: the one place ``peftlab.yaml`` and ``peftlab.json`` are read.

    A directory without ``peftlab.yaml`` (a plain peft adapter) gives ``(None, RunRecord())``;
    an unreadable or incomplete pair raises :class:`AdapterError`.
    """
    path = Path(path)
    if not (path / RUN_CONFIG).is_file():
        return None, RunRecord()
    try:
        config = build_config(yaml.safe_load((path / RUN_CONFIG).read_text()))
        data = json.loads((path / RUN_RECORD).read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError) as error:
        raise _unreadable(path, str(error)) from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise _unreadable(path, f"{RUN_RECORD} is not a JSON object with the task's meta")
    return config, RunRecord.from_dict(data)


def _unreadable(path: Path, problem: str) -> AdapterError:
    hint = None if is_full_run(path) else \
        f"delete {RUN_CONFIG} and {RUN_RECORD} to load it as a plain peft adapter"
    return AdapterError(f"peftlab's record in {path} is unreadable: {problem}", hint)


# --- what a directory holds ----------------------------------------------------------------

def is_peftlab_output(path: Path) -> bool:
    """A folder peftlab wrote: a run or a merged model (what --overwrite may replace)."""
    return any((path / name).is_file() for name in PEFTLAB_RECORDS)


def _model_files(directory: Path) -> list[Path]:
    """A saved transformers model's weights: model.safetensors, or its shards (model-00001-of-00003...)."""
    return sorted(directory.glob("model*.safetensors"))


def is_full_run(directory: Path) -> bool:
    """A full fine-tuning run directory: a plain transformers model (no adapter) with peftlab's record."""
    return (directory / "config.json").is_file() and not (directory / ADAPTER_CONFIG).is_file() and bool(
        _model_files(directory))


def weights_bytes(directory: Path) -> int:
    """The size of the run's weights: the adapter file, or the whole model of a full fine-tuning run (0: none)."""
    files = _model_files(directory) if is_full_run(directory) else [directory / ADAPTER_WEIGHTS]
    return sum(f.stat().st_size for f in files if f.is_file())


# --- writing, atomically ---------------------------------------------------------------------

def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work if the output directory would be clobbered or cannot be written."""
    if path.exists() and not path.is_dir():
        raise PeftlabError(f"output_dir {path} is a file, not a directory", "choose another output_dir")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise PeftlabError(f"output directory {path} already exists and is not empty",
                               "choose another output_dir, or pass --overwrite")
        if not is_peftlab_output(path):
            found = listed(sorted(p.name for p in path.iterdir()), limit=4)
            raise PeftlabError(f"output directory {path} holds files peftlab did not write ({found}); "
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
