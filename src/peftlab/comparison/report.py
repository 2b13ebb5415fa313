"""A comparison's outputs: ``results.csv`` (one row per run), the summary table (one row per
method and learning rate, mean and spread over seeds, then the reference rows: majority class, base
model, untrained adapter) as Markdown and in a self-contained HTML report with its figures (also saved
as PNG files under ``figures/``), each opening with the verdict (comparison.verdict)."""

from __future__ import annotations

import base64
import csv
import html
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from peftlab.comparison import plots
from peftlab.comparison.baselines import margin_rule
from peftlab.comparison.measure import LOAD_THRESHOLD
from peftlab.comparison.plan import default_learning_rates
from peftlab.comparison.summary import Group, Summary, summarize
from peftlab.comparison.verdict import Verdict, verdict

CSV_FIELDS = ["name", "method", "seed", "learning_rate", "lr_source", "lr_factor", "overrides", "status", "error",
              "task", "main_metric", "main_value", "trainable_params", "total_params", "trainable_share",
              "peak_memory_mb", "run_peak_memory_mb", "memory_at_start_mb",
              "memory_kind", "samples_per_second", "tokens_per_second", "train_seconds",
              "wall_seconds", "steps", "train_tokens", "adapter_bytes", "initial_value", "other_cpu_cores",
              "own_cpu_cores", "under_load", "load_avg_start", "load_avg_end", "cpus", "run_samples_per_second",
              "run_tokens_per_second", "timing_other_cpu_cores", "timing_under_load", "run_dir", "key", "finished_at"]
NOT_ABOVE = "✗"  # the metric is not above the reference by the margin
UNDER_LOAD = "†"  # measured while other processes kept the machine busy
LR_SOURCES = {"default": "peftlab's default for the technique", "config": "the config's learning rate",
              "override": "a per-method override"}


# --- formatting -------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _megabytes(value: float | None) -> str:
    return human_bytes(None if value is None else value * 1024 ** 2)


def _share(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.3g}%" if value < 0.995 else f"{100 * value:.0f}%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s" if value < 10 else f"{value:,.0f} s"


def _metric(group: Group) -> str:
    mean = group.mean("main_value")
    if mean is None:
        return "failed"
    text = f"{mean:.4f}"
    if group.spread is not None:
        text += f" ± {group.spread:.4f}"
    if len(group.rows) > 1:
        text += f" (n={len(group.ok)}" + (f", {len(group.rows) - len(group.ok)} failed)" if
                                           len(group.ok) < len(group.rows) else ")")
    return text + (f" {NOT_ABOVE}" if group.beats_reference is False else "")


def _speed(group: Group, key: str, digits: int) -> str:
    text = _number(group.mean(key), digits)
    spread = group.range(key)
    if spread:
        text += f" ±{(spread[1] - spread[0]) / 2:,.{digits}f}"
    return text + (f" {UNDER_LOAD}" if group.throughput_under_load else "")


def table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """The summary table as headers and rows of text (Markdown, HTML and the terminal share it); the reference
    rows (:func:`reference_rows`) go below it."""
    memory = {row.get("memory_kind") for g in summary.groups for row in g.ok}
    headers = ["method", "learning rate", (summary.main_metric or "metric") + (" (mean ± sd)" if summary.seeds > 1
                                                                             else ""),
               "trainable params", "share", "peak memory" + (" (CUDA)" if memory == {"cuda"} else " (RSS)"),
               "samples/s", "tokens/s", "wall time", "adapter"]
    body = []
    for g in summary.groups:
        body.append([g.method, f"{g.learning_rate:g}" + (" ★" if g.best_lr else ""), _metric(g),
                     _number(g.mean("trainable_params")), _share(g.mean("trainable_share")),
                     _megabytes(g.mean("peak_memory_mb")),
                     _speed(g, "samples_per_second", 1), _speed(g, "tokens_per_second", 0),
                     _seconds(g.mean("wall_seconds")) + (f" {UNDER_LOAD}" if g.under_load else ""),
                     human_bytes(g.mean("adapter_bytes"))])
    return headers, body


def reference_rows(summary: Summary) -> list[list[str]]:
    """One row per reference (majority class, base model, untrained adapter), in the table's columns: its name and
    its score on the main metric (the untrained adapters: lowest–highest over the techniques)."""
    rows = []
    for key in ("majority", "base_model", "untrained"):
        ref = summary.baselines.get(key)
        if not ref:
            continue
        if key == "untrained":
            low, high = ref["low"], ref["high"]
            value = f"{low:.4f}" if f"{low:.4f}" == f"{high:.4f}" else f"{low:.4f}–{high:.4f}"
        else:
            value = (ref.get("metrics") or {}).get(summary.main_metric)
            value = "-" if value is None else f"{value:.4f}"
        rows.append([ref["name"], "", value] + [""] * 7)
    return rows


