"""Task families. Each is one module implementing :class:`peftlab.tasks.base.ServingTask` (which
includes :class:`~peftlab.tasks.base.Task`) and the capability protocols its flags name, plus one
line in ``TASKS`` below."""

from __future__ import annotations

from peftlab.errors import ConfigError, did_you_mean
from peftlab.tasks.base import ServingTask, Task
from peftlab.tasks.causal_lm import CausalLM
from peftlab.tasks.embedding import SentenceEmbedding
from peftlab.tasks.preference import PreferenceTuning
from peftlab.tasks.qa import QuestionAnswering
from peftlab.tasks.reward import RewardModel
from peftlab.tasks.seq2seq import Seq2Seq
from peftlab.tasks.seq_cls import SequenceClassification
from peftlab.tasks.token_cls import TokenClassification

TASKS: dict[str, ServingTask] = {
    "seq-cls": SequenceClassification(),
    "seq2seq": Seq2Seq(),
    "causal-lm": CausalLM(),
    "token-cls": TokenClassification(),
    "qa": QuestionAnswering(),
    "embedding": SentenceEmbedding(),
    "preference": PreferenceTuning(),
    "reward": RewardModel(),
}
__all__ = ["PEFT_TASK_TYPES", "TASKS", "ServingTask", "Task", "get_task", "run_meta"]

# peft's task_type -> our task family (for adapters made with plain peft): the first family of that type (a
# preference-tuned adapter is a causal LM's, a reward model's a sequence classifier's)
PEFT_TASK_TYPES: dict[str, str] = {}
for _name, _task in TASKS.items():
    PEFT_TASK_TYPES.setdefault(_task.peft_task_type, _name)


def get_task(name: str) -> ServingTask:
    if name not in TASKS:
        raise ConfigError(f'unknown task "{name}"{did_you_mean(name, TASKS)}', f"known: {', '.join(TASKS)}")
    return TASKS[name]


def run_meta(task: Task, splits, config) -> dict:
    """``meta`` of a run (dict form): what the family learns from the data (``task.inspect``), with the run config's
    section of the family's own settings where it has one (``task.config_section``)."""
    meta = task.inspect(splits, config.data)
    if task.config_section:
        meta = {**meta, task.config_section: getattr(config, task.config_section).model_dump(mode="json")}
    return meta
