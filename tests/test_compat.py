"""The isolated fix for prefix tuning on BERT/RoBERTa classifiers (see peftlab/compat.py)."""

from __future__ import annotations

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
