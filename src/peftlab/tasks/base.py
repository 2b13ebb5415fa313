"""The small interface every task family implements.

The training loop, evaluation, artifacts and serving only talk to a task through this
protocol; a task family never knows which PEFT method is in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import datasets
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from peftlab.config import DataConfig, GenerationConfig, ModelConfig
from peftlab.placement import input_device


# metrics where lower is better (best-evaluation keeping, comparisons); every other metric: higher is better
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse"})


class Task(Protocol):
    name: str
    peft_task_type: str  # peft's TaskType value

    def main_metric(self, meta: dict[str, Any]) -> str:
        """The metric that picks the best evaluation (higher is better)."""

    def check_model(self, config: PretrainedConfig, model_name: str) -> None:
        """Raise a ConfigError if the architecture does not fit this task family."""

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        """Validate the raw data against the config; return JSON-able ``meta`` (e.g. labels).

        ``meta`` is saved with the adapter so the task can rebuild the model and decode
        outputs after a reload.
        """

    def encode(self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
               meta: dict[str, Any], max_length: int, where: str) -> datasets.Dataset:
        """Raw rows -> training features (token ids, labels)."""

    def load_model(self, model: ModelConfig, meta: dict[str, Any]) -> PreTrainedModel:
        """The base model for this task, heads sized from ``meta``."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batches encoded rows (dynamic padding)."""

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, raw: datasets.Dataset,
                 encoded: datasets.Dataset, data: DataConfig, meta: dict[str, Any], max_length: int,
                 batch_size: int) -> dict[str, float]:
        """Metrics on a split (``raw`` rows and their ``encoded`` features); has ``main_metric(meta)``."""

    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                data: DataConfig, meta: dict[str, Any], max_length: int, batch_size: int,
                generation: GenerationConfig) -> list[dict[str, Any]]:
        """One output record per raw row."""

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        """Rebuild ``meta`` for an adapter made by plain peft (no peftlab record)."""


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go (the execution device of the first layer when accelerate placed the model)."""
    return input_device(model)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, encoded: datasets.Dataset, collate, batch_size: int) -> float:
    """Loss over encoded rows of a generative task, batches weighted by their labelled tokens."""
    from torch.utils.data import DataLoader

    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        weight = int((batch["labels"] != -100).sum())
        total += model(**batch).loss.float().item() * weight
        count += weight
    return total / max(1, count)
