"""Token classification: words and tags (JSON Lines, CoNLL), sub-word alignment, entity metrics (seqeval), every
technique that fits, the encoder architectures, plain-peft round trips, predict / serve / merge / eval --report."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForTokenClassification, AutoTokenizer

from peftlab import build_config, evaluate, load_adapter, merge, predict, train
from peftlab.conll import read_conll
from peftlab.errors import DataError, MethodError
from peftlab.methods import METHODS
from peftlab.testing import tagging_rows, tiny_model_rate, write_jsonl
from peftlab.tasks import get_task
from peftlab.tasks.token_cls import TaggingMeta, tag_scheme

TEXT = "alpha great bravo charlie awful delta"
ARCHS = ["bert", "roberta", "deberta-v2", "distilbert", "electra"]
FITS = [name for name, spec in METHODS.items() if "token-cls" in spec.tasks]


@pytest.fixture(scope="module")
def taggers(tiny_encoders):
    return tiny_encoders  # built once per session (conftest)


@pytest.fixture(scope="module")
def tagging_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagging")
    return {"train": write_jsonl(root / "train.jsonl", tagging_rows(192, seed=1)),
            "validation": write_jsonl(root / "validation.jsonl", tagging_rows(48, seed=2))}


def tagging_config(taggers, tagging_data, tmp_path, arch="bert", method="lora", **overrides):
    raw = {"model": {"name": str(taggers[arch])}, "task": "token-cls", "method": {"name": method},
           "data": {"train_file": str(tagging_data["train"]), "validation_file": str(tagging_data["validation"]),
                    "max_length": 64},
           "training": {"epochs": 8, "batch_size": 16, "learning_rate": tiny_model_rate(METHODS[method], "token-cls"),
                        "progress": False, "seed": 0, "eval_strategy": "no", "keep": "last"},
           "output_dir": str(tmp_path / f"run-{arch}-{method}")}
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


def _probe(tokenizer, model):
    batch = dict(tokenizer([TEXT, "great golf hotel"], padding=True, return_tensors="pt"))
    if "token_type_ids" in batch and model.config.model_type != "bert":
        batch.pop("token_type_ids")
    return batch


def _learned_and_reloads(result, arch):
    """The run beat the majority tag (entity F1 0) by far, and its saved adapter gives the same logits, in peftlab
    and in plain peft on a fresh base."""
    assert result.metrics["loss"] < 0.6 * result.initial_metrics["loss"], result.metrics
    batch = _probe(result.tokenizer, result.model)
    with torch.no_grad():
        before = result.model.eval()(**batch).logits
        loaded = load_adapter(result.output_dir)
        torch.testing.assert_close(loaded.model(**batch).logits, before, rtol=1e-4, atol=1e-5)
    return batch, before


# --- learning, per architecture and per technique --------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lora_tags_entities_on_every_encoder_architecture(taggers, tagging_data, tmp_path, arch):
    result = train(tagging_config(taggers, tagging_data, tmp_path, arch), evaluate_before=True)
    assert result.metrics["f1"] > 0.4 and result.metrics["accuracy"] > 0.85, result.metrics  # majority tag: F1 0
    batch, before = _learned_and_reloads(result, arch)
    base = AutoModelForTokenClassification.from_pretrained(str(taggers[arch]), num_labels=4)
    plain = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, before, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in FITS if m != "lora"])
def test_every_fitting_technique_learns_and_loads_in_plain_peft(taggers, tagging_data, tmp_path, method):
    from peftlab import compat

    spec = METHODS[method]
    result = train(tagging_config(taggers, tagging_data, tmp_path, method=method), evaluate_before=True)
    assert result.metrics["f1"] > 0.4, result.metrics  # the majority tag scores 0
    batch, before = _learned_and_reloads(result, "bert")
    out = result.output_dir
    if spec.full:
        plain = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    else:
        base = AutoModelForTokenClassification.from_pretrained(str(taggers["bert"]), num_labels=4)
        plain = compat.apply_fixes(PeftModel.from_pretrained(base, str(out))).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, before, rtol=1e-4, atol=1e-5)


def test_prefix_tuning_tags_through_the_cache_fix(taggers, tagging_data, tmp_path):
    """Prefix tuning fits token classification (its prompts are keys/values); on BERT it goes through compat's fix."""
    result = train(tagging_config(taggers, tagging_data, tmp_path, method="ptuning-v2"), evaluate_before=True)
    assert result.metrics["f1"] > 0.4, result.metrics
    _learned_and_reloads(result, "bert")


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_prompt_techniques_are_refused_with_the_reason(taggers, tagging_data, tmp_path, method):
    assert "token-cls" not in METHODS[method].tasks and "token-cls" in METHODS[method].unsupported
    with pytest.raises(MethodError, match="virtual tokens are prepended") as error:
        tagging_config(taggers, tagging_data, tmp_path, method=method)
    assert "ptuning-v2" in error.value.hint or "prefix" in error.value.hint


