"""The isolated fixes for upstream breakages (peftlab/compat.py): each works, and each has a canary,
``test_upstream_*``, that fails when upstream fixes the bug (compat.py's docstring lists them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftlab import compat


def _prefix_model(path, projection=False):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=projection)
    return get_peft_model(base, config).eval()


def _batch(path):
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return tokenizer(["alpha great bravo", "delta awful echo foxtrot golf hotel"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_upstream_prefix_tuning_is_still_broken(tiny_models, arch):
    """If this starts failing, peft has fixed the bug upstream and compat.py can go."""
    model = _prefix_model(tiny_models[arch])
    with pytest.raises(ValueError, match="does not support past key values"):
        model(**_batch(tiny_models[arch]))
    assert compat.prefix_tuning_needs_cache_fix(model)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_fixed_prefix_tuning_uses_the_prefix(tiny_models, arch):
    model = compat.apply_fixes(_prefix_model(tiny_models[arch]))
    batch = _batch(tiny_models[arch])
    with torch.no_grad():
        logits = model(**batch).logits
        # the prefix reaches every layer: changing it changes the output
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
        shifted = model(**batch).logits
        # padding stays masked: the padded row's logits equal its unpadded run
        single = model(**{k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items()}).logits
    assert logits.shape == (2, 2)
    assert not torch.allclose(logits, shifted)
    torch.testing.assert_close(single, shifted[:1])


def test_fix_equals_the_legacy_past_key_values_path(tiny_models):
    """The fix passes the same cache that the deprecated `past_key_values=` route would."""
    model = compat.apply_fixes(_prefix_model(tiny_models["bert"], projection=True))
    batch = _batch(tiny_models["bert"])
    with torch.no_grad():
        fixed = model(**batch).logits
        prefix_mask = torch.ones(2, 4, dtype=batch["attention_mask"].dtype)
        legacy = model.base_model(**{**batch, "attention_mask": torch.cat([prefix_mask, batch["attention_mask"]], 1)},
                                  past_key_values=model.get_prompt(2)).logits
    torch.testing.assert_close(fixed, legacy)


def test_fix_leaves_other_methods_alone(tiny_models):
    from peft import LoraConfig

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert not compat.prefix_tuning_needs_cache_fix(model)
    assert "_prefix_tuning_forward" not in vars(compat.apply_fixes(model))


def test_upstream_ia3_merge_with_a_roberta_head_is_still_broken(tiny_models):
    """If this starts failing, peft's IA3 unload handles classification heads and
    compat.unwrap_modules_to_save can go (merge still works with it: tests/test_merge.py)."""
    from peft import IA3Config

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["roberta"]), num_labels=2)
    model = get_peft_model(base, IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"]))
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        model.merge_and_unload()


# --- PiSSA / OLoRA conversion drops the other saved tensors ---------------------------------

def test_upstream_pissa_conversion_still_drops_the_head(tiny_models, tmp_path):
    """If this starts failing, peft's conversion on save keeps the classification head (modules_to_save) and
    compat.restore_dropped_tensors can go; with it, the head is back, unchanged."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4,
                                            init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True  # peft's recipe: the starting adapter as a plain LoRA
    model.save_pretrained(str(tmp_path / "initial"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)  # "trained"
    model.save_pretrained(str(tmp_path / "converted"),
                          path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    weights = tmp_path / "converted" / "adapter_model.safetensors"
    expected = get_peft_model_state_dict(model)
    head = sorted(k for k in expected if "classifier" in k)
    assert head and not set(head) & set(load_file(str(weights)))  # the trained head is not saved
    assert sorted(compat.restore_dropped_tensors(weights, expected)) == head
    saved = load_file(str(weights))
    for name in head:
        torch.testing.assert_close(saved[name], expected[name])


# --- switching a prompt-learning classifier's adapter off ----------------------------------

def _prompt_classifier(path):
    from peft import PromptTuningConfig

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()
    return base, get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()


def test_upstream_disable_adapter_still_fails_for_prompt_learning_classifiers(tiny_models):
    """If this starts failing, peft's disable_adapter() works for prompt-learning classifiers and
    compat.adapter_disabled can go (inference.logits(without_adapter=True) would use peft's)."""
    _, model = _prompt_classifier(tiny_models["bert"])
    with pytest.raises(UnboundLocalError, match="old_prepare_inputs_for_generation"):
        with torch.no_grad(), model.disable_adapter():
            model(**_batch(tiny_models["bert"]))


@pytest.mark.parametrize("kind", ["prompt", "lora"])
def test_adapter_disabled_gives_the_bare_base(tiny_models, kind):
    """compat.adapter_disabled: the base's own outputs (its original head, no virtual tokens), the adapter back on
    afterwards; a weight adapter goes through peft's disable_adapter()."""
    from peft import LoraConfig

    batch = _batch(tiny_models["bert"])
    if kind == "prompt":
        base, model = _prompt_classifier(tiny_models["bert"])
    else:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2).eval()
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"],
                                                init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # the adapter and the trained copy of the head differ from the base
                param.add_(0.5)
        adapted = model(**batch).logits
        with compat.adapter_disabled(model) as bare:
            plain = bare(**batch).logits
        again = model(**batch).logits
        fresh = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2).eval()
        fresh.classifier.load_state_dict(_original_head(model).state_dict())
        expected = fresh(**batch).logits
    torch.testing.assert_close(plain, expected)
    assert not torch.allclose(plain, adapted)
    torch.testing.assert_close(again, adapted)


