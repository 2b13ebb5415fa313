"""The interface every task family implements.

The training loop, evaluation, artifacts and serving only talk to a task through these
protocols (:class:`Task` for training, evaluation and inference; :class:`ServingTask` and its
capability protocols for ``peftlab serve``) and never branch on a family's name; a task family
never knows which PEFT method is in use. Each family keeps its ``meta`` typed (:class:`TaskMeta`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self, Union, runtime_checkable

import datasets
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from peftlab.config import DataConfig, GenerationConfig, ModelConfig
from peftlab.errors import ConfigError
from peftlab.placement import input_device


# metrics where lower is better (best-evaluation keeping, comparisons); every other metric: higher is better
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse"})


@dataclass(frozen=True)
class Baseline:
    """What a model that learned nothing scores on the evaluation split (:meth:`Task.baseline`).

    ``metrics`` has the family's own metric names (those ``evaluate`` reports, ``samples`` included),
    computed by the family's own metric code on the constant predictions; ``classes`` is the number
    of distinct outputs a model must tell apart (labels, label-like targets), None for free text or
    a regression.
    """

    name: str  # a table row's label: "majority class"
    description: str  # what it predicts: 'always "positive", the train split's most common label: 131 of 256 rows'
    metrics: dict[str, float]
    classes: int | None = None


# metrics that were renamed: the old name -> the names it became (runs and configs of older versions use
# the old one). seq-cls "f1" was binary F1 (positive class: the second label) for two labels, macro F1 otherwise.
RENAMED_METRICS: dict[str, tuple[str, ...]] = {"f1": ("f1_binary", "f1_macro")}


def current_metric(name: str, metrics: Mapping[str, Any]) -> str | None:
    """The name ``name`` has among ``metrics``: itself, what an old name became, or None (not a metric of these)."""
    if name in metrics:
        return name
    return next((new for new in RENAMED_METRICS.get(name, ()) if new in metrics), None)


# --- typed meta ------------------------------------------------------------------------------

class TaskMeta(Protocol):
    """A family's typed ``meta``: what it learns from the data (labels, data mode) and saves with the adapter.

    On disk (``peftlab.json`` "meta") and between the pipeline's steps ``meta`` travels in its dict
    form, the JSON the run record has always held; a family converts at its boundary: every task method
    below accepts the dict or the typed value (``MetaType.of(meta)``), and ``inspect``,
    ``meta_from_adapter`` and ``meta_for_base`` return ``to_dict()``, so old runs load and new runs
    write the same keys.
    """

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict of the run record (the keys earlier peftlab versions wrote, in their order)."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """Read the dict form; missing optional keys take their defaults, unknown keys are ignored."""

    @classmethod
    def of(cls, meta: Mapping[str, Any] | Self) -> Self:
        """The typed meta of a dict or of a typed value (returned as it is)."""


Meta = Union[Mapping[str, Any], TaskMeta]  # what task methods accept as ``meta``


# --- what training, evaluation and inference need ------------------------------------------

@runtime_checkable
class Task(Protocol):
    """A task family, as the training loop, evaluation, prediction and the run directory use it.

    The caller never branches on the family: what differs between families is a member here (or a
    capability of :class:`ServingTask`), never a comparison with ``name``.
    """

    name: str  # the family's name in configs and the run record ("seq-cls")
    peft_task_type: str  # peft's TaskType value (recognises adapters made with plain peft)
    meta_type: type[TaskMeta]  # the family's typed meta (ClassificationMeta, GenerationMeta)
    packs: bool  # training batches can be packed into one row without padding (fastpath.packing)
    pipeline_tag: str  # the Hugging Face Hub's pipeline tag of the family's models (the model card)
    auto_class: type  # the transformers Auto class that loads them (load_model; the model card's snippet)
    # the base model as it is (no adapter) is the reference a comparison measures: families without a formula baseline
    # whose bare base already does the task (generation, embeddings); False where the bare head is untrained
    base_is_reference: bool
    # the run config's section of this family's own settings (``"preference"``: the objective), kept in ``meta`` under
    # that key (tasks.run_meta) so evaluation and serving of a saved run use what it trained with; None: none
    config_section: str | None

    def main_metric(self, meta: Meta) -> str:
        """The metric that picks the best evaluation (higher is better unless in ``LOWER_IS_BETTER``)."""

    def check_model(self, config: PretrainedConfig, model_name: str) -> None:
        """Raise a ConfigError if the architecture does not fit this task family."""

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        """Validate the raw data against the config; return ``meta`` in its dict form (``meta_type(...).to_dict()``).

        ``meta`` is saved with the adapter so the task can rebuild the model and decode
        outputs after a reload.
        """

    def encode(self, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
               meta: Meta, max_length: int, where: str) -> datasets.Dataset:
        """Raw rows -> training features (token ids, labels)."""

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        """``auto_class.from_pretrained``'s keyword arguments that size the model's head from ``meta``."""

    def load_model(self, model: ModelConfig, meta: Meta) -> PreTrainedModel:
        """The base model for this task, heads sized from ``meta`` (``model_kwargs``)."""

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Batches encoded rows (dynamic padding)."""

    def card_columns(self, data: DataConfig) -> str:
        """What the model card says the run's rows hold (e.g. "input `text`, label `label`")."""

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        """Python lines for the model card that run ``model`` (and ``tokenizer``) on an example input."""

    def training_loss(self, meta: Meta) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None:
        """The family's training loss as ``loss(model, batch)``; None: the model's own (the labels in the batch).
        (Sentence embeddings: a contrastive loss over the pooled vectors; the base model has no loss of its own.)"""

    def packed_collator(self, tokenizer: PreTrainedTokenizerBase | None) -> Callable[[list[dict]], dict] | None:
        """Batches encoded rows as one row without padding (position ids restart per row); ``None`` unless ``packs``."""

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, raw: datasets.Dataset,
                 encoded: datasets.Dataset, data: DataConfig, meta: Meta, max_length: int,
                 batch_size: int) -> dict[str, float]:
        """Metrics on a split (``raw`` rows and their ``encoded`` features); has ``main_metric(meta)``."""

    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                data: DataConfig, meta: Meta, max_length: int, batch_size: int,
                generation: GenerationConfig | None) -> list[dict[str, Any]]:
        """One output record per raw row."""

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        """Rebuild ``meta`` (dict form) for an adapter made by plain peft (no peftlab record)."""

    def baseline(self, splits: dict[str, datasets.Dataset], data: DataConfig, meta: Meta) -> Baseline | None:
        """What a model that learned nothing scores on ``splits["eval"]``, learned from ``splits["train"]`` alone
        (classifiers: the training split's most common label for every row; label-like generation: its most
        common answer); None where no such formula exists (free text, plain text): there the base model without
        an adapter is the reference, and it is a measurement (peftlab.comparison.baselines)."""


