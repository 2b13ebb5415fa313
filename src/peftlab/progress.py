"""Progress display for training: a bar with loss and throughput, evaluation lines."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=True)


class TrainingProgress:
    """Counts optimizer steps; shows a running loss and tokens/s."""

    def __init__(self, total_steps: int, enabled: bool = True, completed: int = 0):
        self.enabled = enabled
        self.losses: deque[float] = deque(maxlen=20)
        self.tokens = 0
        self.started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(), console=console, disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=completed, stats="")

    def __enter__(self) -> TrainingProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    @property
    def recent_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def add(self, loss: float, tokens: int, step_done: bool) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        if step_done:
            rate = self.tokens / max(1e-9, time.perf_counter() - self.started)
            self._progress.update(self._task, advance=1, stats=f"loss {self.recent_loss:.4f}  {rate:,.0f} tok/s")

    def log_eval(self, entry: dict[str, Any], main_metric: str) -> None:
        if not self.enabled:
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                          if k not in {"step", "epoch", "samples"} and isinstance(v, float))
        self._progress.console.print(f"  eval @ step {entry['step']} (epoch {entry['epoch']}): {shown}",
                                     soft_wrap=True, highlight=False)


def warn(message: str) -> None:
    """A warning the user should see (e.g. truncated data), on stderr."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)


def note(message: str) -> None:
    """Something the user should know about what happened (e.g. where layers went), on stderr."""
    console.print(f"[dim]note:[/dim] {escape(message)}", soft_wrap=True, highlight=False)
