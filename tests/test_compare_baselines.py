"""peftlab compare's references and honest timing: the majority class / base model / untrained adapter a
comparison is read against, the verdict when nothing beats them (with the command to run next), rows marked
when other processes loaded the machine, and --repeat-timing."""

from __future__ import annotations

import dataclasses

import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter

import datasets
import psutil
import pytest
import yaml

from peftlab import build_config, cli, compare
from peftlab.comparison import baselines as rules
from peftlab.comparison.measure import LOAD_THRESHOLD, Counters, MachineLoad, under_load
from peftlab.comparison.report import assess, markdown, table
from peftlab.comparison.summary import summarize
from peftlab.comparison.verdict import next_command
from peftlab.methods import METHODS, BudgetHint
from peftlab.config import DataConfig
from peftlab.tasks import get_task
from peftlab.testing import chat_rows, keyword_rows, label_text_rows


@pytest.fixture(scope="module")
def seq_cls_raw(tiny_models, keyword_data) -> dict:
    return {
        "model": {"name": str(tiny_models["bert"])}, "task": "seq-cls",
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                 "max_length": 32},
        "training": {"max_steps": 1, "batch_size": 16, "eval_strategy": "no", "seed": 0},
    }


def _majority_share(train: list, gold: list) -> tuple[str, float]:
    """By hand: the train split's most common label, and its share of the eval rows."""
    label = Counter(train).most_common(1)[0][0]
    return label, sum(value == label for value in gold) / len(gold)


# --- the task families' baseline ---------------------------------------------------------

def test_a_classifiers_baseline_is_the_training_majority_scored_by_evaluate():
    train, evaluation = keyword_rows(256, seed=1), keyword_rows(64, seed=2)
    splits = {"train": datasets.Dataset.from_list(train), "eval": datasets.Dataset.from_list(evaluation)}
    data, task = DataConfig(train_file="x.csv"), get_task("seq-cls")
    baseline = task.baseline(splits, data, task.inspect(splits, data))
    label, share = _majority_share([r["label"] for r in train], [r["label"] for r in evaluation])
    assert baseline.name == "majority class" and f'always "{label}"' in baseline.description
    assert baseline.metrics["accuracy"] == pytest.approx(share) and baseline.classes == 2
    assert baseline.metrics["mcc"] == 0.0 and baseline.metrics["samples"] == 64
    # the loss of predicting the label shares: their cross-entropy against the eval labels
    shares = Counter(r["label"] for r in train)
    expected = -statistics.fmean(math.log(shares[r["label"]] / 256) for r in evaluation)
    assert baseline.metrics["loss"] == pytest.approx(expected, rel=1e-5)
    # every metric evaluate() reports, under its names
    assert set(baseline.metrics) >= {"loss", "samples", "accuracy", "mcc"}

    regression = [{"text": r["text"], "label": float(len(r["text"]))} for r in train]
    splits = {"train": datasets.Dataset.from_list(regression), "eval": datasets.Dataset.from_list(regression[:40])}
    data = DataConfig(train_file="x.csv", regression=True)
    baseline = task.baseline(splits, data, task.inspect(splits, data))
    mean = statistics.fmean(r["label"] for r in regression)
    assert baseline.name == "training mean" and baseline.metrics["pearson"] == 0.0
    assert baseline.metrics["mse"] == pytest.approx(statistics.fmean((r["label"] - mean) ** 2 for r in regression[:40]),
                                                    rel=1e-4)


