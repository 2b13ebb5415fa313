"""Which runs a comparison makes: techniques x seeds x learning rates, each a full RunConfig.

Every run starts from the same base config (model, data, step budget); only the technique,
the seed, the learning rate and the user's per-method overrides differ. A run is identified
by its resolved config (output directory and progress display left out), so a re-run can
tell finished runs from changed ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.config import RunConfig, apply_overrides
from peftlab.recipe import build_config
from peftlab.errors import ConfigError
from peftlab.methods import METHODS, get_method


# Learning rates for when neither the per-method overrides nor the config set one: the method spec carries them
# (MethodSpec.learning_rate / task_learning_rates in methods.py; docs/compare.md gives the reasons).
class _RegistryRates(Mapping[str, float]):
    """Every registered technique's default learning rate, read from the registry (``MethodSpec.learning_rate``,
    the rate for task families without one of their own): a live view, so a technique registered later is in it."""

    def __getitem__(self, method: str) -> float:
        return METHODS[method].learning_rate

    def __iter__(self) -> Iterator[str]:
        return iter(list(METHODS))

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return repr(dict(self))


DEFAULT_LEARNING_RATES: Mapping[str, float] = _RegistryRates()  # exported (peftlab.comparison)

LR_KEY = "training.learning_rate"
ALL_METHODS = "*"  # a per-method override for every method


def default_learning_rate(method: str, task: str | None = None) -> float:
    """The technique's default rate (its task family's own where the spec has one)."""
    spec = get_method(method)
    return spec.learning_rate_for(task) if task else spec.learning_rate


def default_learning_rates(task: str | None) -> dict[str, float]:
    """Every registered technique's default rate for ``task`` (the run record's and the report's list; None: the
    techniques' general rates)."""
    return {name: spec.learning_rate_for(task) for name, spec in METHODS.items()}


def sweep_factors(points: int) -> list[float]:
    """``points`` learning-rate factors on the 1-3-10 ladder around 1: 3 -> [0.3, 1, 3]."""
    if points < 1:
        raise ConfigError("--lr-sweep needs at least 1 point")
    ladder = range(-((points - 1) // 2), points // 2 + 1)
    return [_round(10 ** (k // 2) * (3 if k % 2 else 1)) for k in ladder]


def _round(value: float) -> float:
    """Three significant digits (3e-4 x 0.3 = 9e-05, not 8.999999e-05)."""
    return float(f"{value:.3g}")


def parse_method_overrides(items: list[str]) -> dict[str, list[str]]:
    """``["prefix:training.learning_rate=1e-2", "*:training.max_steps=50"]`` -> {method: [key=value]}."""
    parsed: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or "=" not in override or not method.strip():
            raise ConfigError(f'per-method override "{item}" is not METHOD:key=value',
                              "e.g. --set-method prefix:training.learning_rate=1e-2 (METHOD * = every method)")
        method = method.strip()
        if method != ALL_METHODS:
            get_method(method)  # unknown method -> error with "did you mean"
        parsed.setdefault(method, []).append(override.strip())
    return parsed


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a comparison."""

    name: str  # also the folder under OUT/runs
    method: str
    seed: int
    learning_rate: float
    lr_source: str  # "override", "config" or "default"
    lr_factor: float  # the sweep factor (1 without a sweep)
    overrides: tuple[str, ...]
    config: RunConfig

    @property
    def key(self) -> str:
        """Identifies the run's settings: same key, same training."""
        settings = self.config.to_dict()
        settings.pop("output_dir")
        settings["training"].pop("progress")
        # trackers do not change training: report_to is left out, and the key reads as before it existed
        # (training.tensorboard: false), so a comparison folder of an earlier version keeps its finished runs
        settings["training"].pop("report_to", None)
        settings["training"]["tensorboard"] = False
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def methods_for(config: RunConfig, methods: list[str] | None) -> list[str]:
    """The requested techniques (checked), or every registered one that fits the task."""
    if not methods:
        return [name for name, spec in METHODS.items() if config.task in spec.tasks]
    for name in methods:
        get_method(name).check_task(config.task)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods names a technique twice: {', '.join(methods)}")
    return list(methods)


def _validated(raw: dict[str, Any], method: str) -> RunConfig:
    try:
        return build_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{method}: {error.message}", error.hint) from None


def _base_lr(config: RunConfig, method_config: RunConfig, overrides: list[str]) -> tuple[float, str]:
    if any(item.split("=", 1)[0].strip() == LR_KEY for item in overrides):
        return method_config.training.learning_rate, "override"
    if method_config.method.name == config.method.name and "learning_rate" in config.training.model_fields_set:
        return config.training.learning_rate, "config"
    return default_learning_rate(method_config.method.name, method_config.task), "default"


def plan_runs(config: RunConfig, out_dir: Path, methods: list[str] | None = None, seeds: list[int] | None = None,
              method_overrides: dict[str, list[str]] | None = None, lr_sweep: int = 1) -> list[PlannedRun]:
    """Every run of the comparison, in order: method, then learning rate, then seed.

    The config's own method keeps its ``method.options`` and (when the config sets one) its
    learning rate; other methods start from their defaults. Overrides apply in order: the
    ``*`` ones, then the method's own.
    """
    method_overrides = method_overrides or {}
    seeds = list(seeds) if seeds else [config.training.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds names a seed twice: {seeds}")
    factors = sweep_factors(lr_sweep)
    runs = []
    for method in methods_for(config, methods):
        overrides = method_overrides.get(ALL_METHODS, []) + method_overrides.get(method, [])
        raw = config.to_dict()
        raw["method"] = {"name": method, "options": raw["method"]["options"] if method == config.method.name else {}}
        method_config = _validated(apply_overrides(raw, overrides), method)
        base_lr, source = _base_lr(config, method_config, overrides)
        for factor in factors:
            lr = _round(base_lr * factor)
            for seed in seeds:
                name = f"{method}-seed{seed}" + (f"-lr{lr:g}" if lr_sweep > 1 else "")
                run_raw = method_config.to_dict()
                run_raw["training"].update(learning_rate=lr, seed=seed, progress=False)
                run_raw["output_dir"] = str(out_dir / "runs" / name)
                runs.append(PlannedRun(name=name, method=method, seed=seed, learning_rate=lr, lr_source=source,
                                       lr_factor=factor, overrides=tuple(overrides),
                                       config=_validated(run_raw, method)))
    return runs


def parse_list(text: str | None, what: str) -> list[str] | None:
    """``"lora, ia3"`` -> ["lora", "ia3"]; None or empty -> None."""
    if not text:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{what} is empty")
    return items


def parse_seeds(text: str | None) -> list[int] | None:
    items = parse_list(text, "--seeds")
    try:
        return [int(item) for item in items] if items else None
    except ValueError:
        raise ConfigError(f'--seeds "{text}" is not a comma-separated list of integers', "e.g. --seeds 0,1,2") from None
