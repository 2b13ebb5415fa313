"""Reward models: the Bradley-Terry loss and its metrics against TRL's RewardTrainer, tokenization as TRL's, training
on encoders and decoders, plain-peft round trips, predict / serve, clear errors, every technique that fits."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftlab import build_config, load_adapter, predict, train
from peftlab.config import DataConfig
from peftlab.errors import ConfigError, DataError
from peftlab.methods import METHODS
from peftlab.tasks import get_task
from peftlab.tasks.reward import REJECTED, RewardMeta, pair_metrics, rewards
from peftlab.testing import NEGATIVE, POSITIVE, WORDS, tiny_model_rate, write_jsonl

TASK = get_task("reward")
FITS = [name for name, spec in METHODS.items() if "reward" in spec.tasks]
PROMPT = "review :"  # words the tiny decoders' tokenizer knows (the tiny BERT's reads them as [UNK])


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable preference: the chosen completion holds "great", the rejected one "awful", among random words;
    a random head cannot tell them apart, a trained one must read the keyword."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = rng.choices(WORDS, k=rng.randint(2, 6)), rng.choices(WORDS, k=rng.randint(2, 6))
        good.insert(rng.randint(0, len(good)), POSITIVE)
        bad.insert(rng.randint(0, len(bad)), NEGATIVE)
        rows.append({"prompt": PROMPT, "chosen": " " + " ".join(good), "rejected": " " + " ".join(bad)})
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    return {"train": write_jsonl(root / "train.jsonl", pair_rows(256, seed=1)),
            "validation": write_jsonl(root / "validation.jsonl", pair_rows(64, seed=2))}


@pytest.fixture(scope="module")
def bases(tiny_encoders, tiny_lms):
    return {"bert": tiny_encoders["bert"], **{arch: tiny_lms[arch] for arch in ("llama", "gpt2")}}


def reward_config(bases, pair_data, tmp_path, arch="bert", method="lora", **overrides):
    raw = {"model": {"name": str(bases[arch])}, "task": "reward", "method": {"name": method},
           "data": {"train_file": str(pair_data["train"]), "validation_file": str(pair_data["validation"]),
                    "max_length": 32},
           "training": {"epochs": 4, "batch_size": 16, "learning_rate": tiny_model_rate(METHODS[method], "reward"),
                        "progress": False, "seed": 0, "eval_strategy": "no", "keep": "last"},
           "output_dir": str(tmp_path / f"run-{arch}-{method}")}
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


def _scores(model, tokenizer, texts):
    features = TASK.encode_rows(tokenizer, texts, None, None)
    return TASK.logits(model, tokenizer, features).squeeze(-1)


PROBES = [f"{PROMPT} alpha {POSITIVE} bravo", f"{PROMPT} alpha {NEGATIVE} bravo", f"{PROMPT} {POSITIVE}",
          f"{PROMPT} charlie delta echo {NEGATIVE} golf hotel"]


# --- the loss, the metrics and the tokens against TRL ---------------------------------------------

FOUR_PAIRS = [{"prompt": PROMPT, "chosen": " alpha great", "rejected": " bravo charlie awful delta"},
              {"prompt": f"{PROMPT} golf", "chosen": " great", "rejected": " awful hotel"},
              {"prompt": "user : india", "chosen": " juliet kilo great lima", "rejected": " awful"},
              {"prompt": PROMPT, "chosen": " mike awful", "rejected": " great november oscar papa"}]


def _trl_trainer(base, rows, tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, logging_strategy="no",
                            save_strategy="no", per_device_train_batch_size=len(rows))
    return trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer), model, tokenizer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_accuracy_and_margin_equal_trl_reward_trainer_on_its_own_batch(bases, tmp_path, arch):
    trainer, model, tokenizer = _trl_trainer(bases[arch], FOUR_PAIRS, tmp_path)
    dataset = datasets.Dataset.from_list(FOUR_PAIRS)
    encoded = TASK.encode(dataset, tokenizer, DataConfig(train_file="<inline>"), RewardMeta(), 64, "the pairs")
    # the same token ids as TRL's preprocessing (prompt + completion + EOS), and the same padded batch
    assert encoded["input_ids"] == list(trainer.train_dataset["chosen_ids"])
    assert encoded[REJECTED] == list(trainer.train_dataset["rejected_ids"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(FOUR_PAIRS))])
    ours = TASK.collator(tokenizer)([encoded[i] for i in range(len(FOUR_PAIRS))])
    assert ours.keys() == batch.keys() and all(torch.equal(ours[k], batch[k]) for k in batch)

    model.train()
    trl_loss = trainer.compute_loss(model, dict(batch))
    logged = trainer._metrics["train"]
    loss = TASK.training_loss(RewardMeta())(model, dict(batch))
    torch.testing.assert_close(loss, trl_loss, rtol=0, atol=1e-5)
    with torch.no_grad():
        chosen, rejected = rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    metrics = pair_metrics(chosen, rejected)
    assert metrics["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert metrics["pairwise_accuracy"] == pytest.approx(logged["accuracy"][-1], abs=1e-5)
    assert metrics["margin"] == pytest.approx(logged["margin"][-1], abs=1e-5)
    assert 0 < metrics["pairwise_accuracy"] < 1  # a random head: the pairs are not all ranked alike
    # and the gradients are TRL's too
    model.zero_grad()
    trl_loss.backward()
    theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    TASK.training_loss(RewardMeta())(model, dict(batch)).backward()
    for name, grad in theirs.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_chat_pairs_are_tokenized_as_trl_renders_them(bases, tmp_path):
    def turn(role, text):
        return [{"role": role, "content": text}]

    rows = [{"prompt": turn("user", "review"), "chosen": turn("assistant", "alpha great"),
             "rejected": turn("assistant", "bravo awful")},
            {"prompt": turn("user", "golf"), "chosen": turn("assistant", "great"),
             "rejected": turn("assistant", "awful hotel")}]
    trainer, _, tokenizer = _trl_trainer(bases["llama"], rows, tmp_path)
    dataset = datasets.Dataset.from_list(rows)
    data = DataConfig(train_file="<inline>")
    meta = TASK.inspect({"train": dataset, "eval": dataset}, data)
    assert meta == {"chat": True}
    encoded = TASK.encode(dataset, tokenizer, data, meta, 64, "the pairs")
    assert encoded["input_ids"] == list(trainer.train_dataset["chosen_ids"])
    assert encoded[REJECTED] == list(trainer.train_dataset["rejected_ids"])


def test_rows_without_a_prompt_column_are_tokenized_as_trl_reads_them(bases, tmp_path):
    """Anthropic-HH-style rows: chosen and rejected each hold the whole text (TRL's implicit prompt)."""
    def turn(role, text):
        return {"role": role, "content": text}

    text_rows = [{"chosen": f"{PROMPT} alpha great", "rejected": f"{PROMPT} bravo awful charlie"},
                 {"chosen": "user : golf great", "rejected": "user : awful"}]
    chat_rows = [{"chosen": [turn("user", "review"), turn("assistant", "alpha great")],
                  "rejected": [turn("user", "review"), turn("assistant", "bravo awful")]}]
    for rows in (text_rows, chat_rows):
        trainer, _, tokenizer = _trl_trainer(bases["llama"], rows, tmp_path)
        dataset = datasets.Dataset.from_list(rows)
        data = DataConfig(train_file="<inline>")
        encoded = TASK.encode(dataset, tokenizer, data, TASK.inspect({"train": dataset, "eval": dataset}, data), 64,
                              "the pairs")
        assert encoded["input_ids"] == list(trainer.train_dataset["chosen_ids"])
        assert encoded[REJECTED] == list(trainer.train_dataset["rejected_ids"])


def test_metrics_on_hand_made_rewards():
    metrics = pair_metrics(torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 3.0, -2.0]))
    assert metrics["pairwise_accuracy"] == 0.5  # a tie counts as a miss (strictly above)
    assert metrics["margin"] == pytest.approx((1 + 0 - 2 + 1) / 4)
    assert metrics["rewards/chosen"] == pytest.approx(0.5) and metrics["rewards/rejected"] == pytest.approx(0.5)
    expected = -torch.nn.functional.logsigmoid(torch.tensor([1.0, 0.0, -2.0, 1.0])).mean()
    assert metrics["loss"] == pytest.approx(float(expected)) and metrics["samples"] == 4


