"""Every technique x task family: it learns, it reloads exactly, plain peft (or, for full
fine-tuning, plain transformers) loads it. New registry entries are picked up from METHODS; each trains at
its spec's rate for tiny models (peftlab.testing.tiny_model_rate)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from peftlab import build_config, compat, evaluate, load_adapter, predict, train
from peftlab.errors import MethodError
from peftlab.methods import METHODS, register
from peftlab.testing import tiny_model_rate

CLASSIC = ["lora", "ia3", "prefix", "ptuning-v2", "prompt", "ptuning"]  # also on both encoders, 12 epochs
NEW = [name for name in METHODS if name not in CLASSIC]
# the tiny architecture each family is tested on; a technique that cannot use it (BitFit: no biases) names another
FAMILY_ARCH = {"seq-cls": "bert", "seq2seq": "t5", "causal-lm": "llama"}
ARCH_FOR = {("bitfit", "seq2seq"): "bart", ("bitfit", "causal-lm"): "llama-bias"}
PROBE = ["alpha great bravo charlie", "delta awful echo", "golf hotel india great kilo lima mike"]


def _logits(model, tokenizer, texts=PROBE):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_every_method_has_a_learning_rate():
    """The spec carries the default rate (compare, docs) and, where tiny models need another, the tests' rate;
    a technique without a default is refused at registration."""
    for spec in METHODS.values():
        assert spec.learning_rate > 0, spec.name
        for task in spec.tasks:
            assert tiny_model_rate(spec, task) > 0 and spec.learning_rate_for(task) > 0, (spec.name, task)
    assert tiny_model_rate(METHODS["prefix"], "seq-cls") == METHODS["prefix"].learning_rate  # no faster rate needed
    with pytest.raises(ValueError, match="needs a default learning_rate"):
        register(dataclasses.replace(METHODS["lora"], name="lora-without-a-rate", learning_rate=0.0))
    assert "lora-without-a-rate" not in METHODS


def test_budget_hints_say_how_many_steps():
    """A calibration hint names the budget it measured (steps x batch), compares runs by examples seen, and is what
    `peftlab methods` prints."""
    from peftlab.methods import BudgetHint, describe

    hint = BudgetHint("measured on MiniLM", steps=120, batch=32)
    assert hint.short_of(60, 32) and not hint.short_of(120, 32) and not hint.short_of(240, 16)
    assert hint.steps_at(16) == 240 and hint.steps_at(64) == 60 and hint.steps_at(100) == 39
    assert str(hint) == "needs about 120 steps of batch 32 at its default rate; measured on MiniLM"
    never = BudgetHint("collapses")
    assert never.short_of(10**6, 32) and never.steps_at(8) is None and str(never).startswith("no budget tried")
    hinted = [spec for spec in METHODS.values() if spec.budget_hints]
    assert hinted
    for spec in hinted:
        assert describe(spec)["budget_hints"] == {task: str(h) for task, h in spec.budget_hints.items()}


def test_methods_are_grouped_and_say_when_they_help():
    from peftlab.methods import GROUPS

    for spec in METHODS.values():
        assert spec.group in GROUPS and spec.when and spec.trains, spec.name


def _check_artifacts(out, full: bool):
    names = ["peftlab.yaml", "peftlab.json", "metrics.json", "tokenizer_config.json"]
    names += ["config.json", "model.safetensors"] if full else ["adapter_config.json", "adapter_model.safetensors"]
    for name in names:
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert not (out / ".peftlab-initial").exists()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("method", CLASSIC)
def test_technique_learns_and_reloads_identically(make_config, arch, method):
    rate = tiny_model_rate(METHODS[method], "seq-cls")
    config = make_config(arch, method, **{"training.epochs": 12, "training.learning_rate": rate})
    result = train(config, evaluate_before=True)

    # it learned the keyword task
    assert result.metrics["loss"] < 0.7 * result.initial_metrics["loss"]
    assert result.metrics["accuracy"] >= 0.75
    assert 0 < result.trainable_params < result.total_params  # the base stays frozen

    # standard artifacts
    out = result.output_dir
    _check_artifacts(out, full=False)

    # save -> reload through peftlab gives the same logits as the trained model
    before = _logits(result.model, result.tokenizer)
    loaded = load_adapter(out)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), before)

    # plain peft loads it on a freshly loaded base, head included
    base = AutoModelForSequenceClassification.from_pretrained(str(config.model.name), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(out))
    compat.apply_fixes(plain)  # no-op except for prefix tuning on encoders (upstream bug, see compat.py)
    torch.testing.assert_close(_logits(plain, loaded.tokenizer), before)


# --- the newer techniques: one tiny architecture per task family --------------------------------

def _new_cases():
    for method in NEW:
        for family in ("seq-cls", "seq2seq", "causal-lm"):
            if family in METHODS[method].tasks:
                yield pytest.param(method, family, ARCH_FOR.get((method, family), FAMILY_ARCH[family]),
                                   id=f"{method}-{family}")


AUTO = {"seq-cls": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM,
        "causal-lm": AutoModelForCausalLM}


def new_method_config(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, method, family, arch,
                      **overrides):
    generative = family != "seq-cls"
    data = generative_data if generative else keyword_data
    raw = {
        "model": {"name": str((tiny_lms if generative else tiny_models)[arch])}, "task": family,
        "method": {"name": method},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "max_length": 32,
                 "max_train_samples": 64 if generative else 128, "max_eval_samples": 16},
        "training": {"epochs": 6 if generative else 8, "batch_size": 16,
                     "learning_rate": tiny_model_rate(METHODS[method], family), "progress": False,
                     "seed": 0, "eval_strategy": "no", "keep": "last"},
        "output_dir": str(tmp_path / "run"),
    }
    if generative:
        raw["data"].update(target_column="target", target_max_length=4)
    if family == "causal-lm":
        raw["data"]["prompt_template"] = "review : {text} label :"
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


def _probe_batch(tokenizer, model):
    batch = dict(tokenizer(PROBE, padding=True, return_tensors="pt"))
    if "token_type_ids" in batch and model.config.model_type not in {"bert"}:
        batch.pop("token_type_ids")
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.full((len(PROBE), 3), model.config.decoder_start_token_id)
    return batch


@pytest.mark.parametrize("method,family,arch", list(_new_cases()))
def test_new_technique_learns_reloads_and_loads_in_plain_peft(tiny_models, tiny_lms, keyword_data, generative_data,
                                                              tmp_path, method, family, arch):
    spec = METHODS[method]
    config = new_method_config(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, method, family, arch)
    result = train(config, evaluate_before=True)
    assert result.metrics["loss"] < 0.8 * result.initial_metrics["loss"]
    if spec.full:
        assert result.trainable_params == result.total_params
    else:
        assert 0 < result.trainable_params < result.total_params
    out = result.output_dir
    _check_artifacts(out, full=spec.full)

    # save -> reload through peftlab: the same logits as the trained model in memory
    batch = _probe_batch(result.tokenizer, result.model)
    with torch.no_grad():
        before = result.model.eval()(**batch).logits
        loaded = load_adapter(out)
        torch.testing.assert_close(loaded.model(**batch).logits, before, rtol=1e-4, atol=1e-5)

    # plain peft on a freshly loaded original base (plain transformers for full fine-tuning)
    kwargs = {"num_labels": 2} if family == "seq-cls" else {}
    if spec.full:
        plain = AUTO[family].from_pretrained(str(out), **kwargs).eval()
        # eval and predict take the run directory like an adapter's
        assert evaluate(out)["loss"] == pytest.approx(result.metrics["loss"], rel=1e-4)
        assert len(predict(out, texts=PROBE[:2])) == 2
    else:
        plain = PeftModel.from_pretrained(AUTO[family].from_pretrained(str(config.model.name), **kwargs),
                                          str(out)).eval()
    with torch.no_grad():
        # PiSSA / OLoRA: peft's conversion to a LoRA of the original base is exact up to float rounding
        torch.testing.assert_close(plain(**batch).logits, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [n for n, s in METHODS.items() if s.linear_only])
def test_linear_only_techniques_refuse_gpt2_with_a_clear_message(tiny_lms, generative_data, tmp_path, method):
    config = new_method_config({}, tiny_lms, {}, generative_data, tmp_path, method, "causal-lm", "gpt2")
    with pytest.raises(MethodError, match=rf'"{method}" (does not support the gpt2 architecture|cannot be applied '
                                          r"to gpt2).*Conv1D") as error:
        train(config)
    assert "lora" in error.value.hint
    assert not (tmp_path / "run").exists()


def test_bitfit_refuses_a_model_without_biases(tiny_lms, generative_data, tmp_path):
    config = new_method_config({}, tiny_lms, {}, generative_data, tmp_path, "bitfit", "causal-lm", "llama")
    with pytest.raises(MethodError, match="llama: its linear layers have no bias terms") as error:
        train(config)
    assert "ln-tuning" in error.value.hint


def test_lora_plus_gives_the_b_matrices_the_larger_learning_rate(make_config):
    from peftlab.methods import get_method

    config = make_config("bert", "lora-plus", {"loraplus_lr_ratio": 4.0}, **{"training.max_steps": 1})
    result = train(config)
    spec = get_method("lora-plus")
    optimizer = spec.make_optimizer(result.model, 1e-3, 0.0, spec.extras({"loraplus_lr_ratio": 4.0}))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(result.model.named_parameters())
    assert {rates[id(p)] for n, p in named.items() if "lora_B" in n} == {4e-3}
    assert {rates[id(p)] for n, p in named.items() if "lora_A" in n} == {1e-3}


def test_adalora_schedule_follows_the_run_and_masks_the_kept_ranks(make_config):
    rate = tiny_model_rate(METHODS["adalora"], "seq-cls")
    config = make_config("bert", "adalora", **{"training.epochs": 2, "training.learning_rate": rate})
    result = train(config)
    peft_config = result.model.peft_config["default"]
    assert peft_config.total_step == 32  # 2 epochs x 16 steps
    assert peft_config.rank_pattern  # the budget was allocated
    assert any("AdaLoRA kept" in note for note in result.notes)


@pytest.mark.parametrize("steps", [1, 2])
def test_adalora_trains_a_run_of_one_or_two_steps(make_config, steps):
    """The shortest budgets leave no warm-up (tinit = tfinal = 0): the rank allocation must still have importance
    scores to rank by (peft counts its steps from 0)."""
    result = train(make_config("bert", "adalora", **{"training.max_steps": steps}))
    assert result.model.peft_config["default"].total_step == steps
    assert (result.output_dir / "adapter_model.safetensors").is_file()
