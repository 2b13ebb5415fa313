"""Every technique x BERT / RoBERTa: it learns, it reloads exactly, plain peft loads it."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from peftlab import compat, load_adapter
from peftlab.methods import METHODS

# A learning rate per technique that fits the tiny models (prompt methods need their own).
LEARNING_RATES = {"lora": 1e-2, "ia3": 5e-2, "prefix": 1e-2, "ptuning-v2": 3e-2, "prompt": 1e-2, "ptuning": 1e-2}
PROBE = ["alpha great bravo charlie", "delta awful echo", "golf hotel india great kilo lima mike"]


def _logits(model, tokenizer, texts=PROBE):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_registry_has_the_six_techniques():
    assert set(METHODS) == set(LEARNING_RATES)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_technique_learns_and_reloads_identically(make_config, arch, method):
    from peftlab import train

    config = make_config(arch, method, **{"training.epochs": 12, "training.learning_rate": LEARNING_RATES[method]})
    result = train(config, evaluate_before=True)

    # it learned the keyword task
    assert result.metrics["loss"] < 0.7 * result.initial_metrics["loss"]
    assert result.metrics["accuracy"] >= 0.75
    assert 0 < result.trainable_params < result.total_params  # the base stays frozen

    # standard artifacts
    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "peftlab.yaml", "peftlab.json",
                 "metrics.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))

    # save -> reload through peftlab gives the same logits as the trained model
    before = _logits(result.model, result.tokenizer)
    loaded = load_adapter(out)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), before)

    # plain peft loads it on a freshly loaded base, head included
    base = AutoModelForSequenceClassification.from_pretrained(str(config.model.name), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(out))
    compat.apply_fixes(plain)  # no-op except for prefix tuning on encoders (upstream bug, see compat.py)
    torch.testing.assert_close(_logits(plain, loaded.tokenizer), before)