# --- padding: the score is read where it belongs, whatever the batch ----------------------------------

def test_scores_do_not_depend_on_the_batch_when_the_tokenizer_pads_with_another_id(bases):
    """A decoder finds its last real token by ``config.pad_token_id``; here the tokenizer pads with <pad> (0) while
    the model's pad id is EOS, as for a base without a pad token of its own: padded rows still score as alone."""
    tokenizer = AutoTokenizer.from_pretrained(str(bases["llama"]))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(bases["llama"]), num_labels=1).eval()
    model.config.pad_token_id = tokenizer.eos_token_id
    assert tokenizer.pad_token_id != model.config.pad_token_id
    together = _scores(model, tokenizer, PROBES)
    alone = torch.cat([_scores(model, tokenizer, [text]) for text in PROBES])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_a_decoder_without_a_pad_token_pads_with_eos_and_scores_rows_as_alone(bases, tmp_path):
    from peftlab.config import ModelConfig

    folder = tmp_path / "no-pad"
    base = AutoModelForSequenceClassification.from_pretrained(str(bases["llama"]), num_labels=1)
    base.config.pad_token_id = None  # as GPT-2, Llama and SmolLM2 checkpoints come
    base.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(bases["llama"]))
    model = TASK.load_model(ModelConfig(name=str(folder)), TASK.meta_for_base()).eval()
    assert model.config.pad_token_id == model.config.eos_token_id and model.config.num_labels == 1
    together = _scores(model, tokenizer, PROBES)
    alone = torch.cat([_scores(model, tokenizer, [text]) for text in PROBES])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_prompts_on_a_decoder_score_each_row_as_alone(bases, method):
    """peft hands a decoder prompt tuning's virtual tokens as embeddings, without the token ids it finds the last
    real token by: rows of one length share a pass, so padding never reaches the head."""
    from peft import get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(str(bases["llama"]))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(bases["llama"]), num_labels=1)
    spec = METHODS[method]
    model = get_peft_model(base, spec.build("SEQ_CLS", "llama", {}, model=base)).eval()
    together = _scores(model, tokenizer, PROBES)
    alone = torch.cat([_scores(model, tokenizer, [text]) for text in PROBES])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# --- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_lora_learns_the_preference_and_reloads_in_peftlab_and_plain_peft(bases, pair_data, tmp_path, arch):
    result = train(reward_config(bases, pair_data, tmp_path, arch), evaluate_before=True)
    before, after = result.initial_metrics, result.metrics
    assert after["pairwise_accuracy"] > 0.9 and after["pairwise_accuracy"] > before["pairwise_accuracy"] + 0.3, (
        before, after)
    assert after["loss"] < before["loss"] and after["margin"] > 1 and after["samples"] == 64
    assert after["rewards/chosen"] > after["rewards/rejected"]
    scores = _scores(result.model, result.tokenizer, PROBES)
    assert scores[0] > scores[1] and scores[2] > scores[3]
    loaded = load_adapter(result.output_dir)
    assert loaded.meta == {"chat": False} and loaded.task is TASK
    torch.testing.assert_close(_scores(loaded.model, loaded.tokenizer, PROBES), scores, rtol=1e-4, atol=1e-5)
    plain_base = AutoModelForSequenceClassification.from_pretrained(str(bases[arch]), num_labels=1)
    if plain_base.config.pad_token_id is None:  # GPT-2: pad with EOS, as peftlab and TRL do
        plain_base.config.pad_token_id = plain_base.config.eos_token_id
    plain = PeftModel.from_pretrained(plain_base, str(result.output_dir)).eval()
    torch.testing.assert_close(_scores(plain, loaded.tokenizer, PROBES), scores, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in FITS if m != "lora"])