# --- data: alignment, files, errors ------------------------------------------------------------

def test_a_words_first_sub_word_carries_its_tag_or_all_of_them(taggers):
    tokenizer = AutoTokenizer.from_pretrained(str(taggers["roberta"]))  # tiny BPE: "alpha" -> al p ha
    task = get_task("token-cls")
    meta = TaggingMeta(labels=["O", "B-GOOD", "I-GOOD"], scheme="IOB2")
    encoded, words_of = task._encode_words(tokenizer, [["alpha", "great"]], None)
    # <s> al p ha Ġ gr eat </s>: special tokens and the bare space token ("Ġ", no character of a word) have none
    assert words_of[0] == [None, 0, 0, 0, None, 1, 1, None]
    first = task._labels(words_of[0], ["B-GOOD", "O"], meta, "first")
    every = task._labels(words_of[0], ["B-GOOD", "O"], meta, "all")
    assert first == [-100, 1, -100, -100, -100, 0, -100, -100]
    assert every == [-100, 1, 2, 2, -100, 0, 0, -100]  # B- continues as I-


def test_tag_schemes_are_recognised():
    assert tag_scheme(["O", "B-PER", "I-PER"]) == "IOB2"
    assert tag_scheme(["O", "B-PER", "I-PER", "E-PER", "S-LOC"]) == "IOBES"
    assert tag_scheme(["NOUN", "VERB", "ADJ"]) is None


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""

CONLLU = """# sent_id = 1
# text = Don't stop.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tstop\tstop\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

"""


