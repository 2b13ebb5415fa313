"""The task interface is the one that is used.

Every registered family implements every member of the protocols in ``peftlab.tasks.base`` that
its capability flags name; its typed meta reads and writes the run record's dict form unchanged;
and no module outside ``peftlab/tasks/`` branches on a family's name (read with ``ast``, as
tests/test_layering.py reads the imports).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Protocol

import datasets
import pytest

import peftlab
from peftlab.config import DataConfig
from peftlab.tasks import TASKS, base
from peftlab.config import PreferenceConfig

PACKAGE = Path(peftlab.__file__).parent
FLAGS = ("packs", "classifies", "generates", "chat")


def _members(protocol: type) -> set[str]:
    """The attributes and methods a protocol declares, its protocol bases' included."""
    members: set[str] = set()
    for klass in protocol.__mro__:
        if klass is Protocol or klass is object or not getattr(klass, "_is_protocol", False):
            continue
        members |= set(vars(klass).get("__annotations__", {}))
        members |= {name for name, value in vars(klass).items()
                    if not name.startswith("_") and (callable(value) or isinstance(value, (classmethod, staticmethod)))}
    return members


def _protocols(task) -> list[type]:
    """The protocols a family implements: training's and serving's, and one per capability flag."""
    return [base.Task, base.ServingTask] + ([base.Classifier] if task.classifies else []) \
        + ([base.Generator] if task.generates else []) + ([base.ChatGenerator] if task.chat else [])


def test_the_protocols_declare_what_the_callers_use():
    task = _members(base.Task)
    assert {"name", "peft_task_type", "meta_type", "packs", "main_metric", "check_model", "inspect", "encode",
            "load_model", "collator", "packed_collator", "evaluate", "predict", "meta_from_adapter", "baseline",
            "pipeline_tag", "auto_class", "model_kwargs"} <= task  # the last three: the model card (card.py)
    assert {"classifies", "generates", "chat", "meta_for_base"} <= _members(base.ServingTask) - task
    assert {"labels", "encode_rows", "logits", "record", "label_counts", "loss_function",
            "label_outcomes"} <= _members(base.Classifier)
    assert {"prompts", "prompt_ids"} <= _members(base.Generator)
    assert {"chat_text"} <= _members(base.ChatGenerator) - _members(base.Generator)
    assert {"to_dict", "from_dict", "of"} <= _members(base.TaskMeta)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_family_implements_every_member_its_flags_promise(name):
    task = TASKS[name]
    assert task.name == name
    for flag in FLAGS:
        assert isinstance(getattr(task, flag), bool), f"{name}.{flag} must be a bool"
    assert not task.chat or task.generates, "chat implies generates"
    assert (task.packed_collator(None) is not None) == task.packs
    for protocol in _protocols(task):
        missing = sorted(m for m in _members(protocol) if not hasattr(task, m))
        assert not missing, f"{name} lacks {protocol.__name__} members: {', '.join(missing)}"
        assert isinstance(task, protocol)
    assert not _members(base.TaskMeta) - set(dir(task.meta_type))
    for built in (task.meta_for_base(), task.meta_from_adapter({"score.weight": (2, 8)}, None)):
        assert task.meta_type.from_dict(built).to_dict() == built
        assert task.meta_type.of(task.meta_type.from_dict(built)).to_dict() == built


