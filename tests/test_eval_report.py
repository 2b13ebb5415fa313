"""A readable evaluation: metrics named for what they average, per-class reports, class balance.

`peftlab eval --report` against scikit-learn on the same predictions, its files and its refusal of
generative runs; the imbalance warning and `training.class_weights` (a behaviour test: the
minority class is found more often with balanced weights), recorded in the run and kept on resume;
F1 named `f1_binary` / `f1_macro`, with the old name `f1` still read where configs name it.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from peftlab import build_config, checkpoint, classification_report, cli, load_config, predict, train
from peftlab.errors import ConfigError
from peftlab.eval_report import build_report
from peftlab.tasks.balance import class_weights, imbalance_warning, is_imbalanced
from peftlab.tasks.base import current_metric
from peftlab.testing import NEGATIVE, POSITIVE, keyword_rows, write_csv
from peftlab.train import prepare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def imbalanced_rows(n: int, seed: int, positive_share: float = 0.1) -> list[dict[str, str]]:
    """The keyword task with ``positive_share`` of the rows positive (90/10 by default)."""
    rows = keyword_rows(4 * n, seed)
    positive = [r for r in rows if r["label"] == "positive"]
    negative = [r for r in rows if r["label"] == "negative"]
    k = int(n * positive_share)
    chosen = positive[:k] + negative[:n - k]
    random.Random(seed).shuffle(chosen)
    return chosen


def three_class_rows(n: int, seed: int) -> list[dict[str, str]]:
    """positive (``great``), negative (``awful``) or neutral (neither word)."""
    rows = []
    for i, row in enumerate(keyword_rows(n, seed)):
        if i % 3 == 2:
            words = [w for w in row["text"].split() if w not in (POSITIVE, NEGATIVE)]
            row = {"text": " ".join(words), "label": "neutral"}
        rows.append(row)
    return rows


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_info:
        code = exit_info.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def imbalanced_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imbalanced")
    return {"train": write_csv(root / "train.csv", imbalanced_rows(200, seed=1)),
            "validation": write_csv(root / "validation.csv", keyword_rows(100, seed=2))}  # balanced, to compare


@pytest.fixture(scope="module")
def keyword_run(tiny_models, keyword_data, tmp_path_factory):
    """A trained binary classifier (keyword task), shared by the report tests."""
    out = tmp_path_factory.mktemp("report-run") / "run"
    config = build_config({
        "model": {"name": str(tiny_models["bert"])}, "task": "seq-cls", "method": {"name": "lora"},
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                 "max_length": 32},
        "training": {"max_steps": 12, "batch_size": 16, "learning_rate": 1e-2, "progress": False,
                     "eval_strategy": "no", "seed": 0},
        "output_dir": str(out)})
    return train(config)


def imbalanced_config(make_config, imbalanced_data, tmp_path, name: str, **overrides):
    return make_config("bert", "lora", **{"data.train_file": imbalanced_data["train"],
                                          "data.validation_file": imbalanced_data["validation"],
                                          "training.max_steps": 30, "training.eval_strategy": "no",
                                          "output_dir": tmp_path / name, **overrides})


# --- the report -------------------------------------------------------------------------------

def test_report_equals_scikit_learn_on_the_same_predictions(keyword_run, keyword_data):
    report = classification_report(keyword_run.output_dir)
    with open(keyword_data["validation"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = [r["label"] for r in predict(keyword_run.output_dir, file=str(keyword_data["validation"]))]
    gold = [r["label"] for r in rows]
    labels = ["negative", "positive"]
    precision, recall, f1, support = skm.precision_recall_fscore_support(gold, predicted, labels=labels,
                                                                         zero_division=0)
    assert report.labels == labels and report.positive_label == "positive"
    for row, p, r, f, s in zip(report.classes, precision, recall, f1, support):
        assert (row.precision, row.recall, row.f1, row.support) == pytest.approx((p, r, f, s))
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(gold, predicted, average=average, zero_division=0)
        assert getattr(report, average) == pytest.approx({"precision": p, "recall": r, "f1": f})
    confusion = np.array(report.confusion)
    assert confusion.tolist() == skm.confusion_matrix(gold, predicted, labels=labels).tolist()
    assert confusion.sum() == report.samples == len(rows)
    assert np.trace(confusion) == round(report.accuracy * len(rows))
    # the metrics are peftlab eval's, on the same predictions
    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(gold, predicted))
    assert report.metrics["f1_binary"] == pytest.approx(skm.f1_score(gold, predicted, pos_label="positive"))
    assert report.classes[1].f1 == pytest.approx(report.metrics["f1_binary"])  # F1 of the positive class


def test_report_files_beside_the_run(keyword_run):
    report = classification_report(keyword_run.output_dir, split="eval")
    folder = Path(keyword_run.output_dir) / "reports" / "eval"
    assert report.files == {"json": str(folder / "report.json"), "png": str(folder / "confusion_matrix.png")}
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((folder / "report.json").read_text()) == report.to_dict()
    assert sorted(p.name for p in folder.iterdir()) == ["confusion_matrix.png", "report.json"]  # no temporary left


def test_report_on_three_classes_names_macro_f1(tmp_path):
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    pred[:120] = gold[:120]
    report = build_report(["a", "b", "c"], gold, pred, {}, "test")
    p, r, f, s = skm.precision_recall_fscore_support(gold, pred, zero_division=0)
    assert [c.f1 for c in report.classes] == pytest.approx(f.tolist())
    assert report.macro["f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert report.positive_label is None
    # a label without rows is listed (support 0); averages stay scikit-learn's (as f1_macro)
    report = build_report(["a", "b", "c", "d"], gold, pred, {}, "test")
    assert report.classes[3].support == 0 and len(report.confusion) == 4
    assert report.macro["f1"] == pytest.approx(skm.f1_score(gold, pred, average="macro"))


def test_cli_report_prints_the_tables_and_writes_the_files(keyword_run, capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(capsys, monkeypatch, "eval", str(keyword_run.output_dir), "--report",
                             "--report-dir", str(tmp_path / "rep"))
    assert code == 0, err
    for fragment in ("per class", "precision", "recall", "support", "macro avg", "weighted avg",
                     "confusion matrix", "true \\ predicted", "f1_binary", 'positive class "positive"'):
        assert fragment in out, fragment
    assert (tmp_path / "rep" / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    code, out, _ = run_cli(capsys, monkeypatch, "eval", str(keyword_run.output_dir), "--report", "--json",
                           "--report-dir", str(tmp_path / "rep2"))
    assert code == 0 and json.loads(out)["labels"] == ["negative", "positive"]


def test_report_on_a_generative_run_is_one_clear_error(tiny_lms, generative_data, tmp_path, capsys, monkeypatch):
    config = build_config({
        "model": {"name": str(tiny_lms["llama"])}, "task": "causal-lm", "method": {"name": "lora"},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "prompt_template": "review : {text} label :", "max_length": 32,
                 "target_max_length": 4, "max_eval_samples": 4},
        "training": {"max_steps": 1, "batch_size": 8, "eval_strategy": "no", "progress": False},
        "output_dir": str(tmp_path / "gen")})
    train(config)
    code, _, err = run_cli(capsys, monkeypatch, "eval", str(tmp_path / "gen"), "--report")
    assert code == 2 and "Traceback" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    assert "causal-lm run, which generates text" in err and "--report" in err
    assert not (tmp_path / "gen" / "reports").exists()


# --- metric names ---------------------------------------------------------------------------------

def test_f1_is_named_for_its_average(keyword_run, make_config, tmp_path):
    recorded = json.loads((Path(keyword_run.output_dir) / "metrics.json").read_text())
    assert "f1_binary" in recorded and "f1" not in recorded and "f1_micro" not in recorded
    assert {"f1_binary"} <= set(recorded["history"][-1])

    data = {name: write_csv(tmp_path / f"{name}.csv", three_class_rows(n, seed))
            for name, n, seed in (("train", 120, 1), ("validation", 60, 2))}
    result = train(make_config("bert", "lora", **{"data.train_file": data["train"],
                                                  "data.validation_file": data["validation"],
                                                  "training.max_steps": 4, "training.eval_strategy": "no"}))
    assert "f1_macro" in result.metrics and not {"f1", "f1_binary", "f1_micro"} & set(result.metrics)
    report = classification_report(result.output_dir, write=False)
    assert report.macro["f1"] == pytest.approx(result.metrics["f1_macro"])


def test_an_older_config_naming_f1_still_trains_and_keeps_the_best_by_it(keyword_run, capsys, tmp_path):
    assert current_metric("f1", {"accuracy": 1, "f1_binary": 0.5}) == "f1_binary"
    assert current_metric("f1", {"accuracy": 1, "f1_macro": 0.5}) == "f1_macro"
    assert current_metric("bleu", {"accuracy": 1}) is None
    # the peftlab.yaml of an older run, with metric_for_best: f1 (an old run's metrics.json said "f1")
    saved = yaml.safe_load((Path(keyword_run.output_dir) / "peftlab.yaml").read_text())
    saved["training"].update(metric_for_best="f1", eval_strategy="steps", eval_steps=4, progress=False)
    saved["output_dir"] = str(tmp_path / "again")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    result = train(load_config(tmp_path / "old.yaml"))
    assert result.main_metric == "f1_binary"
    assert result.metrics["f1_binary"] == max(entry["f1_binary"] for entry in result.history)
    assert json.loads((tmp_path / "again" / "peftlab.json").read_text())["main_metric"] == "f1_binary"
    assert 'metric_for_best "f1" is named "f1_binary" now' in capsys.readouterr().err


# --- class balance ------------------------------------------------------------------------------

def test_the_imbalance_rule():
    assert not is_imbalanced({"a": 60, "b": 40}) and is_imbalanced({"a": 61, "b": 39})
    assert is_imbalanced({"a": 10, "b": 0})
    assert imbalance_warning({"a": 90, "b": 10}, "balanced") is None  # weighted already
    assert class_weights("balanced", {"a": 90, "b": 10}) == pytest.approx({"a": 100 / 180, "b": 100 / 20})
    assert class_weights({"b": 3.0}, {"a": 90, "b": 10}) == {"a": 1.0, "b": 3.0}


def test_imbalanced_training_warns_and_balanced_weights_find_the_minority(make_config, imbalanced_data, tmp_path,
                                                                           capsys):
    plain = train(imbalanced_config(make_config, imbalanced_data, tmp_path, "plain"))
    err = capsys.readouterr().err
    assert err.count("the training labels are imbalanced") == 1
    assert "negative 90.0% (180), positive 10.0% (20)" in err and "training.class_weights=balanced" in err

    weighted = train(imbalanced_config(make_config, imbalanced_data, tmp_path, "weighted",
                                       **{"training.class_weights": "balanced"}))
    assert "imbalanced" not in capsys.readouterr().err  # the weights answer the warning
    recall = {name: classification_report(run.output_dir, write=False).classes[1].recall
              for name, run in (("plain", plain), ("weighted", weighted))}
    assert recall["weighted"] > recall["plain"] + 0.1, recall  # same seed, same steps: the minority is found

    record = json.loads((tmp_path / "weighted" / "peftlab.json").read_text())
    assert record["class_weights"] == pytest.approx({"negative": 200 / 360, "positive": 200 / 40})
    assert any(note.startswith("class weights (balanced") for note in record["notes"])
    assert yaml.safe_load((tmp_path / "weighted" / "peftlab.yaml").read_text())["training"]["class_weights"] \
        == "balanced"
    assert "class_weights" not in json.loads((tmp_path / "plain" / "peftlab.json").read_text())


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "full"])
def test_the_weighted_loss_is_the_models_cross_entropy_weighted_for_every_technique(make_config, method):
    config = make_config("bert", method, **{"training.class_weights": {"positive": 3.0}})
    run = prepare(config, overwrite=True)
    model, batch = run.loop.model.eval(), next(iter(run.loop.loader))
    assert run.class_weights == {"negative": 1.0, "positive": 3.0}
    with torch.no_grad():
        out = model(**batch)
        weighted = run.loop.loss(model, batch)
        plain = run.task.loss_function([1.0, 1.0])(model, batch)
    expected = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], weight=torch.tensor([1.0, 3.0]))
    assert float(weighted) == pytest.approx(float(expected), rel=1e-5)
    assert float(plain) == pytest.approx(float(out.loss), rel=1e-5)  # unit weights: the model's own loss
    assert float(weighted) != pytest.approx(float(out.loss), rel=1e-3)


def test_class_weights_survive_resume(make_config, imbalanced_data, tmp_path):
    settings = {"training.max_steps": 8, "training.checkpoint_every": 4, "training.class_weights": "balanced"}
    reference = train(imbalanced_config(make_config, imbalanced_data, tmp_path, "reference", **settings))
    config = imbalanced_config(make_config, imbalanced_data, tmp_path, "resumed", **settings)

    def crash(kind, data):
        if kind == "step" and data["step"] == 6:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(config, on_event=crash)
    changed = imbalanced_config(make_config, imbalanced_data, tmp_path, "resumed",
                                **{**settings, "training.class_weights": {"positive": 2}})
    with pytest.raises(ConfigError, match="training.class_weights: 'balanced' in the checkpoint"):
        train(changed, resume=True)
    resumed = train(config, resume=True)
    assert resumed.metrics == reference.metrics
    assert json.loads((tmp_path / "resumed" / "peftlab.json").read_text())["class_weights"] \
        == json.loads((tmp_path / "reference" / "peftlab.json").read_text())["class_weights"]
    assert not checkpoint.directory_for(config).exists()


def test_class_weights_errors(make_config, tiny_lms, generative_data, tmp_path):
    with pytest.raises(ConfigError, match=r'names "postive", not a label of this run \(did you mean "positive"\?\)'):
        prepare(make_config("bert", "lora", **{"training.class_weights": {"postive": 3}}))
    with pytest.raises(ConfigError, match="positive numbers"):
        make_config("bert", "lora", **{"training.class_weights": {"positive": -1}})
    with pytest.raises(ConfigError, match='must be "balanced" or a mapping'):
        make_config("bert", "lora", **{"training.class_weights": "even"})
    with pytest.raises(ConfigError, match="regression run"):
        make_config("bert", "lora", **{"training.class_weights": "balanced", "data.regression": True})
    with pytest.raises(ConfigError, match="a causal-lm run has no classes"):
        build_config({"model": {"name": str(tiny_lms["llama"])}, "task": "causal-lm",
                      "data": {"train_file": str(generative_data["train"]), "target_column": "target"},
                      "training": {"class_weights": "balanced"}})