def test_conll_and_conllu_files_read_as_words_and_tags(tmp_path):
    (tmp_path / "a.conll").write_text(CONLL)
    rows = read_conll(tmp_path / "a.conll")
    assert rows == [{"tokens": ["EU", "rejects", "German", "call", "."], "tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    assert read_conll(tmp_path / "a.conll", tag_column=1)[1]["tags"] == ["NNP", "NNP"]
    (tmp_path / "b.conllu").write_text(CONLLU)
    assert read_conll(tmp_path / "b.conllu") == [{"tokens": ["Do", "n't", "stop", "."],
                                                  "tags": ["AUX", "PART", "VERB", "PUNCT"]}]
    (tmp_path / "bad.conllu").write_text("1\tDo\tdo\tAUX\n")
    with pytest.raises(DataError, match="line 1: a CoNLL-U line has 10 tab-separated columns"):
        read_conll(tmp_path / "bad.conllu")
    with pytest.raises(DataError, match="data.conll_tag_column is 7"):
        read_conll(tmp_path / "a.conll", tag_column=7)


def test_a_run_trains_on_conll_files(taggers, tmp_path):
    def conll(rows):
        return "\n".join("\n".join(f"{w} {t}" for w, t in zip(r["tokens"], r["tags"])) + "\n" for r in rows)

    (tmp_path / "train.conll").write_text(conll(tagging_rows(96, seed=3)))
    (tmp_path / "dev.conll").write_text(conll(tagging_rows(24, seed=4)))
    config = build_config({"model": {"name": str(taggers["bert"])}, "task": "token-cls",
                           "data": {"train_file": str(tmp_path / "train.conll"),
                                    "validation_file": str(tmp_path / "dev.conll"), "max_length": 32},
                           "training": {"epochs": 2, "batch_size": 16, "progress": False, "eval_strategy": "no"},
                           "output_dir": str(tmp_path / "run")})
    result = train(config)
    meta = load_adapter(result.output_dir).meta
    assert meta["labels"] == ["O", "B-BAD", "B-GOOD", "I-GOOD"] and meta["scheme"] == "IOB2"
    assert set(evaluate(result.output_dir, data=str(tmp_path / "dev.conll"))) >= {"f1", "precision", "recall"}


@pytest.mark.parametrize("rows,message", [
    ([{"tokens": ["a", "b"], "tags": ["O"]}], "row 0 has 2 words but 1 tags"),
    ([{"tokens": "a b", "tags": ["O", "O"]}], "must be lists"),
    ([{"words": ["a"], "tags": ["O"]}], 'has no column "tokens"'),
])
def test_bad_rows_get_their_own_error(taggers, tmp_path, rows, message):
    write_jsonl(tmp_path / "bad.jsonl", rows * 4)
    config = build_config({"model": {"name": str(taggers["bert"])}, "task": "token-cls",
                           "data": {"train_file": str(tmp_path / "bad.jsonl"), "eval_split": None},
                           "output_dir": str(tmp_path / "run")})
    with pytest.raises(DataError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()


# --- predict, eval --report, serve, merge ------------------------------------------------------

@pytest.fixture(scope="module")
def tagger_run(taggers, tagging_data, tmp_path_factory):
    config = tagging_config(taggers, tagging_data, tmp_path_factory.mktemp("tagger"), "roberta")
    return train(config), config


def test_predict_gives_entities_as_character_spans_of_the_text(tagger_run, tmp_path):
    tagger_run, _ = tagger_run
    [record] = predict(tagger_run.output_dir, texts=[TEXT])
    assert [w["word"] for w in record["words"]] == TEXT.split()
    for item in record["words"] + record["entities"]:
        assert TEXT[item["start"]:item["end"]] == item.get("word", item.get("text"))
    assert {(e["entity"], e["text"]) for e in record["entities"]} >= {("BAD", "awful")}
    # rows of words: the same tags as the text they join into
    [words] = predict(tagger_run.output_dir, file=str(write_jsonl(tmp_path / "words.jsonl",
                                                                 [{"tokens": TEXT.split()}])))
    assert [w["tag"] for w in words["words"]] == [w["tag"] for w in record["words"]]


def test_eval_report_counts_words_per_tag(tagger_run, tmp_path):
    tagger_run, config = tagger_run
    from peftlab.eval_report import classification_report

    report = classification_report(tagger_run.output_dir, output_dir=tmp_path / "report")
    support = {scores.label: scores.support for scores in report.classes}
    rows = [json.loads(line) for line in open(config.data.validation_file)]
    tags = [t for r in rows for t in r["tags"]]
    assert support == {tag: tags.count(tag) for tag in ["O", "B-BAD", "B-GOOD", "I-GOOD"]}
    assert report.metrics["f1"] == pytest.approx(evaluate(tagger_run.output_dir)["f1"])
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()


def test_serve_classify_answers_with_the_predicted_entities(tagger_run):
    tagger_run, config = tagger_run
    from serve_helpers import Running

    from peftlab.serving import create_server

    expected = predict(tagger_run.output_dir, texts=[TEXT])[0]
    running = Running(create_server(config.model.name, {"ner": tagger_run.output_dir}))
    try:
        answer = running.http.post("/v1/classify", json={"model": "ner", "input": [TEXT]}).json()
    finally:
        running.stop()
    [row] = answer["data"]
    assert [(e["entity"], e["start"], e["end"]) for e in row["entities"]] == [
        (e["entity"], e["start"], e["end"]) for e in expected["entities"]]
    assert [w["tag"] for w in row["words"]] == [w["tag"] for w in expected["words"]]


def test_merge_gives_a_plain_tagger_with_the_same_logits(tagger_run, tmp_path):
    tagger_run, _ = tagger_run
    merged = merge(tagger_run.output_dir, tmp_path / "merged")
    model = AutoModelForTokenClassification.from_pretrained(str(merged.output_dir)).eval()
    loaded = load_adapter(tagger_run.output_dir)
    batch = _probe(loaded.tokenizer, model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded.model(**batch).logits, rtol=1e-4, atol=1e-5)
    assert model.config.id2label == {0: "O", 1: "B-BAD", 2: "B-GOOD", 3: "I-GOOD"}


def test_the_majority_tag_baseline_scores_no_entity(taggers, tagging_data, tmp_path):
    from peftlab.data import load_splits

    config = tagging_config(taggers, tagging_data, tmp_path)
    task = get_task("token-cls")
    splits = load_splits(config.data)
    baseline = task.baseline(splits, config.data, task.inspect(splits, config.data))
    assert baseline.metrics["f1"] == 0.0 and baseline.name == "majority tag" and baseline.classes == 4
    tags = [t for row in splits["eval"]["tags"] for t in row]
    assert baseline.metrics["accuracy"] == pytest.approx(tags.count("O") / len(tags))


def test_class_weights_weight_the_loss_per_tag(taggers, tagging_data, tmp_path):
    """Balanced weights make the rare tags weigh more than "O"; the weighted loss is torch's weighted cross-entropy
    over the tagged sub-words only."""
    from peftlab.tasks import balance

    config = tagging_config(taggers, tagging_data, tmp_path, **{"training.class_weights": "balanced",
                                                                "training.epochs": 2})
    result = train(config)
    note = next(n for n in result.notes if n.startswith("class weights (balanced)"))
    task = get_task("token-cls")
    from peftlab.data import load_splits

    splits = load_splits(config.data)
    weights = balance.class_weights("balanced", task.label_counts(splits["train"], config.data,
                                                                  task.inspect(splits, config.data)))
    assert weights["O"] < 1 < weights["I-GOOD"] and f"O {weights['O']:.3g}" in note
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, -100, 3]])

    class Fixed(torch.nn.Module):
        def forward(self, **batch):
            return type("Out", (), {"logits": logits})()

    loss = task.loss_function([0.5, 1.0, 2.0, 4.0])(Fixed(), {"input_ids": labels, "labels": labels})
    expected = (1.0 * torch.nn.functional.cross_entropy(logits[0, 0:1], labels[0, 0:1]) +
                4.0 * torch.nn.functional.cross_entropy(logits[0, 2:3], labels[0, 2:3])) / 5.0
    torch.testing.assert_close(loss, expected)


@pytest.mark.slow  # two trainings and a report (~20 s); CI runs it
def test_compare_ranks_taggers_against_the_majority_tag(taggers, tagging_data, tmp_path):
    from peftlab.comparison import compare

    config = tagging_config(taggers, tagging_data, tmp_path, **{"training.epochs": 4})
    result = compare(config, methods=["lora", "ptuning-v2"], out_dir=tmp_path / "cmp", progress=False)
    assert not result.failed and {row["method"] for row in result.rows} == {"lora", "ptuning-v2"}
    assert result.baselines["majority"]["name"] == "majority tag" and result.baselines["majority"]["value"] == 0.0
    assert all(row["main_metric"] == "f1" and row["main_value"] > 0.2 for row in result.rows), result.rows
    assert (tmp_path / "cmp" / "report.html").is_file()
