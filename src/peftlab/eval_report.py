"""A classifier's evaluation by class (``peftlab eval --report``): where the errors are, not just how many.

:func:`classification_report` scores a saved classifier on its run's split (or a file) as
:func:`peftlab.inference.evaluate` does, and adds per-class precision / recall / F1 / support,
their macro and weighted averages and the confusion matrix (scikit-learn's
``precision_recall_fscore_support`` and ``confusion_matrix`` over the same predictions). It writes
them beside the run, each file written under a temporary name and renamed into place:

    RUN_DIR/reports/<split, or the file's name>/report.json          the report (ClassificationReport.to_dict())
    RUN_DIR/reports/<split, or the file's name>/confusion_matrix.png  counts, coloured by the share of each true class

Generative families have no classes to report: asking is a ConfigError, before any model loads
for a peftlab run.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from peftlab.adapters import load_adapter  # noqa: E402
from peftlab.errors import ConfigError, PeftlabError  # noqa: E402
from peftlab.inference import evaluation_inputs  # noqa: E402
from peftlab.rundir import read_run  # noqa: E402
from peftlab.tasks import get_task  # noqa: E402

REPORT_DIR = "reports"  # inside the run directory
REPORT_JSON = "report.json"
CONFUSION_PNG = "confusion_matrix.png"
ANNOTATED_CLASSES = 30  # cells carry their counts up to this many classes


@dataclass
class ClassScores:
    """One class: precision, recall and F1 of it against the rest, and its rows in the data (support)."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationReport:
    """Per-class figures of a classifier on one split or file (``peftlab eval --report``)."""

    source: str  # "eval split", "test split" or the file evaluated
    labels: list[str]  # the head's labels, in order (the confusion matrix's rows and columns)
    classes: list[ClassScores]  # one per label, labels without rows included (support 0)
    macro: dict[str, float]  # precision / recall / f1: unweighted mean over the labels in the data or predictions
    weighted: dict[str, float]  # the same, weighted by support
    accuracy: float
    samples: int
    confusion: list[list[int]]  # [true label][predicted label] -> rows
    metrics: dict[str, float]  # what `peftlab eval` reports on the same rows (loss, accuracy, f1_*, mcc)
    positive_label: str | None  # two labels: the class f1_binary is the F1 of (the second label)
    files: dict[str, str] = field(default_factory=dict)  # "json" / "png" -> where they were written

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_report(labels: list[str], gold: Any, pred: Any, metrics: dict[str, float],
                 source: str) -> ClassificationReport:
    """The report of gold and predicted label ids (indices into ``labels``)."""
    gold, pred = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    every = list(range(len(labels)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(gold, pred, labels=every, zero_division=0)
    present = sorted(set(gold.tolist()) | set(pred.tolist()))  # scikit-learn's default for averages (as f1_macro)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(gold, pred, labels=present, average=average,
                                                         zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    classes = [ClassScores(label, float(p), float(r), float(f), int(s))
               for label, p, r, f, s in zip(labels, precision, recall, f1, support)]
    confusion = skm.confusion_matrix(gold, pred, labels=every).tolist()
    return ClassificationReport(source=source, labels=list(labels), classes=classes, macro=averages["macro"],
                                weighted=averages["weighted"], accuracy=float(skm.accuracy_score(gold, pred)),
                                samples=int(len(gold)), confusion=confusion, metrics=dict(metrics),
                                positive_label=labels[1] if len(labels) == 2 else None)


def _not_a_classifier(path: Any, task_name: str) -> ConfigError:
    return ConfigError(f"--report gives per-class precision, recall and F1 of a classifier; {path} is a {task_name} "
                       "run, which generates text",
                       "its metrics are those of peftlab eval without --report")


def classification_report(adapter_dir: str | Path, *, data: str | None = None, split: str = "eval",
                          overrides: list[str] | None = None, base: str | None = None, batch_size: int = 64,
                          device: str | None = None, model_options: dict[str, Any] | None = None,
                          output_dir: str | Path | None = None, write: bool = True) -> ClassificationReport:
    """Per-class precision / recall / F1 / support and the confusion matrix of a saved classifier.

    Evaluates as :func:`peftlab.evaluate` does (same arguments; the report's ``metrics`` are its
    result) and, with ``write``, saves ``report.json`` and ``confusion_matrix.png`` in ``output_dir``
    (default: ``RUN_DIR/reports/<split or the file's name>/``). A generative run, or a regression, raises
    a ConfigError.
    """
    config, _ = read_run(adapter_dir) if Path(adapter_dir).is_dir() else (None, None)
    if config is not None and not get_task(config.task).classifies:  # before any model loads
        raise _not_a_classifier(adapter_dir, config.task)
    loaded = load_adapter(adapter_dir, base=base, device=device, model_options=model_options)
    if not loaded.task.classifies:
        raise _not_a_classifier(adapter_dir, loaded.task.name)
    inputs = evaluation_inputs(loaded, data=data, split=split, overrides=overrides)
    metrics, gold, pred = loaded.task.label_outcomes(loaded.model, loaded.tokenizer, inputs.raw, inputs.encoded,
                                                     inputs.data, loaded.meta, batch_size)
    report = build_report(loaded.task.labels(loaded.meta), gold, pred, metrics,
                          f"{split} split" if data is None else str(data))
    if write:
        where = Path(output_dir) if output_dir else Path(adapter_dir) / REPORT_DIR / (Path(data).name if data
                                                                                      else split)
        write_report(report, where)
    return report


def write_report(report: ClassificationReport, directory: str | Path) -> dict[str, str]:
    """``report.json`` and ``confusion_matrix.png`` in ``directory`` (each renamed into place); their paths."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        report.files = {"json": str(directory / REPORT_JSON), "png": str(directory / CONFUSION_PNG)}
        _atomic(directory / CONFUSION_PNG, lambda tmp: confusion_figure(report, tmp))
        _atomic(directory / REPORT_JSON,
                lambda tmp: tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"))
    except OSError as error:
        raise PeftlabError(f"cannot write the report to {directory}: {error.strerror or error}",
                           "pass --report-dir DIR (a folder you can write to)") from None
    return report.files


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def confusion_figure(report: ClassificationReport, path: str | Path) -> None:
    """The confusion matrix as a PNG: rows true labels, columns predicted; colour = share of the true class."""
    counts = np.asarray(report.confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(report.labels)
    side = min(4.0 + 0.55 * n, 24.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    names = [label if len(label) <= 20 else label[:19] + "…" for label in report.labels]
    ax.set_xticks(range(n), names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"confusion matrix, {report.source}: {report.samples} rows, accuracy {report.accuracy:.3f}")
    if n <= ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(counts[i, j])}\n{100 * shares[i, j]:.0f}%", ha="center", va="center",
                        fontsize=9 if n <= 10 else 6, color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's rows")
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