# the run record's "meta" as peftlab has always written it: read and written back unchanged, key order included
RECORDS = {
    "preference": [{"mode": "text", "paired": True,
                    "preference": {"loss": "dpo", "beta": 0.1, "simpo_gamma": 0.5, "desirable_weight": 1.0,
                                   "undesirable_weight": 1.0, "precompute_reference": False}},
                   {"mode": "chat", "paired": False,
                    "preference": {"loss": "kto", "beta": 0.2, "simpo_gamma": 0.5, "desirable_weight": 1.5,
                                   "undesirable_weight": 1.0, "precompute_reference": True}}],
    "seq-cls": [{"regression": False, "labels": ["negative", "positive"], "label_kind": "name"},
                {"regression": False, "labels": ["a", "b", "c"], "label_kind": "index"},
                {"regression": True, "labels": ["score"]}],
    "seq2seq": [{"mode": "seq2seq", "label_like": True, "targets": ["negative", "positive"]},
                {"mode": "seq2seq", "label_like": False, "targets": []}],
    "causal-lm": [{"mode": "completion", "label_like": True, "targets": ["no", "yes"]},
                  {"mode": "chat", "label_like": False, "targets": []},
                  {"mode": "text", "label_like": False, "targets": []},
                  {"mode": None, "label_like": False, "targets": []}],
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_typed_meta_keeps_the_run_record_byte_for_byte(name):
    meta_type = TASKS[name].meta_type
    for record in RECORDS[name]:
        assert json.dumps(meta_type.from_dict(record).to_dict()) == json.dumps(record)


def _splits(rows: list[dict]) -> dict[str, datasets.Dataset]:
    return {"train": datasets.Dataset.from_list(rows), "eval": datasets.Dataset.from_list(rows)}


@pytest.mark.parametrize("name, rows, options, expected", [
    ("seq-cls", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}], {},
     {"regression": False, "labels": ["neg", "pos"], "label_kind": "name"}),
    ("seq-cls", [{"text": "good", "label": 0.5}, {"text": "bad", "label": 1.0}], {"regression": True},
     {"regression": True, "labels": ["label"]}),
    ("seq2seq", [{"text": "good", "target": "pos"}, {"text": "bad", "target": "neg"}], {"target_column": "target"},
     {"mode": "seq2seq", "label_like": True, "targets": ["neg", "pos"]}),
    ("causal-lm", [{"text": "good", "target": "pos"}, {"text": "bad", "target": "neg"}],
     {"target_column": "target"}, {"mode": "completion", "label_like": True, "targets": ["neg", "pos"]}),
    ("causal-lm", [{"text": "some text"}, {"text": "more text"}], {},
     {"mode": "text", "label_like": False, "targets": []}),
    ("preference", [{"prompt": "q", "chosen": " yes", "rejected": " no"}], {},
     {"mode": "text", "paired": True, "preference": PreferenceConfig().model_dump(mode="json")}),
])
def test_inspect_writes_the_keys_it_always_wrote(name, rows, options, expected):
    meta = TASKS[name].inspect(_splits(rows), DataConfig(train_file="<inline>", **options))
    assert json.dumps(meta) == json.dumps(expected)
    assert TASKS[name].main_metric(meta) == TASKS[name].main_metric(TASKS[name].meta_type.from_dict(meta))


# --- nobody outside tasks/ branches on a family's name ------------------------------------------

def _is_name_literal(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name_literal(element, names) for element in node.elts)
    return False


def _is_task(node: ast.AST) -> bool:
    """``task``, ``self.task``, ``loaded.task``, ``base_task``: an expression naming a task family (not ``task_type``)."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name == "task" or name.endswith("_task")


def _branches_on_a_task(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Comparisons with a family's name, ``match`` cases on one, and ``hasattr`` / ``getattr`` probes of a task."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_is_name_literal(side, names)
                                                 for side in [node.left, *node.comparators]):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue) and _is_name_literal(node.value, names):
            found.append((node.lineno, f"case {ast.unparse(node.value)}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
              and (node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3))
              and _is_task(node.args[0])):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def _outside_tasks() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if (PACKAGE / "tasks") not in path.parents)


def test_nothing_outside_tasks_branches_on_a_family_name():
    names = set(TASKS)
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {code}" for path in _outside_tasks()
             for line, code in _branches_on_a_task(ast.parse(path.read_text()), names)]
    assert not found, "use the task's declared members and capabilities (tasks/base.py):\n" + "\n".join(found)


def test_the_scan_sees_each_kind_of_branch():
    source = '''
if adapter.task.name == "seq-cls": pass
if task not in ("seq2seq", "causal-lm"): pass
match config.task:
    case "seq2seq": pass
ok = hasattr(task, "packed_collator")
ok = getattr(self.task, "chat", False)
kind = getattr(config.task_type, "value", config.task_type)
if task.classifies and name == "other": pass
labels = {"seq-cls"}
'''
    found = [code for _, code in _branches_on_a_task(ast.parse(source), set(TASKS))]
    assert found == ["adapter.task.name == 'seq-cls'", "task not in ('seq2seq', 'causal-lm')", "case 'seq2seq'",
                     "hasattr(task, 'packed_collator')", "getattr(self.task, 'chat', False)"]
