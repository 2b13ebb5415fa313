"""Each bad input: one clear message, non-zero exit, no traceback, no half-written output."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab import cli
from peftlab.testing import keyword_rows, write_csv


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def write_recipe(tmp_path: Path, config) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config.to_dict() if hasattr(config, "to_dict") else config))
    return path


def expect_error(capsys, monkeypatch, args, *fragments: str, output: Path | None = None) -> str:
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if output is not None:
        assert not output.exists(), "a failed run left its output directory"
        assert not list(output.parent.glob(f".{output.name}.*")), "a failed run left a temporary directory"
    return err


@pytest.fixture
def recipe(make_config, tmp_path):
    """A valid recipe as a raw mapping, to break in one place per test."""
    return make_config("bert", "lora", **{"training.epochs": 1}).to_dict()


def train_args(tmp_path, raw, *extra):
    return ["train", str(write_recipe(tmp_path, raw)), *extra]


def test_unknown_config_key_suggests_the_right_one(capsys, monkeypatch, tmp_path, recipe):
    recipe["training"]["learning_rat"] = 1e-3
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "training.learning_rat",
                 'did you mean "learning_rate"', output=Path(recipe["output_dir"]))


def test_unknown_override_key(capsys, monkeypatch, tmp_path, recipe):
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--set", "data.max_lenght=64"),
                 'did you mean "max_length"')


def test_missing_recipe(capsys, monkeypatch, tmp_path):
    expect_error(capsys, monkeypatch, ["train", str(tmp_path / "recipe.yml")], "config file not found", "recipe.yml")


def test_recipe_that_is_a_folder(capsys, monkeypatch, tmp_path):
    expect_error(capsys, monkeypatch, ["train", str(tmp_path)], "is a folder, not a recipe file")

def test_recipe_with_a_yaml_syntax_error_names_the_file_and_line(capsys, monkeypatch, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  name: bert\ndata:\n  train_file: train.csv\n   max_length: 32\n")
    expect_error(capsys, monkeypatch, ["train", str(path)], f"{path} is not valid YAML", "line 5",
                 "indentation")


@pytest.mark.parametrize("text, fragment", [("- model\n- data\n", "holds a list"),
                                            ("just some words\n", "holds a single text")])
def test_recipe_that_is_not_a_mapping(capsys, monkeypatch, tmp_path, text, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    expect_error(capsys, monkeypatch, ["train", str(path)], "must be a mapping of sections", fragment, "`model:`")


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_recipe(capsys, monkeypatch, tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    expect_error(capsys, monkeypatch, ["train", str(path)], f"{path} is empty", "`model:` section")


def test_recipe_that_is_not_utf8(capsys, monkeypatch, tmp_path, recipe):
    path = write_recipe(tmp_path, recipe)
    path.write_bytes(path.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    expect_error(capsys, monkeypatch, ["train", str(path)], "is not UTF-8 text (byte 0xe9 on line",
                 "save the recipe as UTF-8")


@pytest.mark.parametrize("key, value, fragments", [
    ("training.batch_size", "sixteen", ['`training.batch_size` is "sixteen"', "must be a whole number"]),
    ("training.learning_rate", -1, ["`training.learning_rate` is -1", "must be greater than 0"]),
    ("data.max_length", 2, ["`data.max_length` is 2", "must be at least 8"]),
    ("training.precision", "fp8", ['`training.precision` is "fp8"', "must be one of 'auto', 'fp32'"]),
    ("training.progress", "maybe", ['`training.progress` is "maybe"', "must be true or false"]),
    ("model", "bert", ['`model` is "bert"', "must be a section"]),
])
def test_wrong_type_or_out_of_range_value(capsys, monkeypatch, tmp_path, recipe, key, value, fragments):
    *sections, last = key.split(".")
    node = recipe
    for section in sections:
        node = node[section]
    node[last] = value
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "invalid config", *fragments,
                 output=Path(recipe["output_dir"]))


def test_wrong_type_in_an_override(capsys, monkeypatch, tmp_path, recipe):
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--set", "training.batch_size=sixteen"),
                 '`training.batch_size` is "sixteen"', "must be a whole number")


def test_unknown_method(capsys, monkeypatch, tmp_path, recipe):
    recipe["method"]["name"] = "lorra"
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'unknown method "lorra"', 'did you mean "lora"')


def test_unknown_method_option(capsys, monkeypatch, tmp_path, recipe):
    recipe["method"]["options"] = {"rank": 4}
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "unknown option `rank`")


def test_unknown_task(capsys, monkeypatch, tmp_path, recipe):
    recipe["task"] = "seq_cls"
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'unknown task "seq_cls"', 'did you mean "seq-cls"')


def test_method_that_does_not_fit_the_architecture(capsys, monkeypatch, tmp_path, recipe):
    recipe["method"]["options"] = {"target_modules": ["q_proj", "v_proj"]}
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'method "lora" cannot be applied',
                 "q_proj", output=Path(recipe["output_dir"]))


def test_missing_column(capsys, monkeypatch, tmp_path, recipe):
    recipe["data"]["text_column"] = "sentence"
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'no column "sentence"', "text, label",
                 output=Path(recipe["output_dir"]))


def test_misnamed_column_suggests(capsys, monkeypatch, tmp_path, recipe):
    recipe["data"]["label_column"] = "labels"
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'no column "labels"', 'did you mean "label"')


def test_labels_outside_the_configured_set(capsys, monkeypatch, tmp_path, recipe):
    recipe["data"]["labels"] = ["negative", "neutral"]
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "outside the label set [negative, neutral]: 'positive'",
                 output=Path(recipe["output_dir"]))


LATIN1_CSV = "text,label\nalpha great,positive\ncaf\u00e9 awful,negative\n".encode("latin-1")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


@pytest.mark.parametrize("name, content, fragments", [
    ("train.csv", b"", ["the train file", "train.csv is empty (0 bytes)"]),
    ("train.csv", b"text,label\n", ["train.csv has a header line but no rows"]),
    ("train.jsonl", b"\n  \n", ["train.jsonl holds only blank lines"]),
    ("train.txt", b"alpha great\n", ['unknown file type ".txt"', ".csv, .tsv, .jsonl"]),
    ("train.csv", PNG, ["train.csv holds binary data, not CSV text", "extension"]),
    ("train.parquet", b"text,label\n", ["train.parquet is not a Parquet file"]),
    ("train.csv", LATIN1_CSV, ["train.csv is not UTF-8 text (byte 0xe9 on line 3)", "re-encode it as UTF-8",
                               "iconv"]),
    ("train.csv", b"\xff\xfet\x00e\x00x\x00t\x00", ["train.csv is UTF-16 text", "iconv -f utf-16"]),
])
def test_unreadable_data_file(capsys, monkeypatch, tmp_path, recipe, name, content, fragments):
    bad = tmp_path / name
    bad.write_bytes(content)
    recipe["data"]["train_file"] = str(bad)
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), *fragments, output=Path(recipe["output_dir"]))


def test_unreadable_file_for_eval(capsys, monkeypatch, tmp_path, trained):
    bad = tmp_path / "more.csv"
    bad.write_bytes(LATIN1_CSV)
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--data", str(bad)],
                 f"the data file {bad} is not UTF-8 text", "iconv")


def test_missing_file_for_eval(capsys, monkeypatch, tmp_path, trained):
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--data", str(tmp_path / "more.csv")],
                 "data file not found", "more.csv")

def test_empty_validation_split(capsys, monkeypatch, tmp_path, recipe):
    empty = tmp_path / "validation.csv"
    empty.write_text("text,label\n")
    recipe["data"]["validation_file"] = str(empty)
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "the validation file",
                 "has a header line but no rows", output=Path(recipe["output_dir"]))


def test_overlong_texts_are_truncated_with_one_warning(capsys, monkeypatch, tmp_path, recipe, tiny_models,
                                                        keyword_data):
    import csv

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert"]))

    def too_long(path):
        with open(path) as handle:
            return sum(len(tokenizer(row["text"])["input_ids"]) > 8 for row in csv.DictReader(handle))

    recipe["data"]["max_length"] = 8
    code, _, err = run_cli(capsys, monkeypatch, *train_args(tmp_path, recipe, "--set", "training.max_steps=2"))
    assert code in (0, None), err
    n_train, n_eval = too_long(keyword_data["train"]), too_long(keyword_data["validation"])
    assert 0 < n_train < 256 and 0 < n_eval < 64
    assert (f"{n_train} of 256 rows in the train split are longer than max_length=8 tokens and were truncated"
            in err), err
    assert f"{n_eval} of 64 rows in the eval split are longer than max_length=8 tokens" in err
    assert sum("truncated" in line for line in err.splitlines()) == 2
    assert (Path(recipe["output_dir"]) / "adapter_model.safetensors").is_file()


def test_texts_within_max_length_give_no_warning(capsys, monkeypatch, tmp_path, recipe):
    code, _, err = run_cli(capsys, monkeypatch, *train_args(tmp_path, recipe, "--set", "training.max_steps=2"))
    assert code in (0, None), err
    assert "truncated" not in err


def test_malformed_file(capsys, monkeypatch, tmp_path, recipe):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "alpha great", "label": "positive"}\n{"text": "oops\n')
    recipe["data"]["train_file"] = str(bad)
    recipe["data"]["validation_file"] = None
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "could not read", "bad.jsonl")


def test_missing_file(capsys, monkeypatch, tmp_path, recipe):
    recipe["data"]["train_file"] = str(tmp_path / "nope.csv")
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "train file not found")


def test_failure_mid_run_leaves_no_output(capsys, monkeypatch, tmp_path, recipe):
    recipe["training"]["metric_for_best"] = "bleu"  # only known to be wrong at the first evaluation
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'metric_for_best "bleu"',
                 output=Path(recipe["output_dir"]))


def test_existing_output_is_not_clobbered(capsys, monkeypatch, tmp_path, recipe):
    out = Path(recipe["output_dir"])
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_is_an_existing_file(capsys, monkeypatch, tmp_path, recipe):
    out = Path(recipe["output_dir"])
    out.write_text("mine")
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--overwrite"), "is a file, not a directory")
    assert out.read_text() == "mine"


def test_overwrite_never_removes_files_peftlab_did_not_write(capsys, monkeypatch, tmp_path, recipe):
    out = Path(recipe["output_dir"])
    out.mkdir(parents=True)
    (out / "train.csv").write_text("text,label\n")
    (out / "notes.txt").write_text("mine")
    no_training_work(monkeypatch)
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--overwrite"),
                 "holds files peftlab did not write", "notes.txt", "train.csv", "only replaces a peftlab run")
    assert (out / "notes.txt").read_text() == "mine" and (out / "train.csv").is_file()


def test_quickstart_refuses_a_folder_of_user_files(capsys, monkeypatch, tmp_path):
    (tmp_path / "mydata.csv").write_text("mine")  # quickstart replaces its own output by default
    expect_error(capsys, monkeypatch, ["quickstart", "--out", str(tmp_path)], "holds files peftlab did not write")
    assert (tmp_path / "mydata.csv").read_text() == "mine"


def test_failed_overwrite_keeps_the_previous_run(capsys, monkeypatch, tmp_path, recipe, trained):
    out = copy_adapter(trained, tmp_path / "run")
    before = snapshot(out)
    recipe["training"]["metric_for_best"] = "bleu"  # fails at the first evaluation, after training started
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--overwrite", "--output-dir", str(out)),
                 'metric_for_best "bleu"')
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".run.*")), "a failed run left a temporary directory"


def test_finished_run_keeps_user_files_in_its_checkpoint_dir(make_config, tmp_path):
    from peftlab import train

    mine = tmp_path / "scratch"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    train(make_config("bert", "lora", **{"training.max_steps": 2, "training.checkpoint_every": 1,
                                         "training.checkpoint_dir": str(mine)}))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # the checkpoints are gone, the note is not


def no_training_work(monkeypatch):
    """Fail the test if the run gets as far as loading data."""
    import importlib

    def load_splits(*args, **kwargs):
        raise AssertionError("the output directory should have been checked before any work")

    monkeypatch.setattr(importlib.import_module("peftlab.train"), "load_splits", load_splits)


def test_output_dir_under_a_file(capsys, monkeypatch, tmp_path, recipe):
    (tmp_path / "notes.txt").write_text("mine")
    recipe["output_dir"] = str(tmp_path / "notes.txt" / "runs" / "run")
    no_training_work(monkeypatch)
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), "cannot create output directory",
                 "notes.txt is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes to read-only folders (covered by test_output_dir_under_a_file)")
def test_output_dir_not_writable(capsys, monkeypatch, tmp_path, recipe):
    locked = tmp_path / "locked"
    locked.mkdir()
    recipe["output_dir"] = str(locked / "run")
    no_training_work(monkeypatch)
    locked.chmod(0o500)
    try:
        expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), f"{locked} is not writable")
    finally:
        locked.chmod(0o700)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_while_saving_keeps_the_previous_run(capsys, monkeypatch, tmp_path, recipe, trained):
    import peftlab.artifacts

    out = copy_adapter(trained, tmp_path / "run")
    before = snapshot(out)

    def full_disk(path, data):  # the disk fills up halfway through writing peftlab.json
        path.write_text('{"task": "se')
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(peftlab.artifacts, "write_json", full_disk)
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--overwrite", "--set", "training.max_steps=2",
                                                 "--output-dir", str(out)),
                 "the disk is full", "No space left on device", f"nothing was changed: {out} is as it was",
                 "free some disk space")
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".run.*")), "a failed save left a temporary directory"


def test_disk_full_on_a_new_output(capsys, monkeypatch, tmp_path, recipe):
    import peftlab.artifacts

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peftlab.artifacts.PeftModel, "save_pretrained", full_disk)
    out = Path(recipe["output_dir"])
    expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--set", "training.max_steps=2"),
                 "the disk is full", f"{out} was not created", output=out)


def test_stale_temp_dirs_of_killed_runs_are_removed(capsys, monkeypatch, tmp_path, recipe):
    import peftlab.artifacts

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getppid()  # a finished process, and one that runs
    killed = tmp_path / f".run.tmp-{dead}-0123abcd"
    running = tmp_path / f".run.tmp-{alive}-4567cdef"
    moved_aside = tmp_path / f".run.old-{dead}-89abcdef"  # killed mid-swap: maybe the only copy of a run
    other = tmp_path / f".run2.tmp-{dead}-0123abcd"  # another output's
    for folder in (killed, running, moved_aside, other):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")

    staged = []
    save_run = peftlab.artifacts.save_run
    monkeypatch.setattr(peftlab.artifacts, "save_run", lambda directory, *a, **k: staged.append(directory.name)
                        or save_run(directory, *a, **k))
    code, _, err = run_cli(capsys, monkeypatch, *train_args(tmp_path, recipe, "--set", "training.max_steps=2"))
    assert code in (0, None), err
    assert not killed.exists()
    assert running.exists() and moved_aside.exists() and other.exists()
    assert f"removed {killed.name}" in err
    assert len(staged) == 1 and staged[0].startswith(f".run.tmp-{os.getpid()}-"), staged
    assert (Path(recipe["output_dir"]) / "adapter_model.safetensors").is_file()


# --- adapters ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_models, keyword_data, tmp_path_factory):
    from peftlab import build_config, train

    out = tmp_path_factory.mktemp("trained") / "run"
    config = build_config({
        "model": {"name": str(tiny_models["bert"])}, "method": {"name": "lora"},
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"])},
        "training": {"max_steps": 2, "progress": False}, "output_dir": str(out)})
    return train(config).output_dir


def copy_adapter(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_adapter_dir_missing(capsys, monkeypatch, tmp_path):
    expect_error(capsys, monkeypatch, ["eval", str(tmp_path / "nothing")], "adapter directory not found")


def test_adapter_missing_weights(capsys, monkeypatch, tmp_path, trained):
    broken = copy_adapter(trained, tmp_path / "a")
    (broken / "adapter_model.safetensors").unlink()
    expect_error(capsys, monkeypatch, ["predict", str(broken), "--text", "hi"], "has no adapter_model.safetensors")


def test_adapter_pickle_weights_are_refused(capsys, monkeypatch, tmp_path, trained):
    broken = copy_adapter(trained, tmp_path / "a")
    (broken / "adapter_model.safetensors").rename(broken / "adapter_model.bin")
    expect_error(capsys, monkeypatch, ["eval", str(broken)], "pickle", "safetensors")


def test_adapter_corrupted_weights(capsys, monkeypatch, tmp_path, trained):
    broken = copy_adapter(trained, tmp_path / "a")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    expect_error(capsys, monkeypatch, ["eval", str(broken)], "corrupted")


def test_adapter_malformed_config(capsys, monkeypatch, tmp_path, trained):
    broken = copy_adapter(trained, tmp_path / "a")
    (broken / "adapter_config.json").write_text("{not json")
    expect_error(capsys, monkeypatch, ["eval", str(broken)], "adapter_config.json is malformed")


def test_adapter_config_from_a_newer_peft(capsys, monkeypatch, tmp_path, trained):
    newer = copy_adapter(trained, tmp_path / "a")
    config = json.loads((newer / "adapter_config.json").read_text())
    (newer / "adapter_config.json").write_text(json.dumps({**config, "lora_future_knob": 0.5}))
    code, out, err = run_cli(capsys, monkeypatch, "predict", str(newer), "--text", "alpha great", "--format", "jsonl")
    assert code in (0, None), err
    assert json.loads(out)["label"] in {"negative", "positive"}
    warnings = [line for line in err.splitlines() if "lora_future_knob" in line]
    assert len(warnings) == 1 and "ignored" in warnings[0] and "newer peft" in warnings[0], err


def test_adapter_of_a_peft_method_this_peft_lacks(capsys, monkeypatch, tmp_path, trained):
    newer = copy_adapter(trained, tmp_path / "a")
    config = json.loads((newer / "adapter_config.json").read_text())
    (newer / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "HYPERLORA"}))
    expect_error(capsys, monkeypatch, ["predict", str(newer), "--text", "hi"], 'PEFT method "HYPERLORA"',
                 "pip install -U peft")


def test_adapter_for_a_different_base_model(capsys, monkeypatch, tmp_path, trained, tiny_models):
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--base", str(tiny_models["roberta"])],
                 "does not fit the base model", "--base")


def test_adapter_given_as_base_model(capsys, monkeypatch, tmp_path, trained):
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--base", str(trained)],
                 "is an adapter directory, not a base model")


def test_plain_peft_adapter_needs_data_for_eval(capsys, monkeypatch, tmp_path, trained):
    plain = copy_adapter(trained, tmp_path / "a")
    for name in ("peftlab.yaml", "peftlab.json"):
        (plain / name).unlink()
    expect_error(capsys, monkeypatch, ["eval", str(plain)], "not made by peftlab", "--data")


def test_eval_override_typo(capsys, monkeypatch, trained):
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--set", "data.text_colum=review"],
                 "unknown key `data.text_colum`", 'did you mean "text_column"')


def test_predict_needs_input(capsys, monkeypatch, trained):
    expect_error(capsys, monkeypatch, ["predict", str(trained)], "nothing to predict")


# --- the commands work on good input --------------------------------------------------

def test_predict_jsonl_and_eval_on_a_file(capsys, monkeypatch, tmp_path, trained):
    code, out, _ = run_cli(capsys, monkeypatch, "predict", str(trained), "--text", "alpha great",
                           "--text", "delta awful", "--format", "jsonl")
    assert code in (0, None)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in records] == ["alpha great", "delta awful"]
    assert all(r["label"] in {"negative", "positive"} and 0.5 <= r["score"] <= 1 for r in records)

    data = write_csv(tmp_path / "more.csv", keyword_rows(20, seed=9))
    code, out, _ = run_cli(capsys, monkeypatch, "eval", str(trained), "--data", str(data), "--json")
    assert code in (0, None)
    assert json.loads(out)["samples"] == 20

    code, out, _ = run_cli(capsys, monkeypatch, "predict", str(trained), "--file", str(data), "--format", "jsonl")
    assert code in (0, None)
    assert [json.loads(line)["text"] for line in out.splitlines()] == [r["text"] for r in keyword_rows(20, seed=9)]


def _bert_with_layers(tiny_models, folder: Path, layers: int) -> Path:
    """The tiny BERT's architecture and hidden size with another number of layers."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig.from_pretrained(tiny_models["bert"], num_hidden_layers=layers)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layers", [1, 3])