@pytest.mark.parametrize("task_name, rows, data", [
    ("seq2seq", label_text_rows, {"target_column": "target"}),
    ("causal-lm", label_text_rows, {"target_column": "target", "prompt_template": "review : {text} label :"}),
    ("causal-lm", chat_rows, {"messages_column": "messages"}),
])
def test_label_like_generation_has_a_majority_answer_and_free_text_none(task_name, rows, data):
    train, evaluation = rows(256, seed=1), rows(64, seed=2)
    splits = {"train": datasets.Dataset.from_list(train), "eval": datasets.Dataset.from_list(evaluation)}
    config, task = DataConfig(train_file="x.csv", **data), get_task(task_name)
    baseline = task.baseline(splits, config, task.inspect(splits, config))
    answer = (lambda r: r["messages"][-1]["content"]) if "messages_column" in data else (lambda r: r["target"])
    label, share = _majority_share([answer(r) for r in train], [answer(r) for r in evaluation])
    assert baseline.name == "majority answer" and f'always "{label}"' in baseline.description
    assert baseline.metrics["accuracy"] == pytest.approx(share) and baseline.classes == 2

    free = [{"text": r["text"], "target": f"{r['target']} because {r['text']}"} for r in label_text_rows(64, seed=3)]
    splits = {"train": datasets.Dataset.from_list(free), "eval": datasets.Dataset.from_list(free)}
    config = DataConfig(train_file="x.csv", target_column="target")
    assert task.baseline(splits, config, task.inspect(splits, config)) is None  # the base model is the reference
    if task_name == "causal-lm":
        config = DataConfig(train_file="x.csv")  # plain text: perplexity
        assert task.baseline(splits, config, task.inspect(splits, config)) is None


# --- the rules -----------------------------------------------------------------------------

def test_margin_and_loss_trend_rules():
    assert rules.margin("accuracy", 0.5, 100) == pytest.approx(0.1)  # 2 * sqrt(0.25 / 100)
    assert rules.margin("accuracy", 0.0, 98) == pytest.approx(2 * math.sqrt((1 / 100) * (99 / 100) / 98))
    assert rules.margin("pearson", 0.0, 400) == pytest.approx(0.1)
    assert rules.margin("rougeL", 40.0, 100) == pytest.approx(0.8)
    assert rules.beats(0.61, 0.5, "accuracy", 0.1) and not rules.beats(0.6, 0.5, "accuracy", 0.1)
    assert rules.beats(9.0, 10.0, "perplexity", 0.2) and not rules.beats(9.9, 10.0, "perplexity", 0.2)
    curve = lambda losses: [[i + 1, loss] for i, loss in enumerate(losses)]  # noqa: E731
    assert rules.loss_trend(curve([0.7] * 20)) == "flat"
    assert rules.loss_trend(curve([0.7, 0.68] + [0.3] * 18)) == "fell"
    assert rules.loss_trend(curve([0.7] * 10 + [2.0] * 10)) == "rose"
    assert rules.loss_trend(curve([0.7, float("nan")])) == "rose"
    assert rules.loss_trend(curve([0.7])) == "flat"  # one step cannot fall
    assert rules.loss_trend(None) is None


def test_the_next_command_is_the_typed_one_with_a_larger_budget():
    typed = ["peftlab", "compare", "r.yaml", "--methods", "lora,ia3,prompt", "-s", "training.max_steps=30",
             "--set=data.max_length=64", "--lr-sweep=3", "-o", "runs/cmp"]
    header = {"command": typed, "out_dir": "runs/cmp"}
    assert next_command(header, ["ia3", "prompt"], 120, sweep=True) == (
        "peftlab compare r.yaml --set=data.max_length=64 --lr-sweep=3 --methods ia3,prompt "
        "--set training.max_steps=120 -o runs/cmp-120steps")
    assert next_command(header, None, 140, sweep=False) == (
        "peftlab compare r.yaml --methods lora,ia3,prompt --set=data.max_length=64 --set training.max_steps=140 "
        "--lr-sweep 3 -o runs/cmp-140steps")
    assert next_command({"out_dir": "runs/compare"}, None, 40, sweep=False) == (
        "peftlab compare RECIPE.yaml --set training.max_steps=40 --lr-sweep 3 -o runs/compare-40steps")


# --- comparisons ---------------------------------------------------------------------------

