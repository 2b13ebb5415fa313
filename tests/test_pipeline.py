"""The seq-cls pipeline end to end: pairs, label names, multi-class, regression, best-epoch
keeping, evaluation that reproduces the recorded metrics, TensorBoard logs."""

from __future__ import annotations

import json
import random

import pytest

from peftlab import evaluate, predict, train
from peftlab.errors import ConfigError
from peftlab.testing import WORDS, write_csv


def test_text_pairs_keep_label_names(make_config, keyword_data):
    config = make_config("bert", "lora", **{
        "data.train_file": keyword_data["pair_train"], "data.validation_file": keyword_data["pair_validation"],
        "data.text_pair_column": "text_pair", "training.epochs": 12})
    result = train(config)
    assert result.metrics["accuracy"] >= 0.8  # the keyword is only in the second text
    record = json.loads((result.output_dir / "peftlab.json").read_text())
    assert record["meta"]["labels"] == ["negative", "positive"]
    out = predict(result.output_dir, texts=["alpha bravo", "alpha bravo"], pairs=["echo great", "echo awful"])
    assert [r["label"] for r in out] == ["positive", "negative"]
    with pytest.raises(ConfigError, match="text pairs"):
        predict(result.output_dir, texts=["alpha"])


def test_keep_best_and_eval_reproduces_recorded_metrics(make_config):
    config = make_config("bert", "lora", **{"training.epochs": 4, "training.keep": "best"})
    events = []
    result = train(config, on_event=lambda kind, data: events.append((kind, data["step"])))
    evaluations = [event for event in events if event[0] == "evaluation"]
    assert evaluations == [("evaluation", e["step"]) for e in result.history] and len(evaluations) == 4
    assert [step for kind, step in events if kind == "step"] == list(range(1, 65))
    best = max(entry["accuracy"] for entry in result.history)
    assert result.metrics["accuracy"] == best
    recorded = json.loads((result.output_dir / "metrics.json").read_text())
    assert recorded["accuracy"] == best and len(recorded["history"]) == 4
    again = evaluate(result.output_dir)
    assert again["accuracy"] == pytest.approx(recorded["accuracy"])
    assert again["loss"] == pytest.approx(recorded["loss"], rel=1e-4)


def test_multiclass_with_configured_label_order(make_config, tmp_path):
    rng = random.Random(0)
    keys = {"great": "pos", "awful": "neg", "kilo": "neutral"}

    def rows(n):
        out = []
        for _ in range(n):
            key = rng.choice(list(keys))
            words = [w for w in rng.choices(WORDS, k=5) if w != "kilo"] + [key]
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": keys[key]})
        return out

    config = make_config("roberta", "lora", **{
        "data.train_file": write_csv(tmp_path / "t.csv", rows(300)),
        "data.validation_file": write_csv(tmp_path / "v.csv", rows(60)),
        "data.labels": "[neg, neutral, pos]", "training.epochs": 10})
    result = train(config)
    assert result.metrics["accuracy"] >= 0.7 and "mcc" in result.metrics
    assert result.model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}


def test_regression_reports_correlations(make_config, tmp_path):
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            k = rng.randint(0, 4)
            out.append({"text": " ".join(["great"] * k + rng.choices(WORDS, k=3)), "label": float(k)})
        return out

    config = make_config("bert", "lora", **{
        "data.train_file": write_csv(tmp_path / "t.csv", rows(300)),
        "data.validation_file": write_csv(tmp_path / "v.csv", rows(60)),
        "data.regression": True, "training.epochs": 10})
    result = train(config)
    assert result.main_metric == "pearson"
    assert result.metrics["pearson"] > 0.5 and "spearman" in result.metrics


def test_validation_fraction_and_tensorboard(make_config, tmp_path):
    config = make_config("bert", "ia3", **{"data.validation_file": "null", "data.eval_split": "null",
                                           "data.validation_fraction": 0.25, "training.epochs": 1,
                                           "training.tensorboard": True})
    result = train(config)
    assert result.metrics["samples"] == 64  # a quarter of 256 rows held out
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluations_do_not_change_what_is_trained(make_config, tmp_path):
    """Evaluating (before training, every epoch) draws nothing from training's random stream: with dropout on,
    the adapter equals that of a run that never evaluates."""
    import torch
    from safetensors.torch import load_file

    quiet = train(make_config("bert", "lora", {"lora_dropout": 0.3}, **{
        "training.eval_strategy": "no", "training.keep": "last"}, output_dir=tmp_path / "quiet"))
    evaluated = train(make_config("bert", "lora", {"lora_dropout": 0.3}, **{
        "training.eval_strategy": "epoch", "training.keep": "last"}, output_dir=tmp_path / "evaluated"),
        evaluate_before=True)
    assert len(evaluated.history) == 3 and evaluated.initial_metrics
    left = load_file(str(quiet.output_dir / "adapter_model.safetensors"))
    right = load_file(str(evaluated.output_dir / "adapter_model.safetensors"))
    for key in left:
        torch.testing.assert_close(right[key], left[key], rtol=0, atol=0)