# --- what serving needs ------------------------------------------------------------------------

@runtime_checkable
class ServingTask(Task, Protocol):
    """A task family as ``peftlab serve`` uses it: what it can answer, and the bare base's meta.

    The capability flags say which endpoints a family answers and which of the protocols below it
    implements as well: ``classifies`` -> :class:`Classifier` (``/v1/classify``), ``generates`` ->
    :class:`Generator` (``/v1/completions``), ``chat`` (implies ``generates``) -> :class:`ChatGenerator`
    (``/v1/chat/completions``). A member of a protocol whose flag is off may be absent.
    """

    classifies: bool  # scores texts (or text pairs) against labels: one forward pass, no generation
    generates: bool  # generates text from a prompt
    chat: bool  # renders chat messages into a prompt (the tokenizer's chat template)
    embeds: bool  # one vector per text (/v1/embeddings): the Classifier serving members (encode_rows, logits ->
    #               the vectors, record) without the by-class ones

    def meta_for_base(self) -> dict[str, Any]:
        """``meta`` (dict form) for serving the bare base without an adapter: what its model is loaded with."""


@runtime_checkable
class Classifier(Protocol):
    """A family that ``classifies``: serving's side (encode, one padded forward pass, one record per row),
    and training and evaluation by class (label counts, a class-weighted loss, per-class outcomes)."""

    # training warns once when the labels are imbalanced (tasks.balance); False where imbalance is the nature of the
    # data and the main metric does not flatter the majority (a tagger: "O" dominates, entity F1 ignores it)
    warns_imbalance: bool

    def needs_pairs(self, data: DataConfig) -> bool:
        """Whether each input is a pair of texts (serving's ``input_pair``): a pair classifier's, a question and its
        passage."""

    def accepts_pairs(self, data: DataConfig) -> bool:
        """Whether an input may come with a pair (serving's ``input_pair``): where pairs are needed, and where they are
        optional (a reward model: a prompt and its completion, or one whole text)."""

    def labels(self, meta: Meta) -> list[str]:
        """The names of the head's outputs (one per output; a regression's single score: its label column)."""

    def encode_rows(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None,
                    max_length: int | None) -> list[dict[str, list[int]]]:
        """Texts (and pairs) -> token ids per row, cut at ``max_length`` (``None``: not cut)."""

    def logits(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, features: list[dict],
               **forward_kwargs: Any) -> torch.Tensor:
        """One padded forward pass over encoded rows, on the CPU (a row's logits: one per label, or a tagger's one
        per token and tag); ``forward_kwargs`` e.g. peft's ``adapter_names``."""

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        """One prediction from a row's logits (label and score, or a regression score; a tagger: the tagged words
        and entities), as ``predict`` gives it; ``features``: the row as ``encode_rows`` made it (a tagger reads
        its tokens' character offsets there)."""

    # training and evaluation by class (training.class_weights, peftlab eval --report)

    def label_counts(self, raw: datasets.Dataset, data: DataConfig, meta: Meta) -> dict[str, int]:
        """Rows per label of raw data, every label in the head's order (``{}``: no classes, e.g. regression)."""

    def loss_function(self, weights: list[float]) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]],
                                                             torch.Tensor]:
        """The training loss with one weight per label (head order), as ``loss(model, batch)``."""

    def label_outcomes(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, raw: datasets.Dataset,
                       encoded: datasets.Dataset, data: DataConfig, meta: Meta,
                       batch_size: int) -> tuple[dict[str, float], Any, Any]:
        """``evaluate``'s metrics and the gold and predicted label ids behind them; ConfigError without classes."""