def _original_head(model):
    from peft.utils.other import ModulesToSaveWrapper

    wrapper = next(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))
    return wrapper.original_module


# --- upstream notices that are not actionable for users ------------------------------------

def _future_warnings(action, silence: bool) -> list[str]:
    """The messages of the FutureWarnings ``action`` raises, every filter reset (then peftlab's, if ``silence``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        if silence:
            compat.silence_upstream_notices()
        action()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_upstream_notices_are_still_raised(tiny_models):
    """If this starts failing, upstream no longer raises a notice compat.UPSTREAM_NOTICES silences, and its entry can
    go; with compat.silence_upstream_notices() (called by `import peftlab`) neither is shown."""
    from peft import LoraConfig
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    def wrap():
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models["bert"]), num_labels=2)
        get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))

    small = {"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
    bert2bert = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**small), BertConfig(**small, is_decoder=True, add_cross_attention=True)))
    bert2bert.config.decoder_start_token_id, bert2bert.config.pad_token_id = 2, 0

    def train_step():
        ids = torch.tensor([[2, 5, 6, 3]])
        bert2bert(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([[5, 6, 3]]))

    for action, notice in ((wrap, "`is_gradient_checkpointing` is deprecated"),
                           (train_step, "introduces a better way to train encoder-decoder models")):
        raised = _future_warnings(action, silence=False)
        assert any(notice in message for message in raised), raised
        assert not any(notice in message for message in _future_warnings(action, silence=True))


def _lora_classifier(tiny_models):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    with torch.no_grad():  # a LoRA that changes the outputs (B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    return model.eval(), dict(tokenizer(["alpha great", "delta awful echo", "golf"], padding=True, return_tensors="pt"))


def _fail_a_mixed_forward(model, batch):
    with pytest.raises(ValueError, match="adapter_names"):  # two names for three rows
        model(**batch, adapter_names=["default", "__base__"])


def test_upstream_mixed_batch_hooks_still_outlive_an_error(tiny_models):
    """Canary for compat.guard_mixed_batch_hooks: in plain peft, a mixed-adapter forward that raises leaves its
    adapter_names hooks on the LoRA layers, and the next plain forward fails. When this test fails, peft removes
    them in a finally: drop the guard."""
    model, batch = _lora_classifier(tiny_models)
    _fail_a_mixed_forward(model, batch)
    with pytest.raises(ValueError, match="adapter_names"):
        model(**batch)


def test_mixed_batch_hooks_are_removed_after_an_error(tiny_models):
    model, batch = _lora_classifier(tiny_models)
    compat.apply_fixes(model)
    with torch.no_grad():
        before = model(**batch).logits
        mixed = model(**batch, adapter_names=["default", "__base__", "default"]).logits
        _fail_a_mixed_forward(model, batch)
        assert compat.remove_call_hooks(model) == 0  # nothing left behind
        torch.testing.assert_close(model(**batch).logits, before)
        with model.disable_adapter():
            bare = model(**batch).logits
    torch.testing.assert_close(mixed[[0, 2]], before[[0, 2]])  # mixed batches still mix
    torch.testing.assert_close(mixed[1], bare[1])
    assert not torch.allclose(before[1], bare[1])


def test_upstream_question_answering_still_drops_token_type_ids(tiny_models):
    """peft's question-answering forward calls the base without the segment ids: two inputs that differ only in
    their token_type_ids give the same scores; with compat's fix they do not (as the bare transformers model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(0)
    base = AutoModelForQuestionAnswering.from_pretrained(str(tiny_models["bert"]))
    model = get_peft_model(base, LoraConfig(task_type="QUESTION_ANS", r=2, target_modules=["query"])).eval()
    ids = torch.tensor([[2, 7, 5, 3, 8, 9, 3]])
    zeros, segments = torch.zeros_like(ids), torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        same = model(input_ids=ids, token_type_ids=zeros).start_logits
        ignored = model(input_ids=ids, token_type_ids=segments).start_logits
        torch.testing.assert_close(same, ignored)  # upstream: the segments make no difference
        compat.apply_fixes(model)
        fixed = model(input_ids=ids, token_type_ids=segments).start_logits
        bare = base(input_ids=ids, token_type_ids=segments).start_logits
    assert not torch.allclose(fixed, same)
    torch.testing.assert_close(fixed, bare)  # LoRA's B starts at zero: the adapter model equals its base