def notes(summary: Summary) -> list[str]:
    """What the table does not say: the references, where each learning rate came from, overrides, failures,
    the machine's load."""
    def methods(source: str) -> str:
        return ", ".join(dict.fromkeys(g.method for g in summary.groups if g.lr_source == source))

    lines = []
    for key in ("majority", "base_model", "untrained"):
        ref = summary.baselines.get(key)
        if ref:
            lines.append(f"{ref['name']}: {ref['description']}" + (
                "; " + ", ".join(f"{m} {v:.4f}" for m, v in ref["per_method"].items()) if key == "untrained" else ""))
    ref = summary.reference
    if ref and any(g.beats_reference is False for g in summary.groups):
        lines.append(f"{NOT_ABOVE} not above the {ref['name']} ({summary.main_metric} {ref['value']:.4f}) by more "
                     f"than {ref['margin']:.4f} ({margin_rule(summary.main_metric)} on "
                     f"{int(ref.get('samples') or 0):,} eval rows)")
    lines.append("learning rates: " + "; ".join(f"{LR_SOURCES[source]} for {methods(source)}"
                                                for source in LR_SOURCES if methods(source)))
    task = next((row["task"] for g in summary.groups for row in g.rows if row.get("task")), None)
    lines.append("peftlab's default learning rates: "  # from the registry (MethodSpec.learning_rate)
                 + ", ".join(f"{method} {lr:g}" for method, lr in default_learning_rates(task).items()))
    if summary.sweep:
        lines.append("★ the best learning rate of each method" + (" (lowest)" if summary.lower_is_better else ""))
    overrides = {g.method: g.rows[0]["overrides"] for g in summary.groups if g.rows[0]["overrides"]}
    lines += [f"{method} overrides: {', '.join(items)}" for method, items in overrides.items()]
    lines += [f"{row['name']} failed: {row['error'].splitlines()[0]}"
              for g in summary.groups for row in g.rows if row["status"] != "ok"]
    lines += list(dict.fromkeys(f"{g.method}: {note}" for g in summary.groups for row in g.ok
                                for note in row.get("notes", [])))  # e.g. full fine-tuning's frozen reference
    return lines + load_notes(summary)


def _span(values: list[float], digits: int) -> str:
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}–{high}"


def load_notes(summary: Summary) -> list[str]:
    """The machine's load during the runs, the † footnote and, with --repeat-timing, how speeds were measured."""
    rows = [row for g in summary.groups for row in g.ok]
    cores = [row["other_cpu_cores"] for row in rows if row.get("other_cpu_cores") is not None]
    if not cores:
        return []
    averages = [row[k] for row in rows for k in ("load_avg_start", "load_avg_end") if row.get(k) is not None]
    cpus = next((row["cpus"] for row in rows if row.get("cpus")), None)
    lines = [f"machine load: other processes kept {_span(cores, 2)} cores busy during the runs"
             + (f" (1-minute load average {_span(averages, 1)}" if averages else "")
             + (f", {cpus} CPUs)" if cpus and averages else ")" if averages else "")]
    loaded = [row["name"] + f" {row['other_cpu_cores']:.2f}" for row in rows if row.get("under_load")]
    loaded += [row["name"] + f" (timing) {row['timing_other_cpu_cores']:.2f}" for row in rows
               if row.get("timing_under_load")]
    if loaded:
        lines.append(f"{UNDER_LOAD} measured while other processes kept more than {LOAD_THRESHOLD:g} of a core busy "
                     f"on average ({', '.join(loaded)} cores): those speeds and wall times are not comparable with "
                     "measurements on a quiet machine; measure again on one")
    lines += [f"{row['name']}: no timing repeats ({row['timing_error']})" for row in rows if row.get("timing_error")]
    timed = [row["timing"] for row in rows if row.get("timing")]
    if timed:
        lines.append(f"samples/s and tokens/s: the median of {timed[0]['repeats']} timing repeats of "
                     f"{timed[0]['steps']} training steps per run, ± half their range (the first step of each not "
                     "timed; each repeat, and each run's own figure, in results.json)")
    return lines


def markdown(summary: Summary) -> str:
    headers, body = table(summary)
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in body]
    lines += ["| " + " | ".join([f"*{escape(row[0])}*"] + [escape(cell) for cell in row[1:]]) + " |"
              for row in reference_rows(summary)]
    return "\n".join(lines) + "\n\n" + "".join(f"- {note}\n" for note in notes(summary))


def verdict_markdown(found: Verdict | None) -> str:
    if found is None:
        return ""
    return (f"**{'Verdict' if found.level == 'ok' else 'Warning'}:** {found.headline}\n\n"
            + ("Likely causes:\n\n" + "".join(f"- {cause}\n" for cause in found.causes) + "\n" if found.causes
               else "")
            + (f"Next:\n\n    {found.command}\n\n" if found.command else ""))


