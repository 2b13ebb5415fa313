"""The package's import graph: no cycles, and no module importing one above it in the pipeline.

The layers (ARCHITECTURE.md) read top to bottom as the pipeline does; a module may import
modules of its own layer or the layers before it, never a later one. Imports inside functions
count the same (a cycle hidden in a function is still a cycle); only the CLI and the server's
entry point import lazily, so that `peftlab --help` and `import peftlab.serving` stay fast.
Read with the standard library's ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
import sys
from fnmatch import fnmatch
from pathlib import Path

import peftlab

PACKAGE = Path(peftlab.__file__).parent

LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["peftlab.version", "peftlab.errors", "peftlab.progress", "peftlab.testing"]),
    ("config", ["peftlab.config"]),
    ("sources", ["peftlab.catalog", "peftlab.assets", "peftlab.offline_models", "peftlab.conll", "peftlab.data"]),
    ("model", ["peftlab.fastpath", "peftlab.placement", "peftlab.model"]),
    ("upstream fixes", ["peftlab.compat"]),
    ("task families", ["peftlab.tasks", "peftlab.tasks.*"]),
    ("methods", ["peftlab.methods"]),
    ("checked config", ["peftlab.recipe"]),
    ("method stage, run directories", ["peftlab.method_stage", "peftlab.checkpoint", "peftlab.rundir",
                                         "peftlab.adapters", "peftlab.card", "peftlab.artifacts"]),
    ("training, evaluation", ["peftlab.evaluation", "peftlab.tracking", "peftlab.loop", "peftlab.train",
                              "peftlab.inference", "peftlab.eval_report"]),
    ("merge, comparison, serving", ["peftlab.merge", "peftlab.export", "peftlab.hub", "peftlab.quickstart", "peftlab.comparison",
                                    "peftlab.comparison.*", "peftlab.serving", "peftlab.serving.*"]),
    ("entry points", ["peftlab.cli", "peftlab.__main__", "peftlab"]),
]
LAZY_IMPORTS_ALLOWED = {"peftlab.cli", "peftlab.serving"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported peftlab module, inside a function) for every import statement of the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = [f"{base}.{alias.name}" for alias in child.names if f"{base}.{alias.name}" in modules]
                # `from peftlab import compat` imports the submodule; `from peftlab import train` the package's name
                targets = submodules + ([base] if len(submodules) < len(child.names) else [])
            found.extend((target, inner) for target in targets if target in modules and target != name)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _layer(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(name, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS here and to ARCHITECTURE.md")


def _graph() -> dict[str, list[tuple[str, bool]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = [f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
              for name, imports in _graph().items() for target, _ in imports if _layer(target) > _layer(name)]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[str]:
    edges = {name: sorted({target for target, _ in imports}) for name, imports in graph.items()}
    cycles, state = [], {}

    def walk(node: str, path: list[str]) -> None:  # depth-first search; grey = on the current path
        state[node] = "grey"
        for target in edges[node]:
            if state.get(target) == "grey":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                walk(target, path + [target])
        state[node] = "black"

    for name in sorted(edges):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_only_where_startup_time_needs_them():
    hidden = [f"{name} imports {target} inside a function" for name, imports in _graph().items()
              for target, inner in imports if inner and name not in LAZY_IMPORTS_ALLOWED]
    assert not hidden, "\n".join(hidden)


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The walker itself: a planted cycle, an upward import and a hidden import are found."""
    fake = tmp_path / "peftlab"
    (fake / "tasks").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "config.py").write_text("from peftlab import train\n")  # config reaching up to training
    (fake / "train.py").write_text("def f():\n    from peftlab.config import RunConfig\n")
    (fake / "tasks" / "__init__.py").write_text("from .. import config\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["peftlab.config"] == [("peftlab.train", False)]
    assert graph["peftlab.train"] == [("peftlab.config", True)]
    assert graph["peftlab.tasks"] == [("peftlab.config", False)]
    assert _cycles(graph) == ["peftlab.config -> peftlab.train -> peftlab.config"]
    assert _layer("peftlab.train") > _layer("peftlab.config")
