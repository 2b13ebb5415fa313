"""Seq2seq and causal LM: every technique x family learns, generates faithfully, reloads
exactly, and plain peft loads the artifacts."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from peftlab import build_config, compat, load_adapter, predict, train
from peftlab.methods import METHODS
from peftlab.testing import tiny_model_rate

FAMILIES = {"t5": "seq2seq", "llama": "causal-lm", "gpt2": "causal-lm"}
TECHNIQUES = ["lora", "ia3", "prefix", "ptuning-v2", "prompt", "ptuning"]
PROMPTS = ["alpha great bravo", "delta awful echo", "golf great"]


def generative_config(tiny_lms, generative_data, tmp_path, arch, method, **overrides):
    task = FAMILIES[arch]
    raw = {
        "model": {"name": str(tiny_lms[arch])}, "task": task, "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4},
        # one evaluation at the end (generating the eval split each epoch would triple the test's time)
        "training": {"epochs": 12, "batch_size": 16, "learning_rate": tiny_model_rate(METHODS[method], task),
                     "progress": False, "seed": 0, "eval_strategy": "no", "keep": "last"},
        "output_dir": str(tmp_path / "run"),
    }
    if task == "causal-lm":
        raw["data"]["prompt_template"] = "review : {text} label :"
    if method == "lora":  # no dropout: a tiny model's outcome otherwise hangs on how the dropout draws fall, and
        raw["method"]["options"] = {"lora_dropout": 0.0}  # packed batches (the fast path) draw them in other shapes
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


@torch.no_grad()
def stepwise_greedy(model, tokenizer, ids: list[int], steps: int, min_new_tokens: int = 0) -> list[int]:
    """Greedy decoding by full forward passes of the whole sequence (no KV cache): what generate() must equal.

    ``min_new_tokens``: EOS cannot be chosen before that many new tokens (as generate()'s min_new_tokens)."""
    ids = torch.tensor([ids])
    encoder_decoder = model.config.is_encoder_decoder
    out = torch.tensor([[model.config.decoder_start_token_id]]) if encoder_decoder else ids
    new = []
    for step in range(steps):
        kwargs = {"input_ids": ids, "decoder_input_ids": out} if encoder_decoder else {"input_ids": out}
        logits = model(**kwargs, attention_mask=torch.ones_like(ids if encoder_decoder else out),
                       use_cache=False).logits[0, -1].clone()
        if step < min_new_tokens:
            logits[tokenizer.eos_token_id] = -float("inf")
        token = int(logits.argmax())
        new.append(token)
        out = torch.cat([out, torch.tensor([[token]])], 1)
        if token == tokenizer.eos_token_id:
            break
    return new


# prompts of 1 to 8 words, some of one length (they share a batch where prompt learning splits batches by length)
GENERATION_TEXTS = ["alpha great bravo", "kilo", "delta awful echo foxtrot golf hotel india", "golf great",
                    "awful mike", "hotel india juliet kilo great", "sierra tango awful romeo quebec mike papa oscar",
                    "november great oscar", "echo"]
FORCED_TOKENS = 5  # min_new_tokens = max_new_tokens: no row stops at once, every step is compared


@torch.no_grad()
def generation_drift(model, prompt: list[int], use_cache: bool, steps: int = 5) -> float:
    """Largest difference between generate()'s logits at each step and the forward pass over the same tokens."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, use_cache=use_cache, return_dict_in_generate=True,
                         output_logits=True)
    generated, sequence = torch.stack(out.logits, 1), out.sequences[:, :-1]
    if model.config.is_encoder_decoder:
        forward = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=sequence).logits
    else:  # (prompt tuning's logits include its virtual tokens: the last ones predict the generated tokens)
        forward = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
    return float((generated - forward[:, -steps:]).abs().max())


def check_generation_is_faithful(model, tokenizer, prompts: list[list[int]], decoder_only: bool) -> None:
    """Generation equals step-by-step greedy decoding of the forward pass, batched as peftlab batches (its path:
    predict, eval, serve); and generate()'s logits at each step equal the forward pass's, with or without cache."""
    from peftlab.tasks import generation

    expected = [stepwise_greedy(model, tokenizer, p, FORCED_TOKENS, FORCED_TOKENS) for p in prompts]
    decoding = {"max_new_tokens": FORCED_TOKENS, "min_new_tokens": FORCED_TOKENS, "do_sample": False,
                "num_beams": 1}
    generated = generation.generate_tokens(model, tokenizer, prompts, 4, decoding, decoder_only=decoder_only)
    wrong = [i for i, (g, e) in enumerate(zip(generated, expected)) if g != e]
    assert not wrong, f"{len(wrong)} of {len(prompts)} prompts differ: {[(generated[i], expected[i]) for i in wrong]}"
    for prompt in prompts[:3]:  # the logits of each step too, with and without the KV cache
        for use_cache in (False, True):
            assert generation_drift(model, prompt, use_cache) < 1e-4, (prompt, use_cache)


# GPT-2 in CI's slow run only (the everyday loop's budget): Llama covers decoder-only there
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "gpt2" else a for a in FAMILIES])
@pytest.mark.parametrize("method", TECHNIQUES)
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

    # generation equals step-by-step greedy decoding of the forward pass, for prompts of several lengths
    _, prompts = task.prompts([{"text": t} for t in GENERATION_TEXTS], loaded.tokenizer, config.data, 32)
    check_generation_is_faithful(loaded.model, loaded.tokenizer, prompts, decoder_only=arch != "t5")

    # plain peft loads the artifacts and computes the same logits
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    plain = PeftModel.from_pretrained(auto.from_pretrained(str(tiny_lms[arch])), str(result.output_dir)).eval()
    ids = torch.tensor([prompts[0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.tensor([[0, 5]])
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model(**batch).logits)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_upstream_prompt_learning_generation_is_still_broken(tiny_lms, arch, use_cache):
    """If this starts failing, plain peft's generation with a prefix equals its forward pass (peft speaks
    transformers' `cache=`) and the compat section "Prompt-learning generation and transformers' `cache` rename"
    can go; with the fix it does."""
    from peft import PrefixTuningConfig, get_peft_model

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(auto.from_pretrained(str(tiny_lms[arch])), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM", num_virtual_tokens=4)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lms[arch]))
    prompt = tokenizer("alpha great bravo charlie")["input_ids"]
    assert "prepare_inputs_for_generation" not in vars(model)  # plain peft
    assert generation_drift(model, prompt, use_cache) > 1e-2
    compat.fix_prompt_generation(model)
    assert generation_drift(model, prompt, use_cache) < 1e-4
    check_generation_is_faithful(model, tokenizer, [tokenizer(t)["input_ids"] for t in GENERATION_TEXTS],
                                 decoder_only=arch != "t5")


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "ptuning-v2"])
def test_prompt_learning_generation_does_not_depend_on_the_batch(tiny_lms, generative_data, tmp_path, monkeypatch,
                                                                 method):
    """peft ignores position ids for prompt tuning / P-tuning, so a left-padded row is generated at shifted
    positions: peftlab batches only prompts of one length there. Prefix tuning / P-tuning v2 keep them (offset by
    the prefix) and batch prompts of any length. Either way each row's output is its own."""
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
    split = method in {"prompt", "ptuning"}
    assert compat.prompt_positions_dropped(model) == split
    if split:  # without the equal-length batches, padding shifts the short rows (would fail if peft kept them)
        monkeypatch.setattr(compat, "prompt_positions_dropped", lambda model: False)
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


@pytest.mark.parametrize(("method", "options", "rate", "new_rate"), [
    ("ia3", {}, 8e-3, 2e-3),  # a small technique's high rate: the layers trained from scratch get their own
    ("prompt", {}, 3e-2, 2e-3),
    ("full", {}, 2e-5, 2e-3),  # and full fine-tuning's low one too
    ("lora", {}, 1e-3, 2e-3),
    ("ia3", {"training.new_weights_learning_rate": 5e-4}, 8e-3, 5e-4),  # the user's rate wins
])
def test_weights_the_checkpoint_lacked_train_at_their_own_rate(tiny_models, generative_data, tmp_path, method, options,
                                                               rate, new_rate):
    """BERT2BERT's cross-attention is a set of whole layers trained from scratch: at IA3's or prompt tuning's rate
    AdamW wrecks them, and full fine-tuning's barely moves them (the offline seq2seq recipe generated nothing), so
    they get their own rate; the technique's own weights keep the technique's."""
    from peftlab import fastpath
    from peftlab.loop import build_optimizer
    from peftlab.method_stage import build_model, new_weight_names, new_weights_rate
    from peftlab.offline_models import _build_minilm2minilm
    from peftlab.tasks import get_task

    base_dir = tmp_path / "bert2bert"
    _build_minilm2minilm(tiny_models["bert"], base_dir)
    config = build_config({
        "model": {"name": str(base_dir)}, "task": "seq2seq", "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "target_column": "target"},
        "training": {"learning_rate": rate, "weight_decay": 0.01}, "output_dir": str(tmp_path / "run")},
        [f"{k}={v}" for k, v in options.items()])
    spec, task = METHODS[method], get_task("seq2seq")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    fast = fastpath.resolve(config.model, config.training, packable=False, prompt_learning=spec.prompt_learning,
                            full=False)
    model, base, _ = build_model(config, task, spec, {}, tokenizer, fast)
    names = new_weight_names(model, base, spec, task.peft_task_type)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in trainable if ".crossattention." in n}  # every cross-attention tensor, nothing else
    optimizer = build_optimizer(model, spec, rate, 0.01, {}, False, (names, new_weights_rate(config.training)))
    by_param = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert by_param[id(param)] == (new_rate if name in names else rate), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_bert2bert_trains_and_saves_its_untrained_cross_attention(tiny_models, generative_data, tmp_path, method):
    """The BERT2BERT checkpoint leaves its untrained cross-attention out, so each load draws it at random: every
    technique, prompt learning on generation included (peft marks those modules on the transformers model, not on
    the PeftModel as for classification), must train it and save it, or plain peft reloads other outputs."""
    from peftlab.offline_models import _build_minilm2minilm

    base = tmp_path / "bert2bert"
    _build_minilm2minilm(tiny_models["bert"], base)
    config = build_config({
        "model": {"name": str(base)}, "task": "seq2seq", "method": {"name": method},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4, "max_eval_samples": 8},
        "training": {"max_steps": 2, "batch_size": 8, "eval_strategy": "no", "progress": False, "seed": 0},
        "output_dir": str(tmp_path / "run")})
    result = train(config)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad and ".crossattention." in n}
    assert trained, "the cross-attention did not train"
    batch = AutoTokenizer.from_pretrained(str(base))(PROMPTS, return_tensors="pt", padding=True)
    labels = torch.full((len(PROMPTS), 3), 5)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch, labels=labels).logits
        fresh = [AutoModelForSeq2SeqLM.from_pretrained(str(base)) for _ in range(2)]
        assert not torch.equal(*(m.decoder.bert.encoder.layer[0].crossattention.self.query.weight for m in fresh))
        plain = PeftModel.from_pretrained(fresh[0], str(result.output_dir)).eval()
        torch.testing.assert_close(plain(**batch, labels=labels).logits, expected, rtol=1e-5, atol=1e-5)
