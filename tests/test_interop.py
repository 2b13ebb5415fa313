"""Adapters made with plain peft load in peftlab, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptEncoderConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftlab import evaluate, load_adapter, predict

TEXTS = ["alpha great bravo", "delta awful echo foxtrot"]


@pytest.mark.parametrize("peft_config", [
    LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
              feedforward_modules=["output.dense"]),
    PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16),
], ids=["lora", "ia3", "ptuning"])
def test_plain_peft_adapter_loads_with_same_logits(tiny_models, tmp_path, peft_config):
    path = tiny_models["bert"]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=3)
    model = get_peft_model(base, peft_config)
    with torch.no_grad():  # make the adapter non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "plain"))  # no tokenizer, no peftlab record
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits

    loaded = load_adapter(tmp_path / "plain")
    assert loaded.config is None and loaded.task.name == "seq-cls"
    assert loaded.meta["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]  # 3 labels read off the saved head
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, expected)

    records = predict(tmp_path / "plain", texts=TEXTS)
    assert [r["label"] for r in records] == [f"LABEL_{int(i)}" for i in expected.argmax(-1)]


def test_plain_peft_adapter_evaluates_on_a_file(tiny_models, tmp_path):
    path = tiny_models["bert"]
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"])).save_pretrained(
        str(tmp_path / "plain"))
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": i}) for i, t in enumerate(TEXTS)) + "\n")
    metrics = evaluate(tmp_path / "plain", data=str(data))
    assert metrics["samples"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    # the metric is computed, not constant: flipping the labels flips the accuracy
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("\n".join(json.dumps({"text": t, "label": 1 - i}) for i, t in enumerate(TEXTS)) + "\n")
    assert evaluate(tmp_path / "plain", data=str(flipped))["accuracy"] == pytest.approx(1 - metrics["accuracy"])


def _cli(capsys, monkeypatch, *args: str) -> str:
    import sys

    from peftlab import cli

    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def test_plain_peft_causal_lm_adapter_evaluates_with_data_overrides(tiny_lms, tmp_path, capsys, monkeypatch):
    """`peftlab eval` of a plain peft causal-LM adapter takes --set data.target_column / data.prompt_template as
    for seq2seq: the template's prompts are generated from and scored against the targets; without them, the
    text column's perplexity."""
    from transformers import AutoModelForCausalLM

    from peftlab.testing import WORDS, write_csv

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_lms["llama"])), LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "plain"))  # no tokenizer, no peftlab record
    plain = str(tmp_path / "plain")
    texts = [" ".join(WORDS[i:i + 1 + i % 4]) for i in range(8)]
    template = ["--set", "data.prompt_template=review : {text} label :", "--set", "data.target_max_length=3"]
    inputs = write_csv(tmp_path / "inputs.csv", [{"text": t} for t in texts])
    out = _cli(capsys, monkeypatch, "predict", plain, "--file", str(inputs), "--format", "jsonl", *template)
    generated = [json.loads(line)["generated"] for line in out.splitlines()]
    assert len(generated) == len(texts) and all(generated), generated
    # targets: what the adapter generates from the template's prompt for half the rows, other words for the rest
    targets = [g if i % 2 == 0 else f"{g} tango" for i, g in enumerate(generated)]
    data = write_csv(tmp_path / "data.csv", [{"text": t, "answer": a} for t, a in zip(texts, targets)])

    out = _cli(capsys, monkeypatch, "eval", plain, "--data", str(data), "--set", "data.target_column=answer",
               *template, "--json")
    metrics = json.loads(out)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert {"loss", "perplexity", "bleu", "chrf", "rougeL"} <= set(metrics)

    plain_text = json.loads(_cli(capsys, monkeypatch, "eval", plain, "--data", str(data), "--json"))
    assert set(plain_text) == {"loss", "perplexity", "samples"}  # no target: the text's perplexity
