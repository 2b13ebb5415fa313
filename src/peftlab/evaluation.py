"""Evaluations during training: the eval split scored, the history kept, the best weights kept.

An :class:`Evaluator` scores the model on the evaluation split through its task family, without
drawing from training's random streams (a run with evaluations trains exactly as one without),
records each evaluation in the loop state's history (saved with checkpoints, so a resumed run
keeps it) and, with ``training.keep: best``, a CPU copy of the trainable weights of the best
evaluation so far. Scores where lower is better (loss, perplexity) are declared once, in
:data:`peftlab.tasks.base.LOWER_IS_BETTER`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from peftlab.checkpoint import TrainingState, trainable_weights
from peftlab.config import DataConfig
from peftlab.errors import ConfigError
from peftlab.progress import note
from peftlab.tasks.base import LOWER_IS_BETTER, current_metric


@contextmanager
def training_rng_kept():
    """Restore torch's CPU (and current GPU) random state on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def score(metrics: dict[str, float], main_metric: str) -> float:
    """The main metric as "higher is better"."""
    return -metrics[main_metric] if main_metric in LOWER_IS_BETTER else metrics[main_metric]


@dataclass
class Evaluator:
    """Scores the model on the eval split and keeps the history and (``keep="best"``) the best weights.

    ``model`` is the unwrapped model (what the task evaluates), ``prepared`` the one accelerate
    prepared (whose trainable weights are gathered across processes for keeping).
    """

    task: Any  # peftlab.tasks.base.Task
    model: torch.nn.Module
    tokenizer: Any
    raw: datasets.Dataset
    encoded: datasets.Dataset
    data: DataConfig
    meta: dict[str, Any]
    max_length: int
    batch_size: int
    main_metric: str
    keep: str  # "best" or "last"
    accelerator: Any
    prepared: torch.nn.Module
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)  # called with each entry

    def evaluate(self) -> dict[str, float]:
        """The metrics now, leaving training's random state as it was (in training mode afterwards)."""
        with training_rng_kept(), self.accelerator.autocast():
            metrics = self.task.evaluate(self.model, self.tokenizer, self.raw, self.encoded, self.data, self.meta,
                                         self.max_length, self.batch_size)
        self.prepared.train()
        return metrics

    def record(self, state: TrainingState, steps_per_epoch: int) -> dict[str, Any]:
        """Evaluate at ``state.step``, add the entry to the history, keep the weights if they are the best yet."""
        metrics = self.evaluate()
        renamed = current_metric(self.main_metric, metrics)
        if renamed is not None and renamed != self.main_metric:  # a config of an older version ("f1")
            if self.accelerator.is_main_process:
                note(f'training.metric_for_best "{self.main_metric}" is named "{renamed}" now: keeping the best by it')
            self.main_metric = renamed
        if self.main_metric not in metrics:
            raise ConfigError(f'training.metric_for_best "{self.main_metric}" is not a metric of this task',
                              f"metrics: {', '.join(metrics)}")
        entry = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), **metrics}
        state.history.append(entry)
        value = score(metrics, self.main_metric)
        if self.keep == "best" and (state.best_score is None or value > state.best_score):
            state.best_score, state.best_entry = value, entry
            state.best_weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in
                                  trainable_weights(self.accelerator, self.prepared).items()}
        for listener in self.listeners:
            listener(entry)
        return entry

    def kept(self, state: TrainingState) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The evaluation entry of the weights to save, and those weights (None: the model's current ones)."""
        if self.keep == "best" and state.best_weights is not None:
            return state.best_entry, state.best_weights
        return state.history[-1], None
