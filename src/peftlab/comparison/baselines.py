"""What a comparison is read against: the scores of models that learned nothing, and the rules that say
whether a method beat them and whether its run converged.

Three references, each where it applies:

- ``majority``: the data's own baseline, :meth:`peftlab.tasks.base.Task.baseline` (a classifier: the train
  split's most common label for every eval row; label-like generation: its most common answer; a
  regression: the training mean), scored by the family's own metric code. Nothing is loaded or run.
- ``base_model``: the base model without an adapter, for families that generate (a classifier's bare
  base has an untrained head, so its score is noise): a measurement, once per comparison (and per eval
  split, when the seeds carve different ones), on a fresh load of the base in the dtype the config
  loads it in, through the family's ``evaluate``. Kept in results.json and reused by a re-run with
  the same model, data and seeds.
- ``untrained``: each run's evaluation before its first step (``train(evaluate_before=True)``), per
  technique. For techniques that start as the identity (LoRA and its variants, PiSSA / OLoRA, IA3,
  LoHa, LoKr, VeRA, OFT, LN tuning, full fine-tuning) the untrained adapter *is* the base model (a
  classifier's with its new, untrained head); prompt techniques start from random virtual tokens.

The rules (one place, read by the summary, the verdict and the docs):

- a method **beats** a reference when its main metric (mean over seeds) is better by more than
  :func:`margin`: 2 standard errors of a proportion on n eval rows, ``2 * sqrt(p (1 - p) / n)``,
  for accuracy and exact match (p: the reference's score, kept off 0 and 1 as (k + 1) / (n + 2)),
  ``2 / sqrt(n)`` for a correlation (the standard error of r around 0), and 2% of the reference
  for other metrics (ROUGE-L, perplexity, MSE), which have no standard error of their own;
- a run's **loss fell** when the mean of its last training losses is at least 10% below the mean
  of its first ones (windows of a tenth of the steps, 1 to 10 steps); it **rose** when it ended
  10% above, or not finite; else it is **flat** (one step cannot fall).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict
from typing import Any

import torch

from peftlab import placement
from peftlab.config import RunConfig
from peftlab.data import load_splits
from peftlab.model import load_tokenizer, max_positions
from peftlab.tasks import get_task, run_meta
from peftlab.tasks.base import LOWER_IS_BETTER

PROPORTIONS = frozenset({"accuracy", "exact_match"})  # metrics that are a share of eval rows
CORRELATIONS = frozenset({"pearson", "spearman"})
STANDARD_ERRORS = 2  # how far above a reference a method must be to beat it
RELATIVE_MARGIN = 0.02  # other metrics: 2% of the reference
LOSS_DROP = 0.10  # the loss fell: last losses at least 10% below the first ones
EXAMPLES_PER_CLASS = 50  # fewer training examples seen per class than this: "too few steps for the classes"

BASE_NAME = "base model, no adapter"
UNTRAINED_NAME = "untrained adapter"


# --- the rules -----------------------------------------------------------------------------

def margin(metric: str, reference: float, samples: float | None) -> float:
    """How much better than ``reference`` a score must be to beat it (see the module's docstring)."""
    n = int(samples or 0)
    if metric in PROPORTIONS and n > 0:
        p = (reference * n + 1) / (n + 2)
        return STANDARD_ERRORS * math.sqrt(p * (1 - p) / n)
    if metric in CORRELATIONS and n > 0:
        return STANDARD_ERRORS / math.sqrt(n)
    return RELATIVE_MARGIN * abs(reference)


def margin_rule(metric: str) -> str:
    """How :func:`margin` is reckoned for ``metric``, in words."""
    if metric in PROPORTIONS:
        return f"{STANDARD_ERRORS} standard errors of a proportion, {STANDARD_ERRORS}·sqrt(p(1-p)/n)"
    if metric in CORRELATIONS:
        return f"{STANDARD_ERRORS}/sqrt(n), {STANDARD_ERRORS} standard errors of a correlation around 0"
    return f"{RELATIVE_MARGIN:.0%} of the reference"


def beats(value: float | None, reference: float, metric: str, by: float) -> bool:
    """``value`` is better than ``reference`` by more than ``by`` (lower is better for loss, perplexity, MSE)."""
    if value is None or not math.isfinite(value):
        return False
    return value < reference - by if metric in LOWER_IS_BETTER else value > reference + by


def loss_trend(curve: list[list[float]] | None) -> str | None:
    """"fell", "flat" or "rose" for a run's ``[step, loss]`` curve (None without one)."""
    losses = [loss for _, loss in curve or []]
    if not losses:
        return None
    if not all(math.isfinite(loss) for loss in losses):
        return "rose"
    window = max(1, min(10, len(losses) // 10))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    if len(losses) > 1 and last <= (1 - LOSS_DROP) * first:
        return "fell"
    return "rose" if last >= (1 + LOSS_DROP) * first else "flat"


# --- the references ------------------------------------------------------------------------

def _splits_per_eval(config: RunConfig, seeds: list[int]) -> list[tuple[list[int], dict]]:
    """The data splits per distinct eval split: seeds that carve the same one share it."""
    found: dict[str, tuple[list[int], dict]] = {}
    for seed in seeds:
        splits = load_splits(config.data, seed=seed)
        key = splits["eval"]._fingerprint
        found.setdefault(key, ([], splits))[0].append(seed)
    return list(found.values())


def _mean_metrics(measured: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in measured[0] if all(isinstance(m.get(k), (int, float)) for m in measured)]
    return {k: statistics.fmean(m[k] for m in measured) for k in keys}


def data_baseline(config: RunConfig, seeds: list[int]) -> dict[str, Any] | None:
    """The task's own baseline (``Task.baseline``) on the eval split(s) of ``seeds``; None where it has none."""
    task = get_task(config.task)
    found = []
    for _, splits in _splits_per_eval(config, seeds):
        meta = run_meta(task, splits, config)
        found.append((task.main_metric(meta), task.baseline(splits, config.data, meta)))
    if any(baseline is None for _, baseline in found):
        return None
    metric, first = found[0]
    metrics = _mean_metrics([baseline.metrics for _, baseline in found])
    return {"name": first.name, "description": first.description, "metric": metric, "value": metrics.get(metric),
            "samples": metrics.get("samples"), "classes": first.classes, "metrics": metrics,
            **({"per_eval_split": [asdict(b) for _, b in found]} if len(found) > 1 else {})}


def base_model_key(config: RunConfig, seeds: list[int]) -> str:
    """What the base model's score depends on: same key, same measurement."""
    section = get_task(config.task).config_section  # the family's own settings (a preference objective's beta)
    settings = {"model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
                "seeds": sorted(seeds), "eval_batch_size": config.training.eval_batch_size,
                **({section: getattr(config, section).model_dump(mode="json")} if section else {})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def measure_base_model(config: RunConfig, seeds: list[int]) -> dict[str, Any] | None:
    """The base model without an adapter, scored on the eval split(s) by the family's ``evaluate``; None for
    families whose bare base is no reference (a bare classifier's head is untrained: the majority class is its
    reference)."""
    task = get_task(config.task)
    if not task.base_is_reference:
        return None
    tokenizer = load_tokenizer(config.model)
    measured, metric = [], None
    for _, splits in _splits_per_eval(config, seeds):
        meta = run_meta(task, splits, config)
        metric = task.main_metric(meta)
        model = task.load_model(config.model, meta)
        if torch.cuda.is_available() and not placement.uses_placement(config.model) \
                and config.model.quantization == "none":
            model = model.to("cuda")
        max_length = min(config.data.max_length, max_positions(model.config, tokenizer))
        encoded = task.encode(splits["eval"], tokenizer, config.data, meta, max_length, "the eval split")
        measured.append(task.evaluate(model, tokenizer, splits["eval"], encoded, config.data, meta, max_length,
                                      config.training.eval_batch_size))
        del model
    metrics = _mean_metrics(measured)
    return {"name": BASE_NAME, "description": f"{config.model.name} as it is, evaluated as the runs are",
            "metric": metric, "value": metrics.get(metric), "samples": metrics.get("samples"), "metrics": metrics,
            "key": base_model_key(config, seeds)}


def untrained(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each technique's score before its first step (mean over its runs), from the rows."""
    per_method: dict[str, list[float]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("initial_value") is not None:
            per_method.setdefault(row["method"], []).append(row["initial_value"])
    if not per_method:
        return None
    values = {method: statistics.fmean(v) for method, v in per_method.items()}
    return {"name": UNTRAINED_NAME, "description": "each technique before its first training step",
            "metric": next(row["main_metric"] for row in rows if row.get("initial_value") is not None),
            "per_method": values, "low": min(values.values()), "high": max(values.values())}


def reference(baselines: dict[str, Any], metric: str | None) -> dict[str, Any] | None:
    """The reference a method must beat on ``metric``: the stronger of the majority baseline and the base model
    (ties: the majority), with its ``key``, ``value`` on that metric and the ``margin`` to beat it by."""
    candidates = [{**baselines[key], "key": key, "metric": metric, "value": baselines[key]["metrics"][metric]}
                  for key in ("majority", "base_model")
                  if metric and baselines.get(key) and baselines[key]["metrics"].get(metric) is not None]
    if not candidates:
        return None
    sign = -1 if metric in LOWER_IS_BETTER else 1
    best = max(candidates, key=lambda ref: sign * ref["value"])
    return {**best, "margin": margin(metric, best["value"], best.get("samples"))}