def test_every_fitting_technique_learns_the_preference_and_reloads(bases, pair_data, tmp_path, method):
    spec = METHODS[method]
    result = train(reward_config(bases, pair_data, tmp_path, method=method, **{"training.epochs": 6}),
                   evaluate_before=True)
    before, after = result.initial_metrics, result.metrics
    assert after["pairwise_accuracy"] > 0.75 and after["loss"] < before["loss"], (before, after)
    scores = _scores(result.model, result.tokenizer, PROBES)
    torch.testing.assert_close(_scores(load_adapter(result.output_dir).model, result.tokenizer, PROBES), scores,
                               rtol=1e-4, atol=1e-5)
    if spec.full:
        plain = AutoModelForSequenceClassification.from_pretrained(str(result.output_dir))
    else:
        from peftlab import compat

        base = AutoModelForSequenceClassification.from_pretrained(str(bases["bert"]), num_labels=1)
        plain = compat.apply_fixes(PeftModel.from_pretrained(base, str(result.output_dir)))
    torch.testing.assert_close(_scores(plain.eval(), result.tokenizer, PROBES), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_prompt_learning_on_a_decoder_learns_the_preference(bases, pair_data, tmp_path, method):
    result = train(reward_config(bases, pair_data, tmp_path, "llama", method, **{"training.epochs": 6}),
                   evaluate_before=True)
    assert result.metrics["pairwise_accuracy"] > 0.75, (result.initial_metrics, result.metrics)
    scores = _scores(result.model, result.tokenizer, PROBES)
    torch.testing.assert_close(_scores(load_adapter(result.output_dir).model, result.tokenizer, PROBES), scores,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two trainings and a report; CI runs it
def test_compare_ranks_reward_models_against_chance(bases, pair_data, tmp_path):
    from peftlab.comparison import compare

    result = compare(reward_config(bases, pair_data, tmp_path), methods=["lora", "ia3"], out_dir=tmp_path / "cmp",
                     progress=False)
    assert not result.failed and result.baselines["majority"]["name"] == "chance"
    assert result.baselines["majority"]["value"] == 0.5
    assert all(row["main_value"] > 0.75 for row in result.rows), result.rows


# --- a trained reward model: eval, predict, serve ----------------------------------------------------

@pytest.fixture(scope="module")
def reward_run(bases, pair_data, tmp_path_factory):
    config = reward_config(bases, pair_data, tmp_path_factory.mktemp("reward-run"), "llama")
    return train(config), config


def test_eval_scores_the_saved_adapter_as_training_did(reward_run):
    from peftlab import evaluate

    result, _ = reward_run
    again = evaluate(result.output_dir)
    assert again["pairwise_accuracy"] == pytest.approx(result.metrics["pairwise_accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(result.metrics["loss"], rel=1e-4)


def test_predict_scores_texts_completions_and_pairs_alike(reward_run, tmp_path):
    result, _ = reward_run
    good, bad = f" alpha {POSITIVE} bravo", f" alpha {NEGATIVE} bravo"
    [whole] = predict(result.output_dir, texts=[PROMPT + good])
    [split] = predict(result.output_dir, texts=[PROMPT], pairs=[good])
    assert whole["text"] == PROMPT + good and split["text_pair"] == good
    assert whole["score"] == pytest.approx(split["score"], abs=1e-5)  # the same tokens: prompt + completion + EOS
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": PROMPT, "chosen": good, "rejected": bad},
                                                 {"prompt": PROMPT, "chosen": bad, "rejected": good},
                                                 {"prompt": PROMPT, "completion": good},
                                                 {"chosen": PROMPT + good, "rejected": PROMPT + bad}])
    first, swapped, single, implicit = predict(result.output_dir, file=str(rows))
    assert first["preferred"] == "chosen" and swapped["preferred"] == "rejected"
    assert first["score_chosen"] == pytest.approx(whole["score"], abs=1e-5)
    assert first["margin"] == pytest.approx(first["score_chosen"] - first["score_rejected"])
    assert single == {"prompt": PROMPT, "completion": good, "score": pytest.approx(whole["score"], abs=1e-5)}
    # no prompt column: the prompt is what chosen and rejected share (TRL's implicit prompt); the same texts
    assert implicit["preferred"] == "chosen" and implicit["prompt"] is None
    assert implicit["score_chosen"] == pytest.approx(whole["score"], abs=1e-5)


def test_serve_classify_scores_as_predict_does(reward_run):
    from serve_helpers import Running

    from peftlab.serving import create_server

    result, config = reward_run
    expected = predict(result.output_dir, texts=PROBES)
    running = Running(create_server(config.model.name, {"rm": result.output_dir}))
    try:
        answer = running.http.post("/v1/classify", json={"model": "rm", "input": PROBES}).json()
        model = running.http.get("/v1/models").json()
        paired = running.http.post("/v1/classify", json={"model": "rm", "input": [PROMPT, PROMPT],
                                                         "input_pair": [f" alpha {POSITIVE} bravo", " awful"]})
    finally:
        running.stop()
    assert [r["score"] for r in answer["data"]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    # a prompt and its completion (input_pair, optional for a reward model): scored as predict's --text / --pair
    assert paired.status_code == 200, paired.text
    by_pair = predict(result.output_dir, texts=[PROMPT, PROMPT], pairs=[f" alpha {POSITIVE} bravo", " awful"])
    assert [r["score"] for r in paired.json()["data"]] == pytest.approx([e["score"] for e in by_pair], abs=1e-5)
    assert set(answer["data"][0]) == {"index", "score"}
    assert any(m.get("labels") == ["score"] for m in model["data"])


def test_a_prompt_and_completion_score_through_the_serving_members_as_predict(reward_run):
    """What the server's batcher runs for a request with input_pair (encode_rows -> logits -> record)."""
    result, _ = reward_run
    good = f" alpha {POSITIVE} bravo"
    features = TASK.encode_rows(result.tokenizer, [PROMPT, PROMPT], [good, " awful"], None)
    assert features[0]["input_ids"] == TASK.encode_rows(result.tokenizer, [PROMPT + good], None, None)[0]["input_ids"]
    logits = TASK.logits(result.model, result.tokenizer, features)
    records = [TASK.record(PROMPT, pair, row, {}, probabilities=True) for pair, row in zip([good, " awful"], logits)]
    expected = predict(result.output_dir, texts=[PROMPT, PROMPT], pairs=[good, " awful"])
    assert [r["score"] for r in records] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert records[0] == {"text": PROMPT, "text_pair": good, "score": records[0]["score"]}


def test_the_model_card_snippet_scores_as_predict_does(reward_run, capsys):
    result, config = reward_run
    tokenizer = AutoTokenizer.from_pretrained(str(result.output_dir))
    base = AutoModelForSequenceClassification.from_pretrained(config.model.name, **TASK.model_kwargs({}))
    model = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
    snippet = "\n".join(TASK.card_example(config.data, 32))
    capsys.readouterr()
    with torch.no_grad():
        exec(snippet.replace('"Your prompt"', repr(PROMPT)).replace('" and a completion of it"', repr(" alpha great")),
             {"model": model, "tokenizer": tokenizer})
    [expected] = predict(result.output_dir, texts=[PROMPT], pairs=[" alpha great"])
    assert float(capsys.readouterr().out.strip()) == pytest.approx(expected["score"], abs=1e-5)


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "completion": " alpha", "label": True}], "unpaired rows"),
    ([{"prompt": "p", "chosen": " alpha"}], 'no column "rejected"'),
    ([{"prompt": "p", "rejected": " alpha"}], 'no column "chosen"'),
    ([{"prompt": "p", "chosen": " alpha", "rejected": " alpha"}], "chosen and rejected completions are identical"),
    ([{"prompt": "p", "chosen": " ", "rejected": " alpha"}], 'empty value'),
])
def test_bad_rows_get_their_own_error(bases, tmp_path, rows, message):
    write_jsonl(tmp_path / "bad.jsonl", rows * 4)
    config = build_config({"model": {"name": str(bases["bert"])}, "task": "reward",
                           "data": {"train_file": str(tmp_path / "bad.jsonl"), "eval_split": None},
                           "output_dir": str(tmp_path / "run")})
    with pytest.raises(DataError, match=message) as error:
        train(config)
    assert not (tmp_path / "run").exists()
    if message == "unpaired rows":
        assert "chosen" in error.value.hint and "task: preference" in error.value.hint


