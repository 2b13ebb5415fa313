"""The encoder families beyond BERT / RoBERTa (DeBERTa-v3-style deberta-v2, DeBERTa, ALBERT, MPNet, ModernBERT,
DistilBERT, CamemBERT, XLM-RoBERTa, ELECTRA), each as a tiny random model saved as its *base* model, as published
checkpoints are (so from_pretrained draws the task head, and DeBERTa's pooler / ModernBERT's head, at random).

Every technique that fits trains a few steps and reloads as the trained model: peftlab's load_adapter and plain
peft's PeftModel.from_pretrained on a freshly loaded base give the trained model's logits. Prefix tuning / P-tuning
v2 are refused before training, with a MethodError, where the attention takes no key/value cache."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from peftlab import build_config, compat, load_adapter, train
from peftlab.errors import MethodError
from peftlab.inference import logits
from peftlab.methods import METHODS, describe, get_method, kv_cache_support, takes_kv_cache
from peftlab.testing import ENCODER_ARCHS, keyword_rows, tiny_model_rate, write_csv

FAMILIES = list(ENCODER_ARCHS)
NO_KV_CACHE = {"deberta-v2", "deberta", "albert", "mpnet", "modernbert", "distilbert"}  # their attention takes none
PREFIX = ["prefix", "ptuning-v2"]
TECHNIQUES = ["lora", "ia3", "prompt", "ptuning", *PREFIX, "loha", "ln-tuning"]
# what from_pretrained draws at random beyond peft's own classifier / score (which DistilBERT's pre_classifier
# matches by name suffix): it must train and save with the adapter
UNTRAINED = {"deberta-v2": ["pooler"], "deberta": ["pooler"], "modernbert": ["head"]}
PROBE = ["alpha great bravo charlie", "delta awful echo", "golf hotel india great kilo lima mike"]


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return tiny_encoders  # built once per session (conftest)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-data")
    return {"train": write_csv(root / "train.csv", keyword_rows(48, seed=1)),
            "validation": write_csv(root / "validation.csv", keyword_rows(16, seed=2))}


def _config(encoders, rows, out, arch: str, method: str, **method_options):
    return build_config({
        "model": {"name": str(encoders[arch])}, "task": "seq-cls",
        "method": {"name": method, "options": method_options},
        "data": {"train_file": str(rows["train"]), "validation_file": str(rows["validation"]), "max_length": 24},
        "training": {"max_steps": 3, "batch_size": 16, "learning_rate": tiny_model_rate(METHODS[method], "seq-cls"),
                     "progress": False, "eval_strategy": "no", "keep": "last", "seed": 0},
        "output_dir": str(out),
    })


def _cases():
    for arch in FAMILIES:
        for method in TECHNIQUES:
            if not (method in PREFIX and arch in NO_KV_CACHE):
                yield pytest.param(arch, method, id=f"{arch}-{method}")


def _plain_peft_logits(base_path, out, tokenizer) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(str(base_path), num_labels=2)
    model = compat.apply_fixes(PeftModel.from_pretrained(base, str(out))).eval()
    batch = tokenizer(PROBE, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch,method", list(_cases()))
def test_technique_trains_and_reloads_as_the_trained_model(encoders, rows, tmp_path, arch, method):
    result = train(_config(encoders, rows, tmp_path / "run", arch, method))
    assert 0 < result.trainable_params < result.total_params
    trained = logits(result, PROBE)

    # a reload must not depend on the random state: anything drawn at load time would differ from the trained run
    torch.manual_seed(1234)
    torch.testing.assert_close(logits(load_adapter(result.output_dir), PROBE), trained, rtol=0, atol=1e-5)
    torch.manual_seed(4321)
    torch.testing.assert_close(_plain_peft_logits(encoders[arch], result.output_dir, result.tokenizer), trained,
                               rtol=0, atol=1e-5)

    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    for module in UNTRAINED.get(arch, []):  # the weights the checkpoint lacked are saved with the adapter
        assert any(entry.rpartition(".")[2] == module for entry in saved["modules_to_save"]), saved["modules_to_save"]
    if METHODS[method].prompt_learning:  # sizes read off the model: the input embedding's width for input tokens
        base = result.model.get_base_model()
        width = base.get_input_embeddings().weight.shape[1] if method in {"prompt", "ptuning"} else 32
        assert saved["token_dim"] == width and saved["num_layers"] == 2 and saved["num_attention_heads"] == 4


@pytest.mark.parametrize("arch", sorted(NO_KV_CACHE))
@pytest.mark.parametrize("method", PREFIX)
def test_prefix_tuning_is_refused_before_training_where_the_attention_takes_no_cache(encoders, rows, tmp_path,
                                                                                    arch, method):
    events = []
    with pytest.raises(MethodError, match=rf'method "{method}" does not support the {arch} architecture: its '
                                          "attention layers take no key/value cache") as error:
        train(_config(encoders, rows, tmp_path / "run", arch, method), on_event=lambda kind, data: events.append(kind))
    assert "lora" in error.value.hint and "prompt" in error.value.hint and "ptuning" in error.value.hint
    assert events == []  # not a single step
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.tmp-*"))


def test_kv_cache_support_is_read_off_the_model_and_shown_by_peftlab_methods(encoders, capsys, monkeypatch):
    import sys

    from peftlab import cli

    for arch in FAMILIES:
        path = encoders[arch]
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
        assert takes_kv_cache(model) is (arch not in NO_KV_CACHE), arch
        assert kv_cache_support(model.config.model_type) is (arch not in NO_KV_CACHE), arch

    line = describe(METHODS["prefix"])["architectures"]
    supported, _, refused = line.partition("; not ")
    for arch in FAMILIES:
        assert arch in (refused if arch in NO_KV_CACHE else supported).replace(",", " ").split(), (arch, line)
    assert describe(METHODS["ptuning-v2"], "deberta-v2")["architectures"].startswith("deberta-v2: not supported")
    assert describe(METHODS["prefix"], "camembert")["architectures"].startswith("camembert: supported")

    monkeypatch.setattr(sys, "argv", ["peftlab", "methods", "ptuning-v2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    printed = " ".join(capsys.readouterr().out.split())
    assert "architectures:" in printed and "not deberta, deberta-v2, albert, mpnet, distilbert, modernbert" in printed
    assert f"default learning rate: {METHODS['ptuning-v2'].learning_rate:g}" in printed  # from the registry


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "ln-tuning"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_weight_adapters_have_targets_for_every_family_and_read_them_off_unknown_ones(encoders, arch, method):
    """The table's targets, and the ones read off the loaded model alone (as for an encoder with no table entry:
    the attention's query / value layers, or its fused projection), exist in the model and agree."""
    model = AutoModelForSequenceClassification.from_pretrained(str(encoders[arch]), num_labels=2)
    spec = get_method(method)
    model_type = model.config.model_type
    table = spec.resolve_options(model_type, {}, model).get("target_modules")
    unknown = spec.resolve_options("an-unknown-encoder", {}, model).get("target_modules")
    assert table and unknown, (arch, method)
    names = {name for name, _ in model.named_modules()}
    if isinstance(unknown, str):  # exact module names (LN tuning of an unknown model: its normalisation layers)
        import re

        assert {n for n in names if re.fullmatch(unknown, n)}
    else:
        assert all(any(n.endswith(f".{t}") for n in names) for t in unknown), unknown
    if method in {"lora", "loha"}:
        assert unknown == table
    if method == "ia3":
        assert set(unknown) <= set(table)