def test_nothing_learned_gets_the_verdict_and_the_command_to_run_next(seq_cls_raw, keyword_data, tmp_path,
                                                                       monkeypatch, capsys):
    """One step: no method can beat the majority class; the terminal, the report and results.json say so, with
    what the calibration found for a technique (its registry budget hint)."""
    hint = BudgetHint("it learned at 900 steps on the calibration recipe", steps=450, batch=32)
    monkeypatch.setitem(METHODS, "ia3", dataclasses.replace(METHODS["ia3"], budget_hints={"seq-cls": hint}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(seq_cls_raw))
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["peftlab", "compare", str(recipe), "--methods", "lora,ia3", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    # the budget the hint names (450 steps of 32 = 900 of this comparison's batch of 16), not 4x one step
    command = f"peftlab compare {recipe} --methods lora,ia3 --set training.max_steps=900 --lr-sweep 3 -o {out}-900steps"
    printed = " ".join(captured.out.split())  # the terminal wraps long lines
    assert "No method beats the majority class by more than" in printed
    assert "too few steps for 2 classes: each run saw 1 step x batch 16 = 16 training examples" in printed
    assert f"next: {command}" in printed
    assert ("ia3: needs about 450 steps of batch 32 at its default rate; it learned at 900 steps on the calibration "
            "recipe (these runs: 1 step of batch 16)") in printed and "lora: " not in printed
    assert "baseline majority class: accuracy" in captured.err  # the progress display, before the runs
    table_rows = [line.split("│")[1].strip() for line in captured.out.splitlines() if line.startswith("│")]
    assert table_rows == ["lora", "ia3", "majority class", "untrained adapter"]

    saved = json.loads((out / "results.json").read_text())
    train = list(csv_labels(keyword_data["train"]))
    label, share = _majority_share(train, list(csv_labels(keyword_data["validation"])))
    majority = saved["baselines"]["majority"]
    assert majority["value"] == pytest.approx(share) and majority["metric"] == "accuracy"
    assert majority["samples"] == 64 and f'always "{label}"' in majority["description"]
    assert set(saved["baselines"]["untrained"]["per_method"]) == {"lora", "ia3"}
    assert saved["verdict"]["level"] == "warning" and saved["verdict"]["command"] == command
    for row in saved["rows"]:
        assert row["initial_value"] == row["initial_metrics"]["accuracy"]
        assert row["other_cpu_cores"] >= 0 and isinstance(row["under_load"], bool) and row["cpus"] >= 1
        assert row["load_avg_start"] is not None and row["load_avg_end"] is not None
    md = (out / "results.md").read_text()
    assert md.index("**Warning:** No method beats") < md.index("| method |")  # at the top
    assert "| *majority class* |" in md and "| *untrained adapter* |" in md
    assert md.count(" ✗ |") == 2 and command in md
    page = (out / "report.html").read_text()
    assert 'class="verdict warning"' in page and page.count('class="reference"') == 2


def csv_labels(path):
    import csv

    with open(path) as handle:
        for row in csv.DictReader(handle):
            yield row["label"]


def test_a_learnable_task_beats_the_baseline(seq_cls_raw, tmp_path):
    raw = {**seq_cls_raw, "training": {**seq_cls_raw["training"], "max_steps": 64}}
    result = compare(build_config(raw), methods=["lora"], out_dir=tmp_path / "cmp", progress=False,
                     method_overrides={"lora": ["training.learning_rate=0.01"]})
    assert result.rows[0]["main_value"] > result.baselines["majority"]["value"] + 0.15
    assert result.verdict.level == "ok" and result.verdict.headline.startswith("Every method beats the majority class")
    assert result.verdict.command is None
    assert rules.loss_trend(result.rows[0]["loss_curve"]) == "fell"
    assert "✗" not in (tmp_path / "cmp" / "results.md").read_text()


def test_the_base_model_is_measured_for_generation_and_equals_untrained_lora(tiny_lms, generative_data, tmp_path,
                                                                            monkeypatch):
    """A generative comparison measures the base model without adapter once; a LoRA adapter starts as the identity,
    so its evaluation before training is the base model's; a re-run reuses the measurement."""
    raw = {"model": {"name": str(tiny_lms["llama"])}, "task": "causal-lm",
           "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                    "target_column": "target", "prompt_template": "review : {text} label :", "max_length": 32,
                    "target_max_length": 4, "max_eval_samples": 8},
           "training": {"max_steps": 2, "batch_size": 8, "eval_strategy": "no", "seed": 0}}
    result = compare(build_config(raw), methods=["lora"], out_dir=tmp_path / "cmp", progress=False)
    base = result.baselines["base_model"]
    assert base["metric"] == "accuracy" and base["samples"] == 8
    assert base["metrics"]["loss"] == pytest.approx(result.rows[0]["initial_metrics"]["loss"], rel=1e-5)
    assert result.baselines["majority"]["name"] == "majority answer"

    monkeypatch.setattr(rules, "measure_base_model", lambda *a: pytest.fail("measured again"))
    again = compare(build_config(raw), methods=["lora"], out_dir=tmp_path / "cmp", progress=False)
    assert again.skipped == ["lora-seed0"] and again.baselines["base_model"] == base


# --- the machine's load and repeated timing ------------------------------------------------

def test_load_is_other_processes_cpu_time_over_wall_time():
    readings = iter([Counters(wall=10.0, busy=100.0, own=40.0, load_avg=1.0),
                     Counters(wall=20.0, busy=118.0, own=48.0, load_avg=2.0)])
    with MachineLoad(read=lambda: next(readings)) as load:
        pass
    record = load.record()
    # 18 busy CPU seconds in 10 s, 8 of them this process's: other processes kept 1 core busy
    assert record["other_cpu_cores"] == 1.0 and record["under_load"] and record["own_cpu_cores"] == 0.8
    assert (record["load_avg_start"], record["load_avg_end"]) == (1.0, 2.0)
    assert under_load(LOAD_THRESHOLD + 0.01) and not under_load(LOAD_THRESHOLD) and not under_load(None)

    base = {"status": "ok", "main_metric": "accuracy", "main_value": 0.8, "lr_source": "default", "overrides": [],
            "learning_rate": 1e-3, "trainable_params": 10, "trainable_share": 0.1, "peak_memory_mb": 1.0,
            "samples_per_second": 10.0, "tokens_per_second": 100.0, "wall_seconds": 5.0, "adapter_bytes": 10,
            "task": "seq-cls", "seed": 0}
    rows = [{**base, "name": "quiet-seed0", "method": "quiet", "other_cpu_cores": 0.1, "under_load": False},
            {**base, "name": "busy-seed0", "method": "busy", "other_cpu_cores": 0.9, "under_load": True}]
    _, body = table(summarize(rows))
    assert [cell for cell in body[0] if "†" in cell] == []
    assert [cell for cell in body[1] if "†" in cell] == ["10.0 †", "100 †", "5.0 s †"]
    assert "† measured while other processes kept more than 0.25 of a core busy on average (busy-seed0 0.90" \
           in markdown(summarize(rows))


def _busy_loop() -> psutil.Process:
    """A busy loop outside this process's tree (a grandchild, orphaned), so it counts as another process."""
    started = subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, "
                              "'-c', 'while True: pass'], start_new_session=True, stdin=subprocess.DEVNULL, "
                              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
                             capture_output=True, text=True, check=True, timeout=30)
    loop = psutil.Process(int(started.stdout))
    deadline = time.time() + 10
    while loop.cpu_times().user < 0.3 and time.time() < deadline:  # running, not starting
        time.sleep(0.05)
    return loop