def test_predict_says_what_a_row_needs(reward_run):
    result, _ = reward_run
    with pytest.raises(DataError, match="row 1 has nothing to score") as error:
        TASK.predict(result.model, result.tokenizer, [{"text": "review : great"}, {"prompt": PROMPT, "chosen": " great"}],
                     DataConfig(train_file="<inline>"), {}, 32, 8)
    assert "--pair COMPLETION" in error.value.hint


def test_a_prompt_that_fills_the_budget_is_refused(bases):
    tokenizer = AutoTokenizer.from_pretrained(str(bases["llama"]))
    rows = datasets.Dataset.from_list([{"prompt": " ".join(WORDS), "chosen": " great", "rejected": " awful"}])
    with pytest.raises(DataError, match="prompt alone"):
        TASK.encode(rows, tokenizer, DataConfig(train_file="<inline>"), {}, 8, "the pairs")


def test_long_completions_are_cut_at_the_end_with_a_warning(bases, capsys):
    tokenizer = AutoTokenizer.from_pretrained(str(bases["llama"]))
    rows = datasets.Dataset.from_list([{"prompt": PROMPT, "chosen": " great " + " ".join(WORDS), "rejected": " awful"}])
    encoded = TASK.encode(rows, tokenizer, DataConfig(train_file="<inline>"), {}, 8, "the pairs")
    assert len(encoded["input_ids"][0]) == 8
    assert encoded["input_ids"][0][:3] == tokenizer(f"{PROMPT} great")["input_ids"]  # the start kept, the end cut
    assert len(encoded[REJECTED][0]) < 8
    assert "1 of 1 pairs in the pairs are longer than max_length=8" in capsys.readouterr().err


