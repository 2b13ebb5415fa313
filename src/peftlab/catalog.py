"""The recipes packaged with peftlab, found by name: ``recipe:NAME``.

Every recipe is a YAML file under ``src/peftlab/recipes/`` (a folder per task family; the
file name without ``.yaml`` is the recipe's name, unique across folders). Its first line is
a comment that ``peftlab recipes`` shows as the recipe's one-line description. Recipes that
back one of the ten notebooks start that line with ``# Notebook N``; the offline variant of a
workflow (a small packaged model and data set, a minute or two on a CPU) is a second file
named ``NAME-offline.yaml`` whose first line says ``offline variant of NAME``:

    # Notebook 1 (LoRA_roberta_large_peft_Seq_classification): roberta-large on GLUE MRPC ...
    # Notebook 1, offline variant of lora-roberta-large-mrpc: LoRA on the packaged MiniLM ...

Nothing else is special about these files: ``peftlab train recipe:NAME --set ...`` and
``load_config("recipe:NAME", overrides)`` (peftlab.recipe) load them as any recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import ConfigError, did_you_mean

RECIPE_PREFIX = "recipe:"

# The collection's ten notebooks (seed README), in order, and peftlab's own (11); notebook N is backed by the recipe
# whose first line starts with "# Notebook N".
NOTEBOOKS = {
    1: "LoRA_roberta_large_peft_Seq_classification",
    2: "IA3_roberta_large_peft_Seq_Classification",
    3: "Prefix_tuning_roberta_large_Seq_classification",
    4: "Prompt_Tuning_roberta_large_Seq_Classification",
    5: "P_Tuning_roberta_large_Seq_Classification",
    6: "peft_lora_seq2seq",
    7: "peft_ia3_seq2seq",
    8: "prefix_tuning_clm",
    9: "lora_clm_accelerate_big_model_inference",
    10: "lora_clm_with_additional_tokens",
    11: "dpo_preference_tuning",  # peftlab's own: preference tuning (not one of the collection's ten)
}

_NOTEBOOK = re.compile(r"^Notebook (\d+)\b")
_OFFLINE_OF = re.compile(r"offline variant of ([\w.-]+)")


@dataclass(frozen=True)
class Recipe:
    """One packaged recipe: its name, file and what its header says."""

    name: str
    path: Path
    family: str  # the folder it sits in ("" for the top level)
    description: str  # the first comment line
    notebook: int | None = None  # the notebook it backs
    offline_of: str | None = None  # for an offline variant: the full recipe it shrinks

    def raw(self) -> dict[str, Any]:
        """The YAML mapping (not validated)."""
        return yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}


def recipes_root() -> Path:
    return Path(str(resources.files("peftlab") / "recipes"))


def _describe(path: Path, root: Path) -> Recipe:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    description = first.lstrip("#").strip() if first.startswith("#") else ""
    notebook = _NOTEBOOK.match(description)
    offline_of = _OFFLINE_OF.search(description)
    family = path.parent.relative_to(root).as_posix()
    return Recipe(name=path.stem, path=path, family="" if family == "." else family, description=description,
                  notebook=int(notebook.group(1)) if notebook else None,
                  offline_of=offline_of.group(1) if offline_of else None)


def recipes() -> dict[str, Recipe]:
    """Every packaged recipe by name: the notebooks' workflows in notebook order (each full recipe
    followed by its offline variant), then the others by folder and name."""
    root = recipes_root()
    found = [_describe(path, root) for path in sorted(root.glob("**/*.yaml"))]
    found.sort(key=lambda r: (r.notebook is None, r.notebook or 0, r.offline_of is not None, r.family, r.name))
    return {recipe.name: recipe for recipe in found}


def workflows() -> dict[int, tuple[Recipe, Recipe | None]]:
    """Notebook number -> (full recipe, offline variant)."""
    table: dict[int, list[Recipe | None]] = {}
    for recipe in recipes().values():
        if recipe.notebook is None:
            continue
        slot = table.setdefault(recipe.notebook, [None, None])
        slot[1 if recipe.offline_of else 0] = recipe
    return {number: (full, offline) for number, (full, offline) in sorted(table.items()) if full is not None}


def get_recipe(name: str) -> Recipe:
    """A packaged recipe by name (``recipe:`` prefix allowed); a did-you-mean error otherwise."""
    name = name.removeprefix(RECIPE_PREFIX).removesuffix(".yaml")
    known = recipes()
    if name not in known:
        raise ConfigError(f'unknown recipe "{name}"{did_you_mean(name, known)}',
                          f"packaged recipes: {', '.join(known)} (`peftlab recipes` describes them)")
    return known[name]


def is_recipe_name(path: str | Path) -> bool:
    return str(path).startswith(RECIPE_PREFIX)
