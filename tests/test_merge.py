"""Merging adapters into plain transformers models, and combining adapters (docs/big-models.md)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BertConfig, BertModel)

from peftlab import PeftlabError, build_config, cli, combine, load_adapter, merge, train
from peftlab.methods import METHODS, peft_type_of, spec_for_peft_type

TEXTS = ["alpha great bravo", "delta awful echo foxtrot"]
AUTO = {"seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
        "seq2seq": AutoModelForSeq2SeqLM}


def tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, arch, method, name="run", seed=0,
             steps=4, **options):
    task = "seq-cls" if arch in tiny_models else ("seq2seq" if arch == "t5" else "causal-lm")
    model = tiny_models.get(arch) or tiny_lms[arch]
    data = keyword_data if task == "seq-cls" else generative_data
    raw = {
        "model": {"name": str(model)}, "task": task, "method": {"name": method, "options": options},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "max_length": 32,
                 "max_train_samples": 64, "max_eval_samples": 8, "target_max_length": 4},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": seed,
                     "eval_strategy": "no", "keep": "last"},
        "output_dir": str(tmp_path / name),
    }
    if task != "seq-cls":
        raw["data"]["target_column"] = "target"
    if task == "causal-lm":
        raw["data"]["prompt_template"] = "review : {text} label :"
    return train(build_config(raw))


def batch_for(tokenizer, model):
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.full((len(TEXTS), 2), model.config.decoder_start_token_id)
    return batch


@pytest.mark.parametrize("arch,method", [("bert", "lora"), ("roberta", "ia3"), ("llama", "lora"), ("gpt2", "ia3"),
                                         ("t5", "lora"), ("t5", "ia3")])
def test_merged_model_has_the_adapter_models_logits(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path,
                                                     arch, method):
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, arch, method)
    loaded = load_adapter(result.output_dir)
    batch = batch_for(loaded.tokenizer, loaded.model)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
        with loaded.model.disable_adapter():
            untrained = loaded.model(**batch).logits

    merged_dir = tmp_path / "merged"
    report = merge(result.output_dir, merged_dir)
    assert report.max_abs_diff < 1e-4
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").is_file()
    # plain transformers, no peft: same logits, with the tokenizer saved beside it
    plain = AUTO[result.task].from_pretrained(str(merged_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    with torch.no_grad():
        got = plain(**batch_for(tokenizer, plain)).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, untrained)  # the adapter changed the outputs, so the check means something
    if result.task == "seq-cls":  # the trained head is kept, with the run's labels
        assert plain.config.num_labels == 2
        assert plain.config.id2label == {0: "negative", 1: "positive"}
        assert plain.config.label2id == {"negative": 0, "positive": 1}
    record = json.loads((merged_dir / "peftlab-merge.json").read_text())
    assert record["method"] == method and record["task"] == result.task


MERGEABLE_NEW = [name for name, spec in METHODS.items() if spec.mergeable and name not in {"lora", "ia3"}]
GENERATIVE_ARCH = {"bitfit": "llama-bias"}  # BitFit needs linear layers with biases (Llama has none)


@pytest.mark.parametrize("family", ["seq-cls", "causal-lm"])
@pytest.mark.parametrize("method", MERGEABLE_NEW)
def test_every_mergeable_technique_merges_to_the_adapter_models_logits(tiny_models, tiny_lms, keyword_data,
                                                                       generative_data, tmp_path, method, family):
    """The registry's mergeable flag holds: on RoBERTa (a classification head with no `weight`) and a causal LM."""
    arch = "roberta" if family == "seq-cls" else GENERATIVE_ARCH.get(method, "llama")
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, arch, method)
    loaded = load_adapter(result.output_dir)
    batch = batch_for(loaded.tokenizer, loaded.model)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    report = merge(result.output_dir, tmp_path / "merged")
    assert report.max_abs_diff < 1e-4
    plain = AUTO[result.task].from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_techniques_that_cannot_merge_are_flagged_and_refused(tiny_models, tiny_lms, keyword_data, generative_data,
                                                               tmp_path):
    assert {name for name, spec in METHODS.items() if not spec.mergeable} == {
        "prefix", "ptuning-v2", "prompt", "ptuning", "full"}
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", "full")
    with pytest.raises(PeftlabError, match="full fine-tuning run: it is already a plain transformers model"):
        merge(result.output_dir, tmp_path / "merged")
    with pytest.raises(PeftlabError, match="full fine-tuning run, not an adapter"):
        combine([result.output_dir, result.output_dir], tmp_path / "combined")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()