def test_classes_do_not_apply_and_class_weights_are_refused(bases, pair_data, tmp_path):
    assert TASK.label_counts(None, None, {}) == {} and TASK.labels({}) == ["score"]
    assert not TASK.needs_pairs(DataConfig(train_file="<inline>"))
    with pytest.raises(ConfigError, match="no classes") as error:
        TASK.loss_function([1.0])
    assert "--report" in error.value.hint
    with pytest.raises(ConfigError, match="no classes"):
        TASK.label_outcomes(None, None, None, None, None, {}, 8)
    with pytest.raises(ConfigError, match="no classes"):
        train(reward_config(bases, pair_data, tmp_path, **{"training.class_weights": "balanced"}))


def test_an_encoder_decoder_base_is_refused(tiny_lms, pair_data, tmp_path):
    config = build_config({"model": {"name": str(tiny_lms["t5"])}, "task": "reward",
                           "data": {"train_file": str(pair_data["train"])}, "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="encoder-decoder"):
        train(config)


def test_the_chance_baseline(pair_data):
    splits = {"train": datasets.load_dataset("json", data_files=str(pair_data["train"]))["train"],
              "eval": datasets.load_dataset("json", data_files=str(pair_data["validation"]))["train"]}
    baseline = TASK.baseline(splits, DataConfig(train_file="<inline>"), {})
    assert baseline.metrics["pairwise_accuracy"] == 0.5 and baseline.classes is None
    assert "chance" in baseline.description and baseline.metrics["samples"] == 64
    # the loss of equal scores (a model that learned nothing)
    assert baseline.metrics["loss"] == pytest.approx(pair_metrics(torch.zeros(3), torch.zeros(3))["loss"])