@pytest.mark.slow  # a busy process beside a run: ~3 s (CI runs it)
def test_a_run_measured_beside_a_busy_process_is_marked(seq_cls_raw, tmp_path):
    loop = _busy_loop()
    try:
        raw = {**seq_cls_raw, "training": {**seq_cls_raw["training"], "max_steps": 8}}
        result = compare(build_config(raw), methods=["ia3"], out_dir=tmp_path / "cmp", progress=False)
    finally:
        loop.kill()
    row = result.rows[0]
    assert row["under_load"] and row["other_cpu_cores"] > LOAD_THRESHOLD, row["other_cpu_cores"]
    assert "†" in (tmp_path / "cmp" / "results.md").read_text()


def test_repeat_timing_measures_throughput_n_times(seq_cls_raw, tmp_path):
    raw = {**seq_cls_raw, "training": {**seq_cls_raw["training"], "max_steps": 4}}
    result = compare(build_config(raw), methods=["lora"], out_dir=tmp_path / "cmp", progress=False, repeat_timing=3)
    row = result.rows[0]
    timing = row["timing"]
    assert timing["repeats"] == 3 and timing["steps"] == 4 and len(timing["measurements"]) == 3
    speeds = [m["samples_per_second"] for m in timing["measurements"]]
    assert all(speed > 0 for speed in speeds) and row["samples_per_second"] == statistics.median(speeds)
    assert row["samples_per_second_range"] == [min(speeds), max(speeds)]
    assert row["run_samples_per_second"] > 0 and isinstance(row["timing_under_load"], bool)
    assert all(m["other_cpu_cores"] is not None for m in timing["measurements"])
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert f"{row['samples_per_second']:,.1f} ±{(max(speeds) - min(speeds)) / 2:,.1f}" in md
    assert "the median of 3 timing repeats of 4 training steps per run, ± half their range" in md
    assert not list((tmp_path / "cmp" / "runs").glob("*.checkpoints"))  # timing saves nothing


