"""The progress display across the runs of a comparison (stderr): runs done, the current
run's steps and loss, and one line per finished, failed or skipped run."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peftlab.comparison.plan import PlannedRun
from peftlab.progress import console


def _outcome(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"[red]failed[/red]: {escape(row['error'].splitlines()[0])}"
    before = row.get("initial_value")
    return (f"{row['main_metric']} {row['main_value']:.4f}" + (f" (before training {before:.4f})" if before is not None
                                                               else "")
            + f", {row['trainable_params']:,} trainable, {row['wall_seconds']:.0f} s"
            + (f" [yellow](under load: other processes {row['other_cpu_cores']:.2f} cores)[/yellow]"
               if row.get("under_load") else ""))


class CompareProgress:
    """``with CompareProgress(runs) as display:`` then start / on_event / finish per run."""

    def __init__(self, runs: list[PlannedRun], enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console,
                                  disable=not enabled)
        self._runs = self._progress.add_task("[bold]compare[/bold]", total=len(runs), stats="runs")
        self._steps = self._progress.add_task("", total=None, stats="", visible=False)

    def __enter__(self) -> CompareProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def _line(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line of its own (rich markup), e.g. a baseline."""
        self._line(text)

    def start(self, run: PlannedRun) -> None:
        self._progress.reset(self._steps, total=run.config.training.max_steps, visible=True,
                             description=f"  {run.name} (lr {run.learning_rate:g})", stats="")

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "step":
            self._progress.update(self._steps, completed=data["step"], stats=f"loss {data['loss']:.4f}")
        elif kind == "evaluation":
            shown = ", ".join(f"{k} {v:.4f}" for k, v in data.items()
                              if k not in {"step", "epoch", "samples"} and isinstance(v, float))
            self._line(f"    eval @ step {data['step']}: {escape(shown)}")

    def finish(self, run: PlannedRun, row: dict[str, Any]) -> None:
        self._progress.update(self._steps, visible=False)
        self._progress.advance(self._runs)
        mark = "[green]done[/green]" if row["status"] == "ok" else "[red]x[/red]"
        self._line(f"{mark} {run.name}: {_outcome(row)}")

    def skipped(self, run: PlannedRun, row: dict[str, Any]) -> None:
        self._progress.advance(self._runs)
        self._line(f"[dim]kept[/dim] {run.name} (finished earlier): {_outcome(row)}")
