"""The small interface every task family implements.

The training loop, evaluation, artifacts and serving only talk to a task through this
protocol; a task family never knows which PEFT method is in use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftlab.config import DataConfig, ModelConfig


@dataclass
class Prepared:
    """Tokenized splits plus what the task learned about the data (``meta``).

    ``meta`` is JSON-serialisable and saved with the adapter (e.g. label names), so the
    task can rebuild the model and decode outputs after a reload.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    meta: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class Task(Protocol):
    name: str
    peft_task_type: str  # peft's TaskType value

    def main_metric(self, meta: dict[str, Any]) -> str:
        """The metric that picks the best epoch (higher is better)."""

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        """Validate the raw data against the config; return ``meta`` (e.g. labels)."""

    def encode(
        self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
        meta: dict[str, Any], max_length: int, where: str,
    ) -> datasets.Dataset:
        """Raw rows -> model inputs (token ids, labels)."""

    def load_model(self, model: ModelConfig, meta: dict[str, Any]) -> PreTrainedModel:
        """The base model for this task, heads sized from ``meta``."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batches encoded rows (dynamic padding)."""

    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                 meta: dict[str, Any]) -> dict[str, float]:
        """Metrics over batches of encoded rows; includes ``main_metric(meta)``."""

    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                data: DataConfig, meta: dict[str, Any], max_length: int, batch_size: int) -> list[dict[str, Any]]:
        """One output record per raw row."""

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        """Rebuild ``meta`` for an adapter made by plain peft (no peftlab record)."""