def test_adapter_on_a_base_with_another_layer_count(capsys, monkeypatch, tmp_path, trained, tiny_models, layers):
    other = _bert_with_layers(tiny_models, tmp_path / f"bert-{layers}-layers", layers)
    err = expect_error(capsys, monkeypatch, ["predict", str(trained), "--base", str(other), "--text", "alpha great"],
                       "does not fit the base model", "--base")
    assert ("the adapter file lacks" in err and "layer.2" in err) if layers == 3 else "has no counterpart" in err
    assert "Found missing adapter keys" not in err  # peft's raw warning is replaced by the message


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_empty_text_cell_in_a_file_for_eval_and_predict(capsys, monkeypatch, tmp_path, trained, command):
    data = tmp_path / "more.csv"
    data.write_text("text,label\nalpha great,positive\n,negative\nbravo awful,negative\n")
    flag = "--data" if command == "eval" else "--file"
    expect_error(capsys, monkeypatch, [command, str(trained), flag, str(data)],
                 '1 empty value(s) in column "text"', "rows 1", "fill or drop those rows")


def test_validation_file_with_an_extra_column_is_read(capsys, monkeypatch, tmp_path, recipe):
    rows = keyword_rows(32, seed=5)
    recipe["data"]["validation_file"] = str(write_csv(tmp_path / "extra.csv", [{**r, "note": "x"} for r in rows]))
    recipe["training"]["max_steps"] = 2
    code, _, err = run_cli(capsys, monkeypatch, *train_args(tmp_path, recipe))
    assert code in (0, None), err
    assert json.loads((Path(recipe["output_dir"]) / "metrics.json").read_text())["samples"] == 32


