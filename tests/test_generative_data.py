"""Causal-LM data modes (chat messages, plain text) and the generative families' bad inputs."""

from __future__ import annotations

import pytest

from peftlab import build_config, predict, train
from peftlab.errors import ConfigError, DataError
from peftlab.testing import keyword_rows, write_csv


def base_raw(tiny_lms, data, tmp_path, arch="llama", task="causal-lm", **data_options):
    return {
        "model": {"name": str(tiny_lms[arch])}, "task": task, "method": {"name": "lora"},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "max_length": 32,
                 "target_max_length": 4, **data_options},
        "training": {"epochs": 8, "batch_size": 16, "learning_rate": 1e-2, "progress": False, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }


def test_chat_messages_use_the_chat_template(tiny_lms, generative_data, tmp_path):
    raw = base_raw(tiny_lms, {"train": generative_data["chat_train"], "validation": generative_data["chat_validation"]},
                   tmp_path, messages_column="messages")
    result = train(build_config(raw), evaluate_before=True)
    assert result.metrics["accuracy"] >= 0.9 and result.initial_metrics["accuracy"] < 0.5
    out = predict(result.output_dir, texts=["alpha great bravo"])
    assert out[0]["text"] == "user : alpha great bravo assistant : "  # rendered by the tokenizer's template
    assert out[0]["generated"] == "positive"


def test_plain_text_language_modelling_packs_and_reports_perplexity(tiny_lms, tmp_path):
    rows = [{"text": r["text"] + " " + r["label"]} for r in keyword_rows(200, seed=5)]
    data = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows[:40])}
    raw = base_raw(tiny_lms, data, tmp_path)
    raw["training"]["epochs"] = 4
    result = train(build_config(raw), evaluate_before=True)
    assert result.main_metric == "perplexity"
    assert result.metrics["perplexity"] < 0.7 * result.initial_metrics["perplexity"]
    assert result.metrics["perplexity"] == min(e["perplexity"] for e in result.history)  # best = lowest


def test_completion_loss_can_cover_the_whole_sequence(tiny_lms, generative_data, tmp_path):
    from peftlab.tasks import get_task
    from peftlab.data import load_eval_file
    from transformers import AutoTokenizer

    task = get_task("causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lms["llama"]))
    rows = load_eval_file(str(generative_data["validation"])).select(range(3))
    for loss_on, masked in (("completion", True), ("all", False)):
        config = build_config(base_raw(tiny_lms, generative_data, tmp_path, target_column="target",
                                       prompt_template="review : {text} label :", loss_on=loss_on))
        encoded = task.encode(rows, tokenizer, config.data, {"mode": "completion"}, 32, "x")
        for ids, labels in zip(encoded["input_ids"], encoded["labels"]):
            assert labels[-2:] == ids[-2:]  # label word + eos always carry loss
            assert (labels[0] == -100) == masked


@pytest.mark.parametrize("arch, task, message", [
    ("llama", "seq2seq", "task seq2seq needs an encoder-decoder model"),
    ("t5", "causal-lm", "task causal-lm needs a decoder-only model"),
])
def test_family_must_fit_the_architecture(tiny_lms, generative_data, tmp_path, arch, task, message):
    raw = base_raw(tiny_lms, generative_data, tmp_path, arch=arch, task=task, target_column="target")
    with pytest.raises(ConfigError, match=message):
        train(build_config(raw))
    assert not (tmp_path / "run").exists()


def test_template_must_mention_the_text_column(tiny_lms, generative_data, tmp_path):
    raw = base_raw(tiny_lms, generative_data, tmp_path, target_column="target", prompt_template="review : {target}")
    with pytest.raises(ConfigError, match='does not mention the text column "text"'):
        train(build_config(raw))


def test_template_must_name_a_column(tiny_lms, generative_data, tmp_path):
    raw = base_raw(tiny_lms, generative_data, tmp_path, target_column="target", prompt_template="no fields")
    with pytest.raises(ConfigError, match="names no column"):
        build_config(raw)


def test_empty_completions_are_refused(tiny_lms, tmp_path):
    rows = [{"text": "alpha", "target": "positive"}, {"text": "bravo", "target": ""}] * 10
    data = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows)}
    raw = base_raw(tiny_lms, data, tmp_path, target_column="target")
    with pytest.raises(DataError, match='empty value\\(s\\) in the target column "target"'):
        train(build_config(raw))


@pytest.mark.parametrize("arch, task", [("t5", "seq2seq"), ("llama", "causal-lm")])
def test_long_targets_warn_with_counts_and_truncate(tiny_lms, tmp_path, capsys, arch, task):
    rows = [{"text": "alpha great", "target": "positive " * (6 if i % 4 == 0 else 1)} for i in range(40)]
    data = {"train": write_csv(tmp_path / "t.csv", rows), "validation": write_csv(tmp_path / "v.csv", rows)}
    raw = base_raw(tiny_lms, data, tmp_path, arch=arch, task=task, target_column="target", target_max_length=3)
    raw["training"].update(max_steps=1)
    result = train(build_config(raw))
    err = capsys.readouterr().err
    assert "the train split: 10 of 40" in err and "target_max_length=3" in err and "truncated" in err
    assert result.output_dir.is_dir()


@pytest.fixture(scope="module")
def completion_run(tiny_lms, generative_data, tmp_path_factory):
    raw = base_raw(tiny_lms, generative_data, tmp_path_factory.mktemp("completion"), target_column="target",
                   prompt_template="review : {text} label :")
    return train(build_config(raw)).output_dir


def test_batched_generation_equals_one_by_one(completion_run):
    texts = ["alpha great", "delta awful echo foxtrot golf hotel india", "kilo great lima mike november"]
    batched = predict(completion_run, texts=texts, batch_size=3)  # left-padded batch
    single = [predict(completion_run, texts=[t], batch_size=1)[0] for t in texts]
    assert batched == single
    assert {r["generated"] for r in batched} == {"positive", "negative"}


def test_stop_strings_and_token_budget(completion_run):
    free = predict(completion_run, texts=["alpha great bravo"], generation={"max_new_tokens": 4})[0]["generated"]
    assert free == "positive"
    stopped = predict(completion_run, texts=["alpha great bravo"], generation={"stop": ["itive"]})[0]["generated"]
    assert stopped == "pos"  # generation stopped at the stop string, which is cut off
    assert "itive" not in stopped


def test_text_metrics_for_free_text():
    from peftlab.tasks.generation import text_metrics, target_meta

    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    perfect = text_metrics(refs, refs, label_like=False)
    assert perfect["exact_match"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)
    partial = text_metrics(["the cat sat", "a slow green turtle"], refs, label_like=False)
    assert partial["exact_match"] == 0.0 and 0 < partial["rougeL"] < 100 and 0 < partial["chrf"] < 100
    assert text_metrics(["Positive ", "negative"], ["positive", "neutral"], label_like=True) == {"accuracy": 0.5}
    assert target_meta(["positive", "negative", "positive"])["label_like"]
    assert not target_meta([f"a long free text answer number {i}" for i in range(3)])["label_like"]
