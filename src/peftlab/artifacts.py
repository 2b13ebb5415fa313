"""Writing a run directory: :func:`save_run` (train) and :func:`write_record`, the one writer of ``peftlab.json``.

The layout, the staged (atomic) writing and the record's reader are in :mod:`peftlab.rundir`;
reading adapters and attaching them to a base model in :mod:`peftlab.adapters`. This module
re-exports both, so ``peftlab.artifacts`` stays the one name for run directories.

PiSSA / OLoRA adapters are saved converted (peft's ``path_initial_model_for_weight_conversion``):
a plain LoRA of rank 2r that applies to the original base model. Full fine-tuning (method
``full``) saves the whole model instead of an adapter. The model card (``README.md``,
:mod:`peftlab.card`) is written last, from the files saved before it.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftlab import compat
from peftlab.adapters import (AdapterSource, LoadedAdapter, adapter_shapes, attach, check_base,
                              check_loaded, detach, from_run, load_adapter, load_tokenizer_of, read_adapter,
                              read_peft_config)
from peftlab.card import CARD, write_card
from peftlab.config import RunConfig
from peftlab.model import base_signature, embedding_rows
from peftlab.progress import warn
from peftlab.rundir import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_RECORD, METRICS, MODEL_WEIGHTS,
                            PEFTLAB_RECORDS, RUN_CONFIG, RUN_RECORD, RunRecord, check_output_dir, hardware,
                            is_full_run, is_peftlab_output, library_versions, read_run, remove_stale_staging,
                            staging_dir, weights_bytes, write_json)

__all__ = [  # this module's own, then what it re-exports from rundir and adapters
    "save_run", "write_record", "initial_adapter_state",
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MERGE_RECORD", "METRICS", "MODEL_WEIGHTS", "PEFTLAB_RECORDS", "RUN_CONFIG",
    "RUN_RECORD", "RunRecord", "check_output_dir", "hardware", "is_full_run", "is_peftlab_output", "library_versions",
    "read_run", "remove_stale_staging", "staging_dir", "weights_bytes", "write_json",
    "AdapterSource", "LoadedAdapter", "adapter_shapes", "attach", "check_base", "check_loaded", "detach", "from_run",
    "load_adapter", "load_tokenizer_of", "read_adapter", "read_peft_config",
]


def write_record(directory: Path, record: RunRecord) -> None:
    """Write ``peftlab.json`` (train's :func:`save_run`, ``combine``); :func:`peftlab.rundir.read_run` reads it."""
    write_json(directory / RUN_RECORD, record.to_dict())


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
             config: RunConfig, record: RunRecord, metrics: dict[str, Any],
             state_dict: dict[str, torch.Tensor] | None = None,
             initial_adapter: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter (or, for full fine-tuning, the model), tokenizer, config, record and metrics, then the
    model card from them (:func:`peftlab.card.write_card`; a card that fails is left out, with a warning).

    ``record``: what the run knows of itself (task, method, meta, counts, timing...); the base's
    signature, library versions, the time and the weights' size are added here.
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
    write_record(directory, dataclasses.replace(
        record, base=base_signature(base.config, embedding_rows(base)), versions=library_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), adapter_bytes=weights_bytes(directory)))
    write_json(directory / METRICS, metrics)
    try:  # the card only describes the run: a failure to write it must not lose the trained weights
        write_card(directory, config.output_dir)
    except Exception as error:
        (directory / CARD).unlink(missing_ok=True)  # peft's template, or a card cut short
        warn(f"could not write the model card ({type(error).__name__}: {error}); the run is saved without one")