def test_a_needed_column_missing_from_the_validation_file_is_named(capsys, monkeypatch, tmp_path, recipe):
    rows = [{"review": r["text"], "label": r["label"]} for r in keyword_rows(32, seed=5)]
    recipe["data"]["validation_file"] = str(write_csv(tmp_path / "renamed.csv", rows))
    err = expect_error(capsys, monkeypatch, train_args(tmp_path, recipe), 'the eval split has no column "text"',
                       "its columns are: review, label", output=Path(recipe["output_dir"]))
    assert len(err.strip().splitlines()) == 2  # one error line, one hint line: no datasets error with a web link


@pytest.mark.parametrize("item, fragment", [("=3", "no key before `=`"), ("training..seed=3", "an empty part")])
def test_override_without_a_key(capsys, monkeypatch, tmp_path, recipe, item, fragment):
    err = expect_error(capsys, monkeypatch, train_args(tmp_path, recipe, "--set", item), fragment,
                       "--set SECTION.KEY=VALUE")
    assert "unknown key" not in err


def test_eval_labels_outside_the_label_set_get_a_hint(capsys, monkeypatch, tmp_path, trained):
    data = write_csv(tmp_path / "more.csv", [{"text": "alpha great", "label": "good"},
                                             {"text": "bravo awful", "label": "negative"}])
    expect_error(capsys, monkeypatch, ["eval", str(trained), "--data", str(data)],
                 "1 label(s) outside the label set [negative, positive]: 'good'", "hint:",
                 "trained on these label names")


