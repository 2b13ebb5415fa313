"""The report's figures (matplotlib, Agg backend): metric vs trainable parameters (with the references as
dashed lines: majority class, base model without adapter; the untrained adapters as a dotted line or band),
peak memory, throughput and loss curves, one PNG each."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from peftlab.comparison.summary import Group, Summary  # noqa: E402

def _color(summary: Summary, group: Group):
    """One colour per method: tab10 up to 10 methods, tab20 (paired shades) up to 20, then repeats."""
    methods = list(dict.fromkeys(g.method for g in summary.groups))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    return palette[methods.index(group.method) % len(palette)]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


REFERENCE_STYLES = {"majority": "#3b3b3b", "base_model": "#a23b72"}


def reference_lines(summary: Summary, ax) -> int:
    """The references on the main metric's axis: dashed lines (majority class, base model), the untrained adapters
    dotted (a band from the lowest to the highest); returns how many were drawn."""
    drawn = 0
    for key, color in REFERENCE_STYLES.items():
        ref = summary.baselines.get(key)
        value = ((ref or {}).get("metrics") or {}).get(summary.main_metric)
        if value is not None:
            ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{ref['name']}: {value:.4f}")
            drawn += 1
    untrained = summary.baselines.get("untrained")
    if untrained and untrained.get("metric") == summary.main_metric:
        low, high = untrained["low"], untrained["high"]
        if high > low:
            ax.axhspan(low, high, color="#9aa3ad", alpha=0.18, label=f"{untrained['name']}s: {low:.4f}–{high:.4f}")
        else:
            ax.axhline(low, color="#9aa3ad", linestyle=":", linewidth=1.2, label=f"{untrained['name']}: {low:.4f}")
        drawn += 1
    return drawn


def metric_vs_params(summary: Summary, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g in summary.groups:
        y, x = g.mean("main_value"), g.mean("trainable_params")
        if y is None:
            continue
        ax.errorbar(x, y, yerr=g.spread, fmt="o", color=_color(summary, g), capsize=3,
                    markersize=9 if g.best_lr or not summary.sweep else 6)
        ax.annotate(g.label(summary.sweep), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(summary.main_metric or "metric")
    ax.set_title(f"{summary.main_metric} vs trainable parameters" + (" (mean ± sd over seeds)" if summary.seeds > 1
                                                                      else ""))
    ax.grid(alpha=0.3)
    if reference_lines(summary, ax):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, ncol=2)
    return _save(fig, path)


def _bars(summary: Summary, path: Path, panels: list[tuple[str, str]], base_key: str | None = None) -> Path:
    """Horizontal bars per method, one panel per key; with ``base_key`` the part of each bar
    below that value is grey (for memory: what the process held when the run started)."""
    groups = [g for g in summary.groups if g.ok]
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, (0.4 * len(groups) + 1.3) * len(panels)), squeeze=False)
    labels = [g.label(summary.sweep) for g in groups]
    for ax, (key, title) in zip(axes[:, 0], panels):
        values = [g.mean(key) or 0 for g in groups]
        base = [min(g.mean(base_key) or 0, v) for g, v in zip(groups, values)] if base_key else [0] * len(groups)
        ax.barh(labels, [v - b for v, b in zip(values, base)], left=base, color=[_color(summary, g) for g in groups])
        if base_key:
            ax.barh(labels, base, color="#c9ced6", label="held when the run started")
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:,.0f}" if value >= 100 else f" {value:.1f}", va="center", fontsize=8)
        ax.margins(x=0.25)
    fig.tight_layout()
    return _save(fig, path)


def loss_curves(summary: Summary, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g in summary.groups:
        curve = g.loss_curve()
        if not curve or (summary.sweep and not g.best_lr):
            continue
        steps, losses = zip(*curve)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, losses, color=_color(summary, g), alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth, color=_color(summary, g), label=g.label(summary.sweep))
    ax.set_xlabel("optimizer step")
    low, high = ax.dataLim.y0, ax.dataLim.y1
    log = low > 0 and high / low > 10  # early losses 10x the late ones: the late ones stay readable
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("training loss" + (" (log scale)" if log else ""))
    ax.set_title("training loss" + (" (best learning rate per method)" if summary.sweep else "")
                 + (", mean over seeds" if summary.seeds > 1 else ""))
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 16:  # many methods: the legend beside the plot, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8)
    return _save(fig, path)


def draw_all(summary: Summary, folder: Path) -> dict[str, tuple[Path, str]]:
    """Every figure as ``{name: (png path, caption)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    memory_kind = {row.get("memory_kind") for g in summary.groups for row in g.ok}
    memory = ("peak CUDA memory allocated while training (MB)" if memory_kind == {"cuda"}
              else "peak process memory while training, RSS (MB)")
    return {
        "metric": (metric_vs_params(summary, folder / "metric_vs_params.png"),
                   f"{summary.main_metric} against trainable parameters"),
        "memory": (_bars(summary, folder / "memory.png", [("peak_memory_mb", memory)], base_key="memory_at_start_mb"),
                   "peak memory per method"),
        "throughput": (_bars(summary, folder / "throughput.png", [("samples_per_second", "training samples/s"),
                                                                   ("tokens_per_second", "training tokens/s")]),
                       "training throughput per method"),
        "loss": (loss_curves(summary, folder / "loss_curves.png"), "training loss curves (faint: per step, "
                                                                  "bold: moving average)"),
    }