def verdict_html(found: Verdict | None) -> str:
    if found is None:
        return ""
    causes = "".join(f"<li>{html.escape(cause)}</li>" for cause in found.causes)
    return (f'<div class="verdict {found.level}"><p><strong>{"Verdict" if found.level == "ok" else "Warning"}:'
            f"</strong> {html.escape(found.headline)}</p>"
            + (f"<p>Likely causes:</p><ul>{causes}</ul>" if causes else "")
            + (f"<p>Next:</p><pre>{html.escape(found.command)}</pre>" if found.command else "") + "</div>")


def assess(rows: list[dict[str, Any]], header: dict[str, Any]) -> tuple[Summary, Verdict | None]:
    """The summary (with the references: header["baselines"] and the untrained adapters of the rows) and the
    verdict: what results.json, the report and the terminal say."""
    summary = summarize(rows, header.get("baselines"))
    return summary, verdict(summary, header)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    metrics = sorted({k for row in rows for k in row.get("metrics") or {}})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS + [f"metric_{m}" for m in metrics])
        for row in rows:
            cells = ["; ".join(row[k]) if k == "overrides" else row.get(k) for k in CSV_FIELDS]
            writer.writerow(["" if c is None else c for c in cells]
                            + [(row.get("metrics") or {}).get(m, "") for m in metrics])


# --- the HTML report --------------------------------------------------------------------

def describe_setup(header: dict[str, Any]) -> list[tuple[str, str]]:
    config = header["base_config"]
    data, training = config["data"], config["training"]
    source = data.get("builtin") or data.get("dataset") or data.get("train_file")
    budget = (f"{training['max_steps']} steps" if training.get("max_steps") else f"{training['epochs']:g} epochs")
    return [("model", config["model"]["name"]), ("task", config["task"]), ("data", str(source)),
            ("budget", f"{budget} of batch {training['batch_size']}"
                       + (f" x {training['gradient_accumulation_steps']}" if training["gradient_accumulation_steps"] > 1
                          else "") + f", max_length {data['max_length']}"),
            ("seeds", ", ".join(map(str, header["seeds"]))), ("device", header["device"])]


def _html_table(headers: list[str], body: list[list[str]], classes: list[str]) -> str:
    """A table; ``classes`` gives each body row's CSS class ("best", "failed", "reference" or "")."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join(f'<tr class="{css}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row, css in zip(body, classes))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _load(row: dict[str, Any]) -> str:
    if row.get("other_cpu_cores") is None:
        return "-"
    return f"{row['other_cpu_cores']:.2f}" + (f" {UNDER_LOAD}" if row.get("under_load") else "")


def _runs_table(rows: list[dict[str, Any]]) -> str:
    headers = ["run", "seed", "learning rate", "status", "main metric", "before training", "steps", "train time",
               "other processes (cores)", "overrides / error"]
    body = [[row["name"], str(row["seed"]), f"{row['learning_rate']:g}", row["status"],
             "-" if row.get("main_value") is None else f"{row['main_metric']} {row['main_value']:.4f}",
             "-" if row.get("initial_value") is None else f"{row['initial_value']:.4f}",
             _number(row.get("steps")), _seconds(row.get("train_seconds")), _load(row),
             row.get("error") or "; ".join(row["overrides"])] for row in rows]
    return _html_table(headers, body, ["failed" if row["status"] != "ok" else "" for row in rows])


def write_reports(out_dir: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Path]:
    """results.csv, results.md, figures/*.png and report.html; returns their paths."""
    summary, found = assess(rows, header)
    files = {"csv": out_dir / "results.csv", "markdown": out_dir / "results.md", "html": out_dir / "report.html"}
    write_csv(files["csv"], rows)
    setup = describe_setup(header)
    files["markdown"].write_text("# peftlab comparison\n\n" + verdict_markdown(found)
                                 + "".join(f"- {k}: {v}\n" for k, v in setup) + "\n" + markdown(summary))
    figures = plots.draw_all(summary, out_dir / "figures")
    files.update({f"figure_{name}": path for name, (path, _) in figures.items()})
    headers, body = table(summary)
    page = Template(resources.files("peftlab.comparison").joinpath("report.html").read_text()).substitute(
        title=html.escape(f"peftlab comparison: {header['base_config']['model']['name']}, "
                          f"{header['base_config']['task']}"),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        setup="".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in setup),
        verdict=verdict_html(found),
        summary=_html_table(headers, body + reference_rows(summary),
                            ["best" if g.best_lr else "" for g in summary.groups]
                            + ["reference"] * len(reference_rows(summary))),
        notes="".join(f"<li>{html.escape(n)}</li>" for n in notes(summary)),
        figures="".join(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}'
                        f"</figcaption></figure>" for path, caption in figures.values()),
        runs=_runs_table(rows),
    )
    files["html"].write_text(page)
    return files