def test_single_class_eval_data_says_so_once(capsys, monkeypatch, tmp_path, trained):
    rows = [r for r in keyword_rows(40, seed=9) if r["label"] == "positive"]
    data = write_csv(tmp_path / "positive.csv", rows)
    code, out, err = run_cli(capsys, monkeypatch, "eval", str(trained), "--data", str(data), "--json")
    assert code in (0, None), err
    assert json.loads(out)["samples"] == len(rows)
    assert 'holds a single label ("positive"' in err and "MCC is 0 by definition" in err
    assert "sklearn" not in err and "y_true" not in err  # scikit-learn's raw warning is not shown


def test_a_run_made_with_relative_paths_works_from_another_directory(capsys, monkeypatch, tmp_path, tiny_models):
    import shutil

    work = tmp_path / "project"
    shutil.copytree(tiny_models["bert"], work / "models" / "bert")
    write_csv(work / "train.csv", keyword_rows(64, seed=1))
    write_csv(work / "validation.csv", keyword_rows(16, seed=2))
    recipe = {"model": {"name": "models/bert"}, "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
              "training": {"max_steps": 2, "progress": False}, "output_dir": "runs/rel"}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, monkeypatch, "train", "recipe.yaml")
    assert code in (0, None), err
    run = work / "runs" / "rel"
    saved = yaml.safe_load((run / "peftlab.yaml").read_text())
    assert saved["model"]["name"] == str(work / "models" / "bert")
    assert saved["data"]["train_file"] == str(work / "train.csv")
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        work / "models" / "bert")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, monkeypatch, "eval", str(run), "--json")
    assert code in (0, None), err
    assert json.loads(out)["samples"] == 16
    code, out, err = run_cli(capsys, monkeypatch, "predict", str(run), "--text", "alpha great", "--format", "jsonl")
    assert code in (0, None), err
    assert json.loads(out)["label"] in {"positive", "negative"}