def test_a_sweep_is_judged_by_each_methods_best_rate_and_a_flat_loss_is_named():
    """With --lr-sweep a method beats the reference when its best rate does (every rate is marked in the table); a
    method whose loss stayed flat is named as not converged, with the command for it alone."""
    def row(method, lr, value, losses):
        return {"name": f"{method}-seed0-lr{lr}", "method": method, "seed": 0, "learning_rate": lr,
                "lr_source": "default", "overrides": [], "status": "ok", "task": "seq-cls", "main_metric": "accuracy",
                "main_value": value, "metrics": {"accuracy": value, "loss": 0.5}, "steps": 40,
                "loss_curve": [[i + 1, loss] for i, loss in enumerate(losses)]}

    falling, flat = [0.7] * 5 + [0.4] * 35, [0.7] * 40
    rows = [row("lora", 1e-3, 0.60, flat), row("lora", 3e-3, 0.80, falling),
            row("ia3", 1e-3, 0.60, flat), row("ia3", 3e-3, 0.61, flat)]
    majority = {"name": "majority class", "description": 'always "positive"', "metric": "accuracy", "value": 0.6,
                "samples": 500.0, "classes": 2, "metrics": {"accuracy": 0.6, "samples": 500.0, "loss": 0.67}}
    header = {"base_config": {"training": {"batch_size": 32, "gradient_accumulation_steps": 1}}, "lr_sweep": 3,
              "out_dir": "runs/cmp", "command": ["peftlab", "compare", "r.yaml", "--lr-sweep", "3", "-o", "runs/cmp"],
              "baselines": {"majority": majority}}
    summary, found = assess(rows, header)
    assert [g.beats_reference for g in summary.groups] == [False, True, False, False]
    assert found.level == "warning" and found.headline.startswith("lora lr 0.003 beats the majority class")
    assert "ia3 lr 0.003 does not" in found.headline and "lora lr 0.001" not in found.headline
    assert found.causes == ["the training loss fell by less than 10% in ia3 lr 0.003: too few steps, or a learning "
                            "rate too low for this budget"]
    assert found.command == "peftlab compare r.yaml --lr-sweep 3 --methods ia3 --set training.max_steps=160 " \
                            "-o runs/cmp-160steps"
