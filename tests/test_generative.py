"""Seq2seq and causal LM: every technique x family learns, generates faithfully, reloads
exactly, and plain peft loads the artifacts."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peftlab import build_config, compat, load_adapter, predict, train

FAMILIES = {"t5": "seq2seq", "llama": "causal-lm", "gpt2": "causal-lm"}
LEARNING_RATES = {"lora": 1e-2, "ia3": 5e-2, "prefix": 5e-2, "ptuning-v2": 5e-2, "prompt": 5e-2, "ptuning": 5e-2}
PROMPTS = ["alpha great bravo", "delta awful echo", "golf great"]


def generative_config(tiny_lms, generative_data, tmp_path, arch, method, **overrides):
    task = FAMILIES[arch]
    raw = {
        "model": {"name": str(tiny_lms[arch])}, "task": task, "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4},
        "training": {"epochs": 12, "batch_size": 16, "learning_rate": LEARNING_RATES[method], "progress": False,
                     "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    if task == "causal-lm":
        raw["data"]["prompt_template"] = "review : {text} label :"
    if method == "lora":  # no dropout: a tiny model's outcome otherwise hangs on how the dropout draws fall, and
        raw["method"]["options"] = {"lora_dropout": 0.0}  # packed batches (the fast path) draw them in other shapes
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


@torch.no_grad()
def stepwise_greedy(model, tokenizer, text: str, steps: int) -> list[int]:
    """Greedy decoding by full forward passes (no KV cache): what generate() must equal."""
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    encoder_decoder = model.config.is_encoder_decoder
    out = torch.tensor([[model.config.decoder_start_token_id]]) if encoder_decoder else ids
    for _ in range(steps):
        kwargs = {"input_ids": ids, "decoder_input_ids": out} if encoder_decoder else {"input_ids": out}
        logits = model(**kwargs, attention_mask=torch.ones_like(ids if encoder_decoder else out),
                       use_cache=False).logits
        token = logits[:, -1:].argmax(-1)
        out = torch.cat([out, token], 1)
        if int(token) == tokenizer.eos_token_id:
            break
    return out[0, (1 if encoder_decoder else ids.shape[1]):].tolist()


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_technique_trains_generates_and_reloads(tiny_lms, generative_data, tmp_path, arch, method):
    config = generative_config(tiny_lms, generative_data, tmp_path, arch, method)
    result = train(config, evaluate_before=True)
    assert result.metrics["loss"] < 0.8 * result.initial_metrics["loss"]
    if method == "lora":
        assert result.metrics["accuracy"] >= 0.9  # the label is generated, scored by exact match

    # generation after reload equals generation before save
    after = predict(result.output_dir, texts=PROMPTS)
    loaded = load_adapter(result.output_dir)
    from peftlab.tasks import get_task

    task = get_task(config.task)
    before = task.predict(result.model, result.tokenizer, [{"text": t} for t in PROMPTS], config.data,
                          loaded.meta, 32, 8, config.generation)
    assert [r["generated"] for r in after] == [r["generated"] for r in before]

    # generate() with the adapter equals step-by-step greedy decoding of the forward pass
    prompt = PROMPTS[0] if arch == "t5" else f"review : {PROMPTS[0]} label :"
    expected = stepwise_greedy(loaded.model, loaded.tokenizer, prompt, 4)
    ids = loaded.tokenizer([prompt], return_tensors="pt")["input_ids"]
    generated = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                      do_sample=False, **compat.generation_overrides(loaded.model))
    generated = generated[0, (1 if arch == "t5" else ids.shape[1]):].tolist()
    assert generated[:len(expected)] == expected

    # plain peft loads the artifacts and computes the same logits
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    plain = PeftModel.from_pretrained(auto.from_pretrained(str(tiny_lms[arch])), str(result.output_dir)).eval()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.tensor([[0, 5]])
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model(**batch).logits)


def test_upstream_cached_prefix_generation_is_still_broken(tiny_lms, generative_data, tmp_path):
    """If this starts failing, peft's cached generation is fixed and compat.generation_overrides can go."""
    config = generative_config(tiny_lms, generative_data, tmp_path, "t5", "prefix", **{"training.epochs": 4})
    result = train(config)
    model, tokenizer = result.model, result.tokenizer
    expected = stepwise_greedy(model, tokenizer, "alpha great bravo", 3)
    ids = tokenizer(["alpha great bravo"], return_tensors="pt")["input_ids"]
    cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert cached[0, 1:].tolist()[:len(expected)] != expected


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_generation_does_not_depend_on_the_batch(tiny_lms, generative_data, tmp_path, monkeypatch,
                                                                 method):
    """peft ignores position ids for prompt learning, so a left-padded row is generated at shifted positions:
    peftlab batches only prompts of one length there, and each row's output is its own."""
    from peftlab.tasks import generation

    config = generative_config(tiny_lms, generative_data, tmp_path, "llama", method, **{"training.epochs": 1})
    result = train(config)
    model, tokenizer = result.model, result.tokenizer
    prompts = [tokenizer(t)["input_ids"] for t in ["alpha great bravo charlie delta echo foxtrot", "golf",
                                                     "kilo lima awful", "great", "hotel india juliett kilo"]]
    decoding = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}  # no early EOS: rows to compare

    def generate(batch_size):
        return generation.generate_tokens(model, tokenizer, prompts, batch_size, decoding, decoder_only=True)

    alone = generate(1)
    assert generate(len(prompts)) == alone
    # without the equal-length batches, padding shifts the short rows (would fail if peft kept position ids)
    monkeypatch.setattr(generation, "_prompt_learning", lambda model: False)
    assert generate(len(prompts)) != alone
    # the full path: predict() gives each text the output it gets alone
    texts = ["alpha great bravo charlie", "golf", "kilo awful"]
    monkeypatch.undo()
    assert predict(result, texts=texts) == [predict(result, texts=[t])[0] for t in texts]


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "ln-tuning"])
def test_bert2bert_takes_its_encoders_default_targets(tiny_models, generative_data, tmp_path, method):
    """A composite EncoderDecoderModel has no target table of its own: its encoder's (BERT's) applies, so the
    weight adapters train on it without target_modules, in the encoder and the decoder alike."""
    from peftlab.offline_models import _build_minilm2minilm

    base = tmp_path / "bert2bert"
    _build_minilm2minilm(tiny_models["bert"], base)  # BERT2BERT warm-started from the tiny BERT
    config = build_config({
        "model": {"name": str(base)}, "task": "seq2seq",
        "method": {"name": method, "options": {"modules_to_save": ["crossattention"]}},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4, "max_eval_samples": 8},
        "training": {"max_steps": 2, "batch_size": 8, "eval_strategy": "no", "progress": False, "seed": 0},
        "output_dir": str(tmp_path / "run")})
    result = train(config)
    layers = {name.split(".")[2] for name, p in result.model.named_parameters()
              if p.requires_grad and "crossattention" not in name and "classifier" not in name
              and name.split(".")[2] in {"encoder", "decoder"}}
    assert layers == {"encoder", "decoder"}, layers  # the adapter sits in both halves
    plain = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(base)), str(result.output_dir))
    assert plain.peft_config["default"].target_modules
