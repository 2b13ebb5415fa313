"""Class balance of a classifier's training labels: the imbalance rule, its warning, class weights.

A family that classifies counts its training labels (``label_counts``); training then warns once
when they are imbalanced and, with ``training.class_weights``, weights the loss per class
(``loss_function``). What is imbalanced, and what "balanced" weights are, is said here once:

- imbalanced: the largest class has more than ``IMBALANCE_RATIO`` (1.5) times the training rows of
  the smallest (a 60/40 split is not, 61/39 is; a label without training rows always is);
- balanced weights: ``n_samples / (n_classes * count)`` per class, scikit-learn's
  ``class_weight="balanced"`` (classes without training rows: 1, no row carries them);
- a mapping ``label: weight`` names labels of the run (anything else is a ConfigError); labels it
  leaves out weigh 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftlab.errors import ConfigError, did_you_mean, listed

IMBALANCE_RATIO = 1.5  # largest class / smallest class above this: imbalanced
SHOWN_CLASSES = 6  # the warning names every class up to this many, else the largest and smallest three


def imbalance_ratio(counts: Mapping[str, int]) -> float:
    """Rows of the largest class / rows of the smallest (inf when a class has none)."""
    largest, smallest = max(counts.values()), min(counts.values())
    return float("inf") if smallest == 0 else largest / smallest


def is_imbalanced(counts: Mapping[str, int]) -> bool:
    return len(counts) > 1 and imbalance_ratio(counts) > IMBALANCE_RATIO


def shares(counts: Mapping[str, int]) -> str:
    """``negative 90.2% (231), positive 9.8% (25)``: every class, or the largest and smallest three."""
    total = sum(counts.values()) or 1
    shown = [f"{label} {100 * n / total:.1f}% ({n})" for label, n in counts.items()]
    if len(shown) <= SHOWN_CLASSES:
        return ", ".join(shown)
    ordered = sorted(counts, key=lambda label: -counts[label])
    pick = lambda labels: ", ".join(f"{label} {100 * counts[label] / total:.1f}% ({counts[label]})"  # noqa: E731
                                    for label in labels)
    return f"largest {pick(ordered[:3])}; smallest {pick(ordered[-3:])} ({len(counts)} classes)"


def imbalance_warning(counts: Mapping[str, int], class_weights: Any) -> str | None:
    """The warning training prints once for imbalanced training labels (None: balanced enough, or weighted)."""
    if not is_imbalanced(counts) or class_weights is not None:
        return None
    ratio = imbalance_ratio(counts)
    missing = [label for label, n in counts.items() if n == 0]
    how = (f"{listed(missing)} ha{'s' if len(missing) == 1 else 've'} no training rows" if missing
           else f"the largest class has {ratio:.1f}x the rows of the smallest")
    return (f"the training labels are imbalanced: {shares(counts)} ({how}); accuracy then flatters a model that "
            "favours the majority: read per-class recall with `peftlab eval RUN_DIR --report`, or weight the loss "
            "with --set training.class_weights=balanced")


def class_weights(setting: str | Mapping[str, float], counts: Mapping[str, int]) -> dict[str, float]:
    """``training.class_weights`` resolved to one weight per label, in the labels' order.

    ``counts``: the training rows per label (every label of the run, in the head's order).
    """
    labels = list(counts)
    if setting == "balanced":
        present = [label for label in labels if counts[label] > 0]
        total = sum(counts.values())
        return {label: (total / (len(present) * counts[label]) if counts[label] else 1.0) for label in labels}
    unknown = [str(label) for label in setting if label not in counts]
    if unknown:
        named = listed(['"' + label + '"' for label in unknown])
        raise ConfigError(f"training.class_weights names {named}, not a label of this "
                          f"run{did_you_mean(unknown[0], labels) if len(unknown) == 1 else ''}",
                          f"labels: {listed(labels, 10)}")
    return {label: float(setting.get(label, 1.0)) for label in labels}


def weights_note(weights: Mapping[str, float], setting: Any, counts: Mapping[str, int]) -> str:
    """The line training prints (and records) about the weights in use."""
    how = "balanced" if setting == "balanced" else "as configured"
    shown = ", ".join(f"{label} {w:.3g}" for label, w in weights.items())
    return f"class weights ({how}): {shown}; training rows: {shares(counts)}"