@pytest.mark.parametrize("arch", ["mpnet", "modernbert"])
def test_lora_on_an_encoder_without_a_table_entry_trains_on_targets_read_off_the_model(encoders, rows, tmp_path,
                                                                                      monkeypatch, arch):
    from peftlab import methods

    monkeypatch.setattr(methods, "_EXTRA_LORA_TARGETS",
                        {k: v for k, v in methods._EXTRA_LORA_TARGETS.items() if k != arch})
    assert "read off the model" in methods.describe(METHODS["lora"], arch)["defaults"]["target_modules"]
    result = train(_config(encoders, rows, tmp_path / "run", arch, "lora"))
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted({"mpnet": ["q", "v"], "modernbert": ["Wqkv"]}[arch])
    torch.testing.assert_close(logits(load_adapter(result.output_dir), PROBE), logits(result, PROBE), rtol=0,
                               atol=1e-5)


def test_cli_refuses_prefix_tuning_on_deberta_v2_in_one_error_line(encoders, rows, tmp_path, capsys, monkeypatch):
    """As docs/bad-inputs.md shows it: exit code 2, one error line and its hint, no traceback, nothing written."""
    import sys

    import yaml

    from peftlab import cli

    out = tmp_path / "runs" / "prefix"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_config(encoders, rows, out, "deberta-v2", "ptuning-v2").to_dict()))
    monkeypatch.setattr(sys, "argv", ["peftlab", "train", str(recipe)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith(("error:", "hint:"))] == [
        'error: method "ptuning-v2" does not support the deberta-v2 architecture: its attention layers take no '
        "key/value cache (DebertaV2ForSequenceClassification), and P-tuning v2 hands its trained prefixes to every "
        "layer through that cache",
        "hint: use lora (or prompt / ptuning: prompt learning at the input) on this model"], err
    assert not out.exists() and not list(out.parent.glob(".prefix.*"))


def test_an_adapter_without_the_weights_the_base_lacks_is_flagged_on_load(encoders, rows, tmp_path, capsys):
    """A plain-peft DeBERTa-v2 adapter (or one made before peftlab saved the pooler): every load draws the pooler
    anew, so its outputs change between loads; loading it says so instead of answering silently."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(encoders["deberta-v2"], num_labels=2)
    plain = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query_proj", "value_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    first = logits(load_adapter(tmp_path / "plain", base=str(encoders["deberta-v2"])), PROBE)
    err = capsys.readouterr().err
    assert "lacks pooler" in err and "differ from one load to the next" in err
    second = logits(load_adapter(tmp_path / "plain", base=str(encoders["deberta-v2"])), PROBE)
    assert not torch.allclose(first, second)  # what the warning says: another pooler, other outputs

    run = train(_config(encoders, rows, tmp_path / "run", "deberta-v2", "lora"))
    capsys.readouterr()
    load_adapter(run.output_dir)
    assert "lacks" not in capsys.readouterr().err  # peftlab's own run holds the pooler: no warning
