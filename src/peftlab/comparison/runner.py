"""Running a comparison: each planned run through the normal ``train()``, one row per run.

A row is written to ``OUT/results.json`` as soon as its run ends (temp file, then rename),
so finished runs survive a later failure or Ctrl-C. A failing run records its error in its
row (the traceback beside its folder) and the comparison goes on. Re-running into the same
folder skips runs whose row is finished with the same settings and whose adapter is there.

Each run is evaluated before its first step too (the untrained adapter) and measured with the
machine's load beside it (comparison.measure); the references (comparison.baselines: the majority
class before the runs, the base model without adapter after them) and the verdict
(comparison.verdict) go into results.json with the rows.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from peftlab import artifacts
from peftlab.checkpoint import TrainingInterrupted
from peftlab.comparison import baselines
from peftlab.comparison.display import CompareProgress
from peftlab.comparison.measure import (TIMING_STEPS, MachineLoad, PeakMemory, StepRecorder, release_memory,
                                        time_training, timing_fields)
from peftlab.comparison.plan import PlannedRun, default_learning_rates, plan_runs
from peftlab.comparison.report import assess, write_reports
from peftlab.comparison.verdict import Verdict
from peftlab.config import RunConfig
from peftlab.errors import ConfigError
from peftlab.train import train

RESULTS = "results.json"


@dataclass
class CompareResult:
    """What ``compare()`` produced: one row per run (plan order) and the report files."""

    out_dir: Path
    rows: list[dict[str, Any]]
    ran: list[str]  # names of the runs trained by this call
    skipped: list[str]  # finished earlier, kept
    files: dict[str, Path]  # results.json, results.csv, results.md, report.html
    baselines: dict[str, Any]  # results.json's "baselines": majority, base_model, untrained (where they apply)
    verdict: Verdict | None  # what the comparison says (None: no finished run)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def report(self) -> Path:
        return self.files["html"]


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier comparison in this folder, by run name (none if unreadable)."""
    try:
        return {row["name"]: row for row in json.loads((out_dir / RESULTS).read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _earlier_base_model(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The base model's score from an earlier comparison in this folder, if measured on the same settings."""
    try:
        found = json.loads((out_dir / RESULTS).read_text())["baselines"]["base_model"]
        return found if found.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_finished(row: dict[str, Any] | None, run: PlannedRun) -> bool:
    return (row is not None and row.get("status") == "ok" and row.get("key") == run.key
            and artifacts.weights_bytes(Path(run.config.output_dir)) > 0)


def _run_fields(run: PlannedRun) -> dict[str, Any]:
    return {"name": run.name, "method": run.method, "seed": run.seed, "learning_rate": run.learning_rate,
            "lr_source": run.lr_source, "lr_factor": run.lr_factor, "overrides": list(run.overrides),
            "key": run.key, "run_dir": str(Path("runs") / run.name)}


def _mb(n: int) -> float:
    return round(n / 2 ** 20, 1)


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def train_one(run: PlannedRun, on_event=None, repeat_timing: int = 0,
              experiment: str | None = None) -> dict[str, Any]:
    """Train one run and measure it; the row (status "ok"), or raises what train() raised. ``repeat_timing``: measure
    its throughput again that many times (measure.time_training) after the run; ``experiment``: the trackers'
    experiment / group (training.report_to)."""
    training = run.config.training
    release_memory()
    started = time.perf_counter()
    with MachineLoad() as load, PeakMemory() as peak:
        recorder = StepRecorder(on_event, on_step=peak.step)
        result = train(run.config, overwrite=True, evaluate_before=True, on_event=recorder, experiment=experiment)
    wall = time.perf_counter() - started
    initial = _numbers(result.initial_metrics)
    row = {
        "status": "ok", "error": None, "task": result.task, "main_metric": result.main_metric,
        "main_value": result.metrics.get(result.main_metric),
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "trainable_share": result.trainable_share,
        "peak_memory_mb": _mb(peak.train_bytes), "run_peak_memory_mb": _mb(peak.run_bytes),
        "memory_at_start_mb": _mb(peak.start_bytes), "memory_kind": peak.kind,
        **recorder.throughput(training.batch_size * training.gradient_accumulation_steps),
        "train_seconds": round(result.train_seconds, 2), "wall_seconds": round(wall, 2),
        "steps": recorder.steps, "train_tokens": recorder.tokens, "adapter_bytes": result.adapter_bytes,
        "metrics": _numbers(result.metrics), "initial_metrics": initial,
        "initial_value": initial.get(result.main_metric), **load.record(),
        "loss_curve": recorder.loss_curve,
        "notes": [note for note in result.notes if note.startswith("memory:")],  # what its memory figure holds
    }
    if repeat_timing:
        del result  # the trained model: out of memory before the timing runs load theirs
        steps = max(2, min(row["steps"], TIMING_STEPS))
        try:
            row.update(timing_fields(time_training(run.config, steps, repeat_timing), row))
        except TrainingInterrupted:
            raise
        except Exception as error:  # noqa: BLE001 - the run itself is fine: keep it, say why there are no repeats
            row["timing_error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def _error_log(run: PlannedRun, out_dir: Path) -> Path:
    return out_dir / "runs" / f"{run.name}.error.txt"


def _failed_row(run: PlannedRun, error: Exception, out_dir: Path) -> dict[str, Any]:
    log = _error_log(run, out_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(traceback.format_exception(error)))
    message = f"{type(error).__name__}: {error}".strip()
    return {"status": "failed", "error": message[:1000], "error_log": str(log.relative_to(out_dir))}


def compare(config: RunConfig, *, methods: list[str] | None = None, seeds: list[int] | None = None,
            method_overrides: dict[str, list[str]] | None = None, lr_sweep: int = 1,
            out_dir: str | Path = "runs/compare", progress: bool = True, repeat_timing: int = 0,
            command: list[str] | None = None) -> CompareResult:
    """Train each technique under the same model, data, step budget and seeds; report them side by side.

    Args:
        config: the base run config (model, data, task, training budget).
        methods: technique names; default: every registered technique that supports the task.
        seeds: one run per seed (mean and spread in the report); default: the config's seed.
        method_overrides: dotted ``key=value`` overrides per method name (``"*"``: every method),
            e.g. ``{"prefix": ["training.learning_rate=1e-2"]}``.
        lr_sweep: learning rates per method, on the 1-3-10 ladder around its base rate
            (3 -> x0.3, x1, x3).
        out_dir: the comparison folder: ``runs/<run>/`` adapters, ``results.json`` / ``.csv`` /
            ``.md``, ``report.html``. Finished runs already in it are kept, not retrained. With
            ``training.report_to``, the trackers group the runs as one experiment named after this folder
            (MLflow's experiment, W&B's group).
        progress: show the progress display (stderr).
        repeat_timing: after each run, measure its training throughput again this many times (a few
            training steps each, no evaluation); the table shows the median and the range.
        command: the command line that started the comparison (the CLI passes it), for the verdict's
            "run next" command.

    Returns:
        a :class:`CompareResult`; runs that failed have ``status: "failed"`` and ``error``. Its ``baselines``
        and ``verdict`` say what a model that learned nothing scores and whether the methods beat it.
    """
    if repeat_timing < 0:
        raise ConfigError("--repeat-timing must be 0 (off) or more")
    out_dir = Path(out_dir)
    runs = plan_runs(config, out_dir, methods, seeds, method_overrides, lr_sweep)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = load_rows(out_dir)
    rows: dict[str, dict[str, Any]] = {}
    ran, skipped = [], []
    seed_list = sorted({run.seed for run in runs})
    header = {"base_config": config.to_dict(), "device": device_name(), "lr_sweep": lr_sweep,
              "seeds": seed_list, "default_learning_rates": default_learning_rates(config.task),
              "repeat_timing": repeat_timing, "out_dir": str(out_dir), "command": command,
              "baselines": {}}
    verdict: list[Verdict | None] = [None]

    def save() -> list[dict[str, Any]]:
        ordered = [rows[run.name] for run in runs if run.name in rows]
        summary, verdict[0] = assess(ordered, header)
        write_json_atomic(out_dir / RESULTS, {**header, "baselines": summary.baselines,
                                              "verdict": verdict[0] and verdict[0].to_dict(), "rows": ordered})
        return ordered

    def finish() -> dict[str, Path]:
        ordered = save()
        return write_reports(out_dir, ordered, header) if ordered else {}

    try:
        with CompareProgress(runs, enabled=progress) as display:
            header["baselines"].update(_reference("majority", lambda: baselines.data_baseline(config, seed_list),
                                                  display))
            for run in runs:
                if is_finished(earlier.get(run.name), run):
                    rows[run.name] = earlier[run.name]
                    skipped.append(run.name)
                    display.skipped(run, rows[run.name])
                    continue
                display.start(run)
                try:
                    row = train_one(run, display.on_event, repeat_timing, out_dir.absolute().name)
                    _error_log(run, out_dir).unlink(missing_ok=True)  # from an earlier, failed try
                except TrainingInterrupted:  # Ctrl-C inside train(): the user stops the comparison
                    raise
                except Exception as error:  # noqa: BLE001 - recorded in the row; the comparison goes on
                    row = _failed_row(run, error, out_dir)
                rows[run.name] = {**_run_fields(run), **row,
                                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                ran.append(run.name)
                save()
                display.finish(run, rows[run.name])
            if any(row["status"] == "ok" for row in rows.values()):
                key = baselines.base_model_key(config, seed_list)
                earlier_base = _earlier_base_model(out_dir, key)
                measure = (lambda: earlier_base) if earlier_base else (
                    lambda: baselines.measure_base_model(config, seed_list))
                header["baselines"].update(_reference("base_model", measure, display))
    except BaseException:  # Ctrl-C or a bug: keep what finished, in every output file
        try:
            finish()
        except Exception:  # noqa: BLE001 - never hide the original exception
            pass
        raise
    files = finish()
    final = json.loads((out_dir / RESULTS).read_text())
    return CompareResult(out_dir=out_dir, rows=[rows[run.name] for run in runs], ran=ran, skipped=skipped,
                         files={"json": out_dir / RESULTS, **files}, baselines=final["baselines"], verdict=verdict[0])


def _reference(key: str, measure, display: CompareProgress) -> dict[str, Any]:
    """``{key: measure()}`` with a line on the display; a reference that cannot be had is left out with a note
    (the runs' own failures say more)."""
    try:
        found = measure()
    except Exception as error:  # noqa: BLE001 - a missing reference must not lose the comparison
        display.note(f"[dim]no {key.replace('_', ' ')} baseline:[/dim] {escape(f'{type(error).__name__}: {error}')}")
        return {}
    if found is None:
        return {}
    value = found["metrics"].get(found["metric"])
    display.note(f"[dim]baseline[/dim] {escape(found['name'])}: {found['metric']} "
                 f"{'-' if value is None else format(value, '.4f')} ({escape(found['description'])})")
    return {key: found}
