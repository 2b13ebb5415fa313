"""The rows of a comparison grouped per technique and learning rate (means and spread over seeds), with the
references they are read against (comparison.baselines): what the report's tables, notes and figures show."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from peftlab.comparison import baselines as rules
from peftlab.tasks.base import LOWER_IS_BETTER


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


@dataclass
class Group:
    """The runs of one method at one learning rate (one per seed)."""

    method: str
    learning_rate: float
    lr_source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_lr: bool = False  # the best learning rate of its method (with a sweep)
    beats_reference: bool | None = None  # better than the reference by more than the margin (None: no reference)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ok"]

    def mean(self, key: str) -> float | None:
        return _mean([row.get(key) for row in self.ok])

    def mean_metric(self, key: str) -> float | None:
        """The mean of one of the runs' metrics (``row["metrics"][key]``)."""
        return _mean([(row.get("metrics") or {}).get(key) for row in self.ok])

    @property
    def spread(self) -> float | None:
        """Sample standard deviation of the main metric over seeds (None with fewer than 2)."""
        values = [row["main_value"] for row in self.ok if row.get("main_value") is not None]
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def under_load(self) -> bool:
        """A run's wall time was measured while other processes kept the machine busy."""
        return any(row.get("under_load") for row in self.ok)

    @property
    def throughput_under_load(self) -> bool:
        """The throughput shown was measured under load (the repeats' where there are, else the run's)."""
        return any(row.get("timing_under_load") if row.get("timing") else row.get("under_load") for row in self.ok)

    def range(self, key: str) -> tuple[float, float] | None:
        """The lowest and highest of ``key``'s ranges over the runs (``samples_per_second_range``, ...)."""
        ranges = [row[f"{key}_range"] for row in self.ok if row.get(f"{key}_range")]
        return (min(low for low, _ in ranges), max(high for _, high in ranges)) if ranges else None

    def loss_trends(self) -> list[str | None]:
        return [rules.loss_trend(row.get("loss_curve")) for row in self.ok]

    def label(self, with_lr: bool) -> str:
        return f"{self.method} lr {self.learning_rate:g}" if with_lr else self.method

    def loss_curve(self) -> list[tuple[int, float]]:
        """The loss per step, averaged over seeds."""
        by_step: dict[int, list[float]] = {}
        for row in self.ok:
            for step, loss in row.get("loss_curve") or []:
                by_step.setdefault(step, []).append(loss)
        return [(step, statistics.fmean(losses)) for step, losses in sorted(by_step.items())]


@dataclass
class Summary:
    groups: list[Group]
    main_metric: str | None
    sweep: bool  # several learning rates per method
    seeds: int
    baselines: dict[str, Any] = field(default_factory=dict)  # results.json's "baselines"
    reference: dict[str, Any] | None = None  # the one a method must beat (majority or base model), with "margin"

    @property
    def lower_is_better(self) -> bool:
        return self.main_metric in LOWER_IS_BETTER


def summarize(rows: list[dict[str, Any]], baselines: dict[str, Any] | None = None) -> Summary:
    groups: dict[tuple, Group] = {}
    for row in rows:
        key = (row["method"], row["learning_rate"])
        groups.setdefault(key, Group(row["method"], row["learning_rate"], row["lr_source"])).rows.append(row)
    metric = next((row["main_metric"] for row in rows if row["status"] == "ok"), None)
    summary = Summary(list(groups.values()), metric, sweep=len(groups) > len({g.method for g in groups.values()}),
                      seeds=max((len(g.rows) for g in groups.values()), default=0))
    if summary.sweep:
        sign = -1 if summary.lower_is_better else 1
        for method in {g.method for g in summary.groups}:
            scored = [g for g in summary.groups if g.method == method and g.mean("main_value") is not None]
            if scored:
                max(scored, key=lambda g: sign * g.mean("main_value")).best_lr = True
    untrained = rules.untrained(rows)
    summary.baselines = {**(baselines or {}), **({"untrained": untrained} if untrained else {})}
    summary.reference = ref = rules.reference(summary.baselines, metric)
    for g in summary.groups:
        if ref and g.ok:
            g.beats_reference = rules.beats(g.mean("main_value"), ref["value"], metric, ref["margin"])
    return summary
