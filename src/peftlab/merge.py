"""Merging an adapter into its base, and combining adapters into one.

``merge`` folds a weight adapter (LoRA and its variants, IA3, LoHa, LoKr, VeRA, OFT,
AdaLoRA, LN tuning, BitFit: every technique the registry marks ``mergeable``) into
the base weights and saves a plain transformers model:
safetensors, config (for classification: the run's labels and the trained head) and
tokenizer, loadable with ``AutoModelFor...from_pretrained`` and no peft at all.
Prompt-learning techniques add virtual tokens rather than weights: they cannot be merged.

``combine`` is peft's adapter arithmetic (``add_weighted_adapter``): a weighted sum of
adapters trained with the same technique on the same base, for the same task, saved as a
normal adapter directory.

Both write a model card (``README.md``, :mod:`peftlab.card`) that says what their output was made from.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers.utils import logging as hf_logging

from peftlab import compat
from peftlab.adapters import adapter_shapes, attach, load_adapter, read_adapter, read_peft_config
from peftlab.artifacts import write_record
from peftlab.card import write_card
from peftlab.errors import AdapterError, PeftlabError
from peftlab.methods import METHODS, spec_for_peft_type
from peftlab.progress import warn
from peftlab.tasks.base import output_scores
from peftlab.rundir import (MERGE_RECORD, RUN_CONFIG, check_output_dir, is_full_run, library_versions, read_run,
                            staging_dir, weights_bytes, write_json)

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune")


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    max_abs_diff: float  # largest logit difference, adapter vs merged model, on a probe input


def _technique(model: PeftModel) -> str:
    return str(getattr(model.active_peft_config.peft_type, "value", model.active_peft_config.peft_type))


def _probe_inputs(tokenizer, model) -> dict[str, torch.Tensor]:
    batch = dict(tokenizer(["peftlab merge check: the quick brown fox", "a second, shorter probe"],
                           padding=True, return_tensors="pt"))
    if "token_type_ids" not in _forward_params(model):
        batch.pop("token_type_ids", None)
    if getattr(model.config, "is_encoder_decoder", False):
        start = model.config.decoder_start_token_id or 0
        batch["decoder_input_ids"] = torch.full((batch["input_ids"].shape[0], 3), start, dtype=torch.long)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return output_scores(model(**batch)).float().cpu()


def merge(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None,
          overwrite: bool = False) -> MergeResult:
    """Fold the adapter in ``adapter_dir`` into its base and save a plain transformers model in ``out_dir``.

    The merged model's logits are checked against the adapter model's on a probe input
    before anything is written (float32 bases: must agree to 1e-4).
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    if is_full_run(Path(adapter_dir)):
        raise AdapterError(f"{adapter_dir} is a full fine-tuning run: it is already a plain transformers model, "
                           "there is no adapter to fold in", "load it directly with AutoModelFor...from_pretrained "
                           "(or peftlab eval / predict)")
    # a QLoRA adapter merges into the unquantized base (merging into 4-bit weights would round the update away)
    loaded = load_adapter(adapter_dir, base=base, model_options={"quantization": "none"})
    model, technique = loaded.model, _technique(loaded.model)
    # the registry's flag decides (a plain-peft adapter: the technique of its peft type); for a peft type peftlab
    # does not register, what peft offers
    spec = METHODS.get(loaded.record.method or "") or spec_for_peft_type(model.active_peft_config.peft_type)
    prompt_learning = spec.prompt_learning if spec else model.active_peft_config.is_prompt_learning
    if prompt_learning and not (spec and spec.mergeable):
        raise AdapterError(f"{adapter_dir} is a {technique} adapter (prompt learning): it adds virtual tokens, not "
                           "weights, so there is nothing to fold into the base model",
                           "serve it as an adapter (peftlab predict), or train LoRA / IA3 to get a mergeable one")
    if spec is not None and not spec.mergeable:
        raise AdapterError(f"{adapter_dir} is a {spec.name} adapter ({technique}): {spec.title} is not mergeable "
                           "(peftlab methods lists which techniques are)",
                           "serve it as an adapter (peftlab predict), or train LoRA / IA3 to get a mergeable one")
    if spec is None and not hasattr(model.base_model, "merge_and_unload"):
        raise AdapterError(f"peft cannot merge {technique} adapters into their base model")
    batch = _probe_inputs(loaded.tokenizer, model)
    expected = _logits(model, batch)
    try:
        compat.unwrap_modules_to_save(model)  # the trained head stays; see compat.py
        merged = model.merge_and_unload()
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise AdapterError(f"peft could not merge {adapter_dir}: {str(error).splitlines()[0]}") from None
    diff = float((_logits(merged, batch) - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if diff > 1e-4 * max(1.0, scale):
        message = f"the merged model's outputs differ from the adapter's by up to {diff:.3g}"
        if next(merged.parameters()).dtype == torch.float32:
            raise PeftlabError(message + "; nothing was written", "please report this with the adapter's method")
        warn(message + f" (rounding of the {next(merged.parameters()).dtype} base weights)")
    record = {"merged_from": str(Path(adapter_dir).resolve()), "method": loaded.record.method or technique,
              "task": loaded.task.name, "base": loaded.model_config.name, "max_abs_diff": diff,
              "versions": library_versions()}
    with staging_dir(out, overwrite) as staging:
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar
        try:
            merged.save_pretrained(str(staging), safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        loaded.tokenizer.save_pretrained(str(staging))
        write_json(staging / MERGE_RECORD, record)
        write_card(staging, out)
    return MergeResult(output_dir=out, method=record["method"], max_abs_diff=diff)


# --- combining adapters ------------------------------------------------------------------

def _describe(path: Path) -> dict[str, Any]:
    """What must agree between adapters that are combined."""
    config = read_peft_config(path)
    adapter_shapes(path)  # a readable safetensors file
    run, record = read_run(path)
    return {
        "base": run.model.name if run else config.base_model_name_or_path,
        "technique": str(getattr(config.peft_type, "value", config.peft_type)),
        "task": str(getattr(config.task_type, "value", config.task_type)),
        "labels": record.meta.get("labels"),
        "signature": record.base,
        "modules_to_save": sorted(config.modules_to_save or []),
    }


def combine(adapter_dirs: Sequence[str | Path], out_dir: str | Path, *, weights: Sequence[float] | None = None,
            combination: str = "linear", density: float | None = None, svd_rank: int | None = None,
            base: str | None = None, overwrite: bool = False) -> Path:
    """A weighted combination of adapters (peft's ``add_weighted_adapter``), saved as one adapter directory.

    All adapters must share the base model, technique (LoRA or IA3) and task. ``combination``:
    ``linear`` (same rank; weighted sum of the A and B matrices), ``cat`` (ranks concatenated:
    exactly the weighted sum of the updates), ``svd`` and peft's TIES / DARE variants (LoRA only).
    """
    paths = [Path(p) for p in adapter_dirs]
    out = Path(out_dir)
    if len(paths) < 2:
        raise PeftlabError("combine needs at least two adapters")
    weights = list(weights) if weights is not None else [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths):
        raise PeftlabError(f"{len(paths)} adapters but {len(weights)} weights", "give one weight per adapter")
    if combination not in COMBINATIONS:
        raise PeftlabError(f'unknown combination "{combination}"', f"known: {', '.join(COMBINATIONS)}")
    check_output_dir(out, overwrite)
    for path in paths:
        if not path.is_dir():
            raise AdapterError(f"adapter directory not found: {path}")
        if is_full_run(path):
            raise AdapterError(f"{path} is a full fine-tuning run, not an adapter: it cannot be combined",
                               "combine LoRA or IA3 adapters")
    infos = [_describe(p) for p in paths]
    first = infos[0]
    for path, info in zip(paths[1:], infos[1:]):
        for key, what in (("technique", "technique"), ("task", "task"), ("base", "base model"),
                          ("labels", "labels")):
            if info[key] != first[key]:
                raise AdapterError(f"{paths[0]} and {path} cannot be combined: their {what} differs "
                                   f"({first[key]} vs {info[key]})",
                                   "combine adapters trained with the same technique on the same base for the same "
                                   "task")
    if first["technique"] not in {"LORA", "IA3"}:
        raise AdapterError(f"peft combines LoRA and IA3 adapters, not {first['technique']}")
    if first["technique"] == "IA3" and combination != "linear":
        raise AdapterError(f'IA3 adapters combine only linearly, not with "{combination}"', "use combination=linear")
    if first["modules_to_save"]:
        raise AdapterError(f"these adapters each train their own {', '.join(first['modules_to_save'])} "
                           "(modules_to_save, e.g. a classification head): peft cannot add such modules, so they "
                           "cannot be combined", "combine generative (seq2seq / causal-lm) LoRA or IA3 adapters")

    loaded = load_adapter(paths[0], base=base)
    model: PeftModel = loaded.model
    names = ["default"]
    for i, path in enumerate(paths[1:], start=1):
        names.append(f"adapter_{i}")
        attach(model, read_adapter(path, base=base), names[-1])
    kwargs: dict[str, Any] = {}
    if first["technique"] == "LORA":
        kwargs["combination_type"] = combination
        if density is not None:
            kwargs["density"] = density
        if svd_rank is not None:
            kwargs["svd_rank"] = svd_rank
    try:
        model.add_weighted_adapter(names, weights, "combined", **kwargs)
    except (ValueError, TypeError) as error:
        raise AdapterError(f"peft could not combine the adapters: {str(error).splitlines()[0]}",
                           'adapters of different ranks combine with combination="cat" or "svd"') from None
    model.set_adapter("combined")
    for name in names:
        model.delete_adapter(name)

    with staging_dir(out, overwrite) as staging:
        model.save_pretrained(str(staging / "_peft"), safe_serialization=True)
        saved = staging / "_peft" / "combined"  # peft saves a named adapter in its own folder
        for file in saved.iterdir():
            file.rename(staging / file.name)
        shutil.rmtree(staging / "_peft")
        loaded.tokenizer.save_pretrained(str(staging))
        if loaded.config is not None:  # peftlab's record: the first adapter's run, noted as a combination
            shutil.copy(paths[0] / RUN_CONFIG, staging / RUN_CONFIG)
            write_record(staging, dataclasses.replace(
                loaded.record, combined_from=[str(p.resolve()) for p in paths], weights=weights,
                combination=combination, adapter_bytes=weights_bytes(staging)))
            write_card(staging, out)
    return out
