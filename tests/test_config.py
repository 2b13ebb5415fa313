"""The run configuration: YAML + overrides, validation, every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab import build_config, load_config
from peftlab.config import apply_overrides
from peftlab.errors import ConfigError, MethodError

MINIMAL = {"model": {"name": "some/model"}, "data": {"builtin": "rotten_tomatoes"}}


def test_overrides_parse_types_and_create_sections():
    raw = apply_overrides(MINIMAL, ["training.learning_rate=1e-3", "training.epochs=2", "method.name=ia3",
                                    "method.options.target_modules=[key, value]", "data.labels=null"])
    config = build_config(raw)
    assert config.training.learning_rate == 1e-3 and config.training.epochs == 2
    assert config.method.name == "ia3" and config.method.options["target_modules"] == ["key", "value"]
    assert MINIMAL["model"] == {"name": "some/model"}  # the input is not mutated


def test_defaults_and_round_trip(tmp_path):
    config = build_config(MINIMAL)
    assert (config.task, config.method.name, config.training.keep) == ("seq-cls", "lora", "best")
    config.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize("raw, message", [
    ({"data": {"builtin": "x"}}, "missing key `model`"),
    ({**MINIMAL, "trainig": {}}, 'did you mean "training"'),
    ({**MINIMAL, "training": {"batch_sise": 8}}, 'did you mean "batch_size"'),
    ({**MINIMAL, "training": {"learning_rate": -1}}, "training.learning_rate"),
    ({**MINIMAL, "training": {"precision": "fp8"}}, "training.precision"),
    ({"model": {"name": "m"}, "data": {"builtin": "x", "train_file": "y"}}, "exactly one source"),
    ({"model": {"name": "m"}, "data": {}}, "exactly one source"),
    ({**MINIMAL, "training": {"eval_strategy": "steps"}}, "needs eval_steps"),
])
def test_invalid_configs_say_what_is_wrong(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(raw)


def test_method_errors():
    with pytest.raises(MethodError, match='did you mean "prefix"'):
        build_config({**MINIMAL, "method": {"name": "prefx"}})
    with pytest.raises(MethodError, match='unknown option `rank`.*did you mean "r"|unknown option `rank`'):
        build_config({**MINIMAL, "method": {"name": "lora", "options": {"rank": 4}}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not key=value"):
        build_config(MINIMAL, ["training.learning_rate"])


def _recipes() -> list[Path]:
    from peftlab.catalog import recipes

    return [recipe.path for recipe in recipes().values()]


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    config = load_config(path)
    from peftlab.methods import get_method

    get_method(config.method.name).check_options(config.method.options)
