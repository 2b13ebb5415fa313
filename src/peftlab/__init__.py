"""peftlab: parameter-efficient fine-tuning as real software.

The Python API (the CLI is a thin layer over it)::

    from peftlab import load_config, train, evaluate, predict, load_adapter

    config = load_config("recipe:quickstart", ["training.max_steps=50"])
    result = train(config)
    print(result.metrics)
    print(predict(result.output_dir, texts=["A joy from start to finish."]))
"""

from peftlab.version import __version__  # noqa: E402

from peftlab import compat  # noqa: E402

compat.silence_upstream_notices()  # upstream's notices about its own code (compat.py)

from peftlab.artifacts import LoadedAdapter, load_adapter  # noqa: E402
from peftlab.card import write_card  # noqa: E402
from peftlab.catalog import get_recipe  # noqa: E402
from peftlab.comparison import CompareResult, compare  # noqa: E402
from peftlab.config import RunConfig  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.eval_report import ClassificationReport, classification_report  # noqa: E402
from peftlab.export import ExportResult, export  # noqa: E402
from peftlab.hub import PushResult, push  # noqa: E402
from peftlab.inference import evaluate, logits, predict  # noqa: E402
from peftlab.merge import MergeResult, combine, merge  # noqa: E402
from peftlab.recipe import build_config, load_config, load_recipe  # noqa: E402
from peftlab.train import RunResult, train  # noqa: E402

__all__ = ["__version__", "ClassificationReport", "CompareResult", "LoadedAdapter", "MergeResult", "PeftlabError", "RunConfig", "RunResult", "build_config",
           "classification_report", "combine", "compare", "evaluate", "load_adapter", "load_config", "load_recipe", "logits", "merge",
           "predict", "train", "recipe_path", "PushResult", "push", "write_card", "ExportResult", "export"]


def recipe_path(name: str):
    """Path of a recipe packaged with peftlab (e.g. ``quickstart``, ``lora-roberta-large-mrpc``)."""
    return get_recipe(name).path
