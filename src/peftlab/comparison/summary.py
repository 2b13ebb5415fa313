"""The rows of a comparison grouped per technique and learning rate (means and spread over seeds):
what the report's tables, notes and figures show."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

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

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "ok"]

    def mean(self, key: str) -> float | None:
        return _mean([row.get(key) for row in self.ok])

    @property
    def spread(self) -> float | None:
        """Sample standard deviation of the main metric over seeds (None with fewer than 2)."""
        values = [row["main_value"] for row in self.ok if row.get("main_value") is not None]
        return statistics.stdev(values) if len(values) > 1 else None

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

    @property
    def lower_is_better(self) -> bool:
        return self.main_metric in LOWER_IS_BETTER


def summarize(rows: list[dict[str, Any]]) -> Summary:
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
    return summary