REFUSALS = {"full": "full fine-tuning run: it is already a plain transformers model",
            "prompt learning": r"adapter \(prompt learning\): it adds virtual tokens, not weights, so there is "
                               "nothing to fold"}


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_does_what_the_registry_flag_says(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path,
                                                method):
    """Every registered technique: merge succeeds exactly where its spec says mergeable (a tiny BERT run), and
    refuses the others with their specific error, before writing anything."""
    spec = METHODS[method]
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", method)
    if spec.mergeable:
        assert merge(result.output_dir, tmp_path / "merged").max_abs_diff < 1e-4
        assert (tmp_path / "merged" / "model.safetensors").is_file()
        return
    reason = "full" if spec.full else "prompt learning" if spec.prompt_learning else None
    with pytest.raises(PeftlabError, match=REFUSALS[reason] if reason else f"is a {method} adapter .*not mergeable"):
        merge(result.output_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_techniques_sharing_a_peft_type_agree_on_merging():
    """A plain-peft adapter names only its peft type: the techniques of one type (LoRA and its variants; prefix
    tuning and P-tuning v2) must agree on the flags merge reads."""
    for spec in METHODS.values():
        if spec.config_cls is not None:
            first = spec_for_peft_type(peft_type_of(spec.config_cls))
            assert (first.mergeable, first.prompt_learning) == (spec.mergeable, spec.prompt_learning), spec.name


def test_merge_reads_the_flag_for_peftlab_runs_and_plain_peft_adapters(tiny_models, tiny_lms, keyword_data,
                                                                      generative_data, tmp_path, monkeypatch):
    """A technique the registry marks not mergeable is refused though peft could merge it: a peftlab run by its
    method, a plain-peft adapter by its peft type (LORA: lora)."""
    from peft import LoraConfig

    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", "dora", steps=1)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])
                   ).save_pretrained(str(tmp_path / "plain"))
    assert METHODS["dora"].mergeable and METHODS["lora"].mergeable
    for name in ("dora", "lora"):
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], mergeable=False))
    with pytest.raises(PeftlabError, match=r"is a dora adapter \(LORA\): DoRA .* is not mergeable") as refused:
        merge(result.output_dir, tmp_path / "merged")
    assert "peftlab predict" in refused.value.hint
    with pytest.raises(PeftlabError, match=r"is a lora adapter \(LORA\): Low-rank adaptation is not mergeable"):
        merge(tmp_path / "plain", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    monkeypatch.undo()
    assert merge(tmp_path / "plain", tmp_path / "merged").max_abs_diff < 1e-4


def test_prompt_learning_adapter_cannot_be_merged(tiny_models, tmp_path, capsys, monkeypatch):
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
    get_peft_model(base, PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16)
                   ).save_pretrained(str(tmp_path / "ptuning"))
    with pytest.raises(PeftlabError, match="prompt learning.*nothing to fold"):
        merge(tmp_path / "ptuning", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    monkeypatch.setattr(sys, "argv", ["peftlab", "merge", str(tmp_path / "ptuning"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "P_TUNING adapter (prompt learning)" in err
    assert "Traceback" not in err


def test_merge_refuses_to_overwrite(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path):
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", "lora")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")
    with pytest.raises(PeftlabError, match="already exists"):
        merge(result.output_dir, tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "x"


def test_base_of_another_architecture_or_size_is_refused_before_loading(tiny_models, tiny_lms, keyword_data,
                                                                         generative_data, tmp_path):
    result = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", "lora")
    with pytest.raises(PeftlabError, match=r"does not fit the base model .*roberta: the adapter was made for a bert "
                                           r"model with hidden size 32, .*roberta is a roberta model with hidden "
                                           r"size 32"):
        load_adapter(result.output_dir, base=str(tiny_models["roberta"]))
    wider = tmp_path / "wide-bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(str(wider))
    with pytest.raises(PeftlabError, match=r"made for a bert model with hidden size 32, .*wide-bert is a bert model "
                                           r"with hidden size 48"):
        merge(result.output_dir, tmp_path / "merged", base=str(wider))
    assert not (tmp_path / "merged").exists()


def _delta(model: PeftModel, module: str, adapter: str) -> torch.Tensor:
    return model.base_model.model.get_submodule(module).get_delta_weight(adapter)


def test_combined_lora_is_the_weighted_sum_and_loads_everywhere(tiny_models, tiny_lms, keyword_data,
                                                                generative_data, tmp_path, capsys, monkeypatch):
    one = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", "lora", "one", seed=1)
    two = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", "lora", "two", seed=2,
                   r=4)
    out = tmp_path / "combined"
    monkeypatch.setattr(sys, "argv", ["peftlab", "combine", str(one.output_dir), str(two.output_dir), "--out",
                                      str(out), "-w", "0.7", "-w", "0.3", "--combination", "cat"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert "combined 2 adapters (cat)" in capsys.readouterr().out

    # the combined update is exactly 0.7 * update one + 0.3 * update two (cat keeps both ranks)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lms["llama"]))
    model = PeftModel.from_pretrained(base, str(one.output_dir), adapter_name="one")  # plain peft
    model.load_adapter(str(two.output_dir), adapter_name="two")
    model.load_adapter(str(out), adapter_name="combined")
    module = "model.layers.0.self_attn.q_proj"
    expected = 0.7 * _delta(model, module, "one") + 0.3 * _delta(model, module, "two")
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(_delta(model, module, "combined"), expected)

    # peftlab loads it like any adapter, with the same outputs as plain peft
    loaded = load_adapter(out)
    model.set_adapter("combined")
    batch = dict(loaded.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model.eval()(**batch).logits)
    assert json.loads((out / "peftlab.json").read_text())["weights"] == [0.7, 0.3]


def test_combine_refuses_mismatched_adapters(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path):
    llama = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", "lora", "llama")
    gpt2 = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "gpt2", "lora", "gpt2")
    ia3 = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", "ia3", "ia3")
    with pytest.raises(PeftlabError, match="base model differs"):
        combine([llama.output_dir, gpt2.output_dir], tmp_path / "c")
    with pytest.raises(PeftlabError, match=r"technique differs \(LORA vs IA3\)"):
        combine([llama.output_dir, ia3.output_dir], tmp_path / "c")
    with pytest.raises(PeftlabError, match="same r value"):  # linear needs equal ranks; the hint names cat / svd
        other = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", "lora", "r4", r=4)
        combine([llama.output_dir, other.output_dir], tmp_path / "c")
    cls = [tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "bert", "lora", f"cls{i}")
           for i in (1, 2)]
    with pytest.raises(PeftlabError, match="classifier.*cannot be combined"):
        combine([c.output_dir for c in cls], tmp_path / "c")
    assert not (tmp_path / "c").exists()
