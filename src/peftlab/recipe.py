"""A recipe -> a checked run config: the schema (config.py) plus the registries that say what exists.

:mod:`peftlab.config` is the schema alone (keys, types, ranges, readable errors). This layer
sits above the registries it checks against (task families in :mod:`peftlab.tasks`, techniques
in :mod:`peftlab.methods`) and the packaged recipes (:mod:`peftlab.catalog`):

    build_config(raw, overrides)    a mapping -> RunConfig, checked against the registries
    load_config(path, overrides)    a YAML file, or recipe:NAME for a packaged recipe
    load_recipe(name, overrides)    a packaged recipe by name

Every error is a :class:`~peftlab.errors.PeftlabError` with a hint, raised before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab import catalog
from peftlab.config import CONFIG_HINT, RunConfig, parse_config, read_recipe_file
from peftlab.errors import ConfigError, did_you_mean
from peftlab.methods import get_method
from peftlab.tasks import TASKS


def check_config(config: RunConfig) -> RunConfig:
    """The task family and the technique exist, the technique's options are its own, and it fits the task."""
    if config.task not in TASKS:
        raise ConfigError(f'invalid config: `task`: unknown task "{config.task}"{did_you_mean(config.task, TASKS)}; '
                          f'known: {", ".join(TASKS)}', CONFIG_HINT)
    spec = get_method(config.method.name)  # a MethodError with a did-you-mean
    spec.check_options(config.method.options)
    spec.check_task(config.task)
    if config.training.class_weights is not None and (not TASKS[config.task].classifies or config.data.regression):
        raise ConfigError("training.class_weights weights a classifier's loss per class; "
                          + (f"a {config.task} run has no classes" if not TASKS[config.task].classifies
                             else "a regression run (data.regression) has no classes"),
                          "leave training.class_weights out (null)")
    return config


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw mapping (plus ``key=value`` overrides) into a checked :class:`RunConfig`."""
    return check_config(parse_config(raw, overrides))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe, apply ``key=value`` overrides and validate it.

    ``path`` is a file, or ``recipe:NAME`` for a recipe packaged with peftlab (``peftlab recipes``).
    """
    if catalog.is_recipe_name(path):
        path = catalog.get_recipe(str(path)).path
    return build_config(read_recipe_file(path), overrides)


def load_recipe(name: str, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a packaged recipe, with ``key=value`` overrides: ``load_recipe("quickstart")``."""
    return load_config(catalog.get_recipe(name).path, overrides)
