"""Added tokens: the embeddings grow, the new rows train, and the adapter reloads (peftlab and plain peft)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import PeftlabError, build_config, load_adapter, merge, train

MARKERS = ["<|user|>", "<|assistant|>"]
PROMPTS = ["<|user|> alpha great bravo <|assistant|>", "<|user|> delta awful zulu <|assistant|>"]


def token_config(tiny_lms, generative_data, tmp_path, arch, route, method="lora", **model):
    raw = {
        "model": {"name": str(tiny_lms[arch]), "add_tokens": ["zulu"],
                  "add_special_tokens": {"additional_special_tokens": MARKERS}, "train_new_tokens": route, **model},
        "task": "causal-lm", "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "prompt_template": "<|user|> {text} <|assistant|>", "max_length": 32,
                 "target_max_length": 4, "max_train_samples": 64, "max_eval_samples": 8},
        "training": {"max_steps": 4, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": 0,
                     "eval_strategy": "no", "keep": "last"},
        "output_dir": str(tmp_path / "run"),
    }
    return build_config(raw)


@torch.no_grad()
def greedy(model, tokenizer) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = tokenizer([prompt], return_tensors="pt")
        out.append(model.generate(**ids, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0].tolist())
    return out


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    return model(**tokenizer(PROMPTS, padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("arch,route", [("llama", "rows"), ("gpt2", "rows"), ("llama", "lora")])
def test_added_tokens_train_and_reload_identically(tiny_lms, generative_data, tmp_path, arch, route):
    base_vocab = len(AutoTokenizer.from_pretrained(str(tiny_lms[arch])))
    result = train(token_config(tiny_lms, generative_data, tmp_path, arch, route))
    model, tokenizer = result.model, result.tokenizer
    assert len(tokenizer) == base_vocab + 3
    new_ids = tokenizer.convert_tokens_to_ids(["zulu", *MARKERS])
    assert all(i >= base_vocab for i in new_ids)
    assert tokenizer("<|user|> alpha")["input_ids"][-2:] == [new_ids[1], tokenizer.convert_tokens_to_ids("alpha")]
    assert model.get_base_model().get_input_embeddings().weight.shape[0] == len(tokenizer)
    config = model.peft_config["default"]
    if route == "rows":  # only the new rows train (input and, untied, output embeddings)
        assert sorted(config.trainable_token_indices.values())[0] == sorted(new_ids)
        assert set(config.trainable_token_indices) == ({"wte"} if arch == "gpt2" else {"embed_tokens", "lm_head"})
    else:  # the notebook's route: LoRA on the embedding and output layers
        assert {"embed_tokens", "lm_head"} <= set(config.target_modules)
    before, expected = greedy(model, tokenizer), logits(model, tokenizer)

    # the saved tokenizer keeps the tokens; loading grows the base first (no size-mismatch error)
    saved = AutoTokenizer.from_pretrained(str(result.output_dir))
    assert saved.convert_tokens_to_ids(["zulu", *MARKERS]) == new_ids
    loaded = load_adapter(result.output_dir)
    assert len(loaded.tokenizer) == len(tokenizer)
    assert greedy(loaded.model, loaded.tokenizer) == before
    torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), expected)
    # the new tokens' embeddings were trained: not the mean of the old rows they started from
    with torch.no_grad():
        rows = loaded.model.get_input_embeddings()(torch.tensor(new_ids))
        init = AutoModelForCausalLM.from_pretrained(str(tiny_lms[arch])).get_input_embeddings().weight.mean(0)
    assert (rows - init).abs().max() > 1e-3

    # plain peft, resizing as docs/big-models.md shows
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lms[arch]))
    plain_tokenizer = AutoTokenizer.from_pretrained(str(result.output_dir))
    old = base.get_input_embeddings().weight.shape[0]
    base.resize_token_embeddings(len(plain_tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in {base.get_input_embeddings(), base.get_output_embeddings()}:
            layer.weight[old:] = layer.weight[:old].mean(0)
    plain = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    torch.testing.assert_close(logits(plain, plain_tokenizer), expected)
    assert greedy(plain, plain_tokenizer) == before

    # merging keeps the grown vocabulary
    merge(result.output_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.vocab_size == len(tokenizer)
    torch.testing.assert_close(logits(merged, merged_tokenizer), expected)


def test_added_tokens_config_errors(tiny_lms, generative_data, tmp_path):
    with pytest.raises(PeftlabError, match="unknown special token `pad_tokn`.*did you mean \"pad_token\""):
        token_config(tiny_lms, generative_data, tmp_path, "llama", "rows", add_special_tokens={"pad_tokn": "<p>"})
    with pytest.raises(PeftlabError, match="`additional_special_tokens` takes a list"):
        token_config(tiny_lms, generative_data, tmp_path, "llama", "rows",
                     add_special_tokens={"additional_special_tokens": "<x>"})
    with pytest.raises(PeftlabError, match='trained with method "lora", not "ia3"'):
        train(token_config(tiny_lms, generative_data, tmp_path, "llama", "rows", method="ia3"))
    assert not (tmp_path / "run").exists()


def test_new_pad_token(tiny_lms, generative_data, tmp_path):
    """A new pad token (the usual fix for models without one) is a special token like any other."""
    result = train(token_config(tiny_lms, generative_data, tmp_path, "gpt2", "rows",
                                add_special_tokens={"pad_token": "<|pad|>"}))
    assert result.tokenizer.pad_token == "<|pad|>"
    loaded = load_adapter(result.output_dir)
    assert loaded.tokenizer.pad_token == "<|pad|>"
    assert loaded.tokenizer.pad_token_id == len(loaded.tokenizer) - 1
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
