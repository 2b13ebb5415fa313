"""Task families. Each is one module implementing :class:`peftlab.tasks.base.ServingTask` (which
includes :class:`~peftlab.tasks.base.Task`) and the capability protocols its flags name, plus one
line in ``TASKS`` below."""

from __future__ import annotations

from peftlab.errors import ConfigError, did_you_mean
from peftlab.tasks.base import ServingTask, Task
from peftlab.tasks.causal_lm import CausalLM
from peftlab.tasks.embedding import SentenceEmbedding
from peftlab.tasks.qa import QuestionAnswering
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
}
__all__ = ["PEFT_TASK_TYPES", "TASKS", "ServingTask", "Task", "get_task"]

# peft's task_type -> our task family (for adapters made with plain peft)
PEFT_TASK_TYPES = {task.peft_task_type: name for name, task in TASKS.items()}


def get_task(name: str) -> ServingTask:
    if name not in TASKS:
        raise ConfigError(f'unknown task "{name}"{did_you_mean(name, TASKS)}', f"known: {', '.join(TASKS)}")
    return TASKS[name]