class WithoutClasses:
    """The by-class members of :class:`Classifier` for a family whose head has no classes (question answering's
    start / end scores, a reward model's one score): no label counts; class weights and ``eval --report`` refused
    with the family's ``no_classes`` message and fix."""

    no_classes: tuple[str, str]  # (what the head gives instead of classes, which metrics to read)

    def label_counts(self, raw: datasets.Dataset, data: DataConfig, meta: Meta) -> dict[str, int]:
        return {}

    def loss_function(self, weights: list[float]):
        raise ConfigError(self.no_classes[0], "class weights (training.class_weights) and peftlab eval --report "
                                              f"apply to classifiers with labels; {self.no_classes[1]}")

    def label_outcomes(self, model, tokenizer, raw, encoded, data, meta, batch_size):
        self.loss_function([])


@runtime_checkable
class Generator(Protocol):
    """Serving's side of a family that ``generates``: prompts as ``predict`` builds them (generation: tasks.generation)."""

    def prompts(self, rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                max_length: int | None) -> tuple[list[str], list[list[int]]]:
        """Raw rows -> prompt texts and their token ids (cut at ``max_length``; ``None``: not cut)."""

    def prompt_ids(self, texts: list[str], tokenizer: PreTrainedTokenizerBase,
                   max_length: int | None) -> list[list[int]]:
        """Prompt texts as they are (no template; e.g. a rendered chat) -> token ids, as ``prompts`` makes them."""


@runtime_checkable
class ChatGenerator(Generator, Protocol):
    """Serving's side of a family with ``chat``."""

    def chat_text(self, history: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
        """A conversation (``[{role, content}, ...]``) rendered as the prompt text of the assistant's next turn."""


def output_scores(output: Any) -> torch.Tensor:
    """A forward pass's raw scores, whatever the head: ``logits``; a question-answering head's start and end logits
    stacked on a last axis; a bare encoder's (sentence embeddings) last hidden states."""
    if getattr(output, "logits", None) is not None:
        return output.logits
    if getattr(output, "start_logits", None) is not None:
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


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
