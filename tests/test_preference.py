"""Preference tuning (task: preference): each objective learns the tiny keyword preference, the reference is the
base (adapter off, or a frozen copy for full fine-tuning), the reference cache changes nothing but the work, the
data errors, plain-peft round trips, serving and every technique."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peftlab import build_config, evaluate, load_adapter, merge, predict, train
from peftlab.errors import ConfigError, DataError
from peftlab.methods import METHODS
from peftlab.tasks.preference import PreferenceLoss
from peftlab.testing import preference_rows, tiny_model_rate, write_jsonl

OBJECTIVES = ["dpo", "ipo", "orpo", "kto", "simpo"]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for i, r in enumerate(preference_rows(256, seed=1)) for side in (("chosen", "rejected")[i % 2],)]
    return {"train": write_jsonl(root / "train.jsonl", preference_rows(256, seed=1)),
            "validation": write_jsonl(root / "validation.jsonl", preference_rows(64, seed=2)),
            "chat_train": write_jsonl(root / "chat_train.jsonl", preference_rows(256, seed=1, chat=True)),
            "chat_validation": write_jsonl(root / "chat_validation.jsonl", preference_rows(64, seed=2, chat=True)),
            "unpaired_train": write_jsonl(root / "unpaired_train.jsonl", unpaired)}


def pref_config(tiny_lms, pref_data, tmp_path, loss="dpo", method="lora", prefix="", steps=40, arch="llama",
                **overrides):
    raw = {"model": {"name": str(tiny_lms[arch])}, "task": "preference", "method": {"name": method},
           "data": {"train_file": str(pref_data[f"{prefix}train"]),
                    "validation_file": str(pref_data[f"{prefix}validation" if prefix != "unpaired_" else "validation"]),
                    "max_length": 32},
           "training": {"max_steps": steps, "batch_size": 16, "progress": False, "seed": 0, "eval_strategy": "no",
                        "keep": "last", "log_every": 10,
                        "learning_rate": 10 * tiny_model_rate(METHODS[method], "preference")},
           "preference": {"loss": loss}, "output_dir": str(tmp_path / f"run-{loss}-{method}{prefix}")}
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


# --- learning --------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", OBJECTIVES)
def test_each_objective_learns_the_preference(tiny_lms, pref_data, tmp_path, loss):
    """Held-out pairs: the chosen completion's log-probability overtakes the rejected one's (pairwise accuracy and
    margin go up), and the reward margin the objective logs grows during training."""
    result = train(pref_config(tiny_lms, pref_data, tmp_path, loss=loss, steps=60 if loss == "orpo" else 40,
                               **({"preference.beta": 1.0} if loss == "orpo" else {})), overwrite=True,
                   evaluate_before=True)
    before, after = result.initial_metrics, result.metrics
    assert after["pairwise_accuracy"] >= before["pairwise_accuracy"] + 0.2
    assert after["margin"] > before["margin"] + 1.0
    assert result.main_metric == "pairwise_accuracy"
    curve = [entry["rewards/margins"] for entry in result.losses]
    assert curve[-1] > curve[0]  # TRL's logged values ride on the loss curve
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(result.losses[-1])
    if loss in ("dpo", "ipo", "kto"):  # the reference is the base: held-out rewards start at 0 and part
        assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert after["rewards/margins"] > 0.1
    saved = json.loads((result.output_dir / "peftlab.json").read_text())
    assert saved["meta"]["preference"]["loss"] == loss  # the objective travels with the run


@pytest.mark.slow  # the everyday loop's budget (CI runs it)
def test_kto_learns_from_unpaired_rows(tiny_lms, pref_data, tmp_path):
    result = train(pref_config(tiny_lms, pref_data, tmp_path, loss="kto", prefix="unpaired_"), overwrite=True,
                   evaluate_before=False)
    assert result.metrics["pairwise_accuracy"] > 0.8  # evaluated on held-out pairs
    assert "kl" in result.losses[-1]


@pytest.mark.slow  # the everyday loop's budget (CI runs it)
def test_chat_rows_train_through_the_template(tiny_lms, pref_data, tmp_path):
    result = train(pref_config(tiny_lms, pref_data, tmp_path, prefix="chat_"), overwrite=True, evaluate_before=True)
    assert result.metrics["pairwise_accuracy"] >= result.initial_metrics["pairwise_accuracy"] + 0.2
    assert json.loads((result.output_dir / "peftlab.json").read_text())["meta"]["mode"] == "chat"


@pytest.mark.slow  # the everyday loop's budget (CI runs it)
def test_precomputed_reference_gives_the_same_run_with_fewer_passes(tiny_lms, pref_data, tmp_path, monkeypatch):
    """Two epochs with the cache: the same metrics as without, each training sequence's reference computed once."""
    import peftlab.tasks.preference as preference

    passes = []
    original = preference.PreferenceLoss._reference_logps

    def counting(self, frozen, batch):
        passes.append(len(batch["key"]))
        return original(self, frozen, batch)

    monkeypatch.setattr(preference.PreferenceLoss, "_reference_logps", counting)
    config = pref_config(tiny_lms, pref_data, tmp_path, steps=None, **{"training.max_steps": "null",
                                                                       "training.epochs": 2})
    plain = train(config, overwrite=True)
    plain_passes, passes[:] = sum(passes), []
    cached = train(config.model_copy(update={"preference": config.preference.model_copy(
        update={"precompute_reference": True})}), overwrite=True)
    # each of the 256 training pairs' two sequences once, then the final evaluation's 64 pairs (not cached)
    assert sum(passes) == 2 * 256 + 2 * 64 and plain_passes == 2 * (2 * 256) + 2 * 64
    for name in ("pairwise_accuracy", "margin", "loss", "rewards/margins"):
        assert cached.metrics[name] == pytest.approx(plain.metrics[name], abs=1e-5)


def test_full_fine_tuning_keeps_a_frozen_reference_that_is_never_saved(tiny_lms, pref_data, tmp_path):
    result = train(pref_config(tiny_lms, pref_data, tmp_path, method="full", steps=20), overwrite=True,
                   evaluate_before=True)
    assert result.initial_metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the copy is the base
    assert result.metrics["rewards/margins"] > 0.1  # and stays it while the model moves
    reference = result.model.__dict__["_peftlab_reference"]
    assert not any(p.requires_grad for p in reference.parameters())
    assert "_peftlab_reference" not in dict(result.model.named_children())  # not a submodule: not saved
    names = {n for n, _ in result.model.named_parameters()}
    assert len(names) == len(list(AutoModelForCausalLM.from_pretrained(tiny_lms["llama"]).named_parameters()))


# --- artifacts, prediction, serving ----------------------------------------------------------------

def test_plain_peft_loads_the_adapter_and_it_prefers_the_chosen_answer(tiny_lms, pref_data, tmp_path):
    result = train(pref_config(tiny_lms, pref_data, tmp_path), overwrite=True)
    loaded = load_adapter(result.output_dir)
    for name in ("pairwise_accuracy", "rewards/margins"):  # peftlab eval of the saved run: what training measured
        assert evaluate(loaded)[name] == pytest.approx(result.metrics[name], abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_lms["llama"]).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lms["llama"]),
                                      str(result.output_dir)).eval()
    rows = preference_rows(32, seed=9)
    ids = loaded.tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        tuned_logits = loaded.model(**ids).logits
        torch.testing.assert_close(plain(**ids).logits, tuned_logits)
        base_logits = base(**ids).logits
    last = ids["attention_mask"].sum(1) - 1
    words = [[loaded.tokenizer.convert_tokens_to_ids(r[side].strip()) for r in rows] for side in ("chosen", "rejected")]

    def prefers(logits):  # the next word after the prompt: the chosen answer above the rejected one
        scores = logits[torch.arange(len(rows)), last]
        return int((scores[torch.arange(len(rows)), words[0]] > scores[torch.arange(len(rows)), words[1]]).sum())

    assert prefers(tuned_logits) >= 26 and prefers(tuned_logits) > prefers(base_logits)
    merged = AutoModelForCausalLM.from_pretrained(merge(result.output_dir, tmp_path / "merged").output_dir).eval()
    with torch.no_grad():  # folded into the base: a plain causal LM with the same preference
        torch.testing.assert_close(merged(**ids).logits, tuned_logits, atol=1e-4, rtol=1e-4)


def test_served_beside_a_causal_lm_adapter_of_the_same_base(tiny_lms, pref_data, tmp_path):
    """One server: the preference-tuned adapter and a causal-lm one (plain peft), each answering as predict does."""
    from fastapi.testclient import TestClient
    from peft import LoraConfig
    from serve_helpers import save_random_adapter

    from peftlab.serving import create_app, create_server

    result = train(pref_config(tiny_lms, pref_data, tmp_path), overwrite=True)
    other = save_random_adapter(tiny_lms["llama"], tmp_path / "plain", LoraConfig(r=4, task_type="CAUSAL_LM"), seed=1)
    prompt = preference_rows(1, seed=9)[0]["prompt"]
    expected = {name: predict(path, texts=[prompt])[0]["generated"]
                for name, path in (("tuned", result.output_dir), ("plain", other))}
    assert expected["tuned"] != expected["plain"]
    server = create_server(str(tiny_lms["llama"]), {"tuned": str(result.output_dir), "plain": str(other)})
    with TestClient(create_app(server)) as client:
        for name in ("tuned", "plain"):
            answer = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 32})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"].strip() == expected[name].strip(), name


# --- clear errors ------------------------------------------------------------------------------------

def _write(tmp_path, name, rows):
    return write_jsonl(tmp_path / name, rows)


@pytest.mark.parametrize("case,error,words", [
    ("missing", DataError, 'no column "rejected"'),
    ("identical", DataError, "identical"),
    ("long_prompt", DataError, "prompt alone"),
    ("unpaired_dpo", ConfigError, "needs chosen / rejected pairs"),
])
def test_bad_rows_get_their_own_error(tiny_lms, pref_data, tmp_path, case, error, words):
    rows = preference_rows(8, seed=3)
    if case == "missing":
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected_text": r["rejected"]} for r in rows]
    elif case == "identical":
        rows[2]["rejected"] = rows[2]["chosen"]
    elif case == "long_prompt":
        rows[1]["prompt"] = "review : " + " alpha" * 40 + " label :"
    else:
        rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    path = _write(tmp_path, f"{case}.jsonl", rows)
    config = pref_config(tiny_lms, pref_data, tmp_path, **{"data.train_file": str(path),
                                                          "data.validation_file": str(path)})
    with pytest.raises(error, match=words):
        train(config, overwrite=True)
    assert not (tmp_path / "run-dpo-lora").exists()  # nothing half-written


def test_cli_reports_a_bad_objective_without_a_traceback(tiny_lms, pref_data, tmp_path, capsys, monkeypatch):
    import sys

    from peftlab import cli

    recipe = tmp_path / "recipe.yaml"
    pref_config(tiny_lms, pref_data, tmp_path).save(recipe)
    monkeypatch.setattr(sys, "argv", ["peftlab", "train", str(recipe), "--set", "preference.loss=cpo"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "preference.loss" in err and "dpo" in err and "Traceback" not in err


# --- every technique ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", [n for n, s in METHODS.items() if "preference" in s.tasks])
def test_every_technique_trains_with_dpo(tiny_lms, pref_data, tmp_path, method):
    """Each technique: DPO moves the held-out reward margin up in the chosen answers' favour, against the base (an
    adapter that starts as the identity starts at margin 0; prompt learning's virtual tokens start somewhere else)."""
    rate = tiny_model_rate(METHODS[method], "preference") * (3 if METHODS[method].prompt_learning else 10)
    result = train(pref_config(tiny_lms, pref_data, tmp_path, method=method,
                               steps=60 if METHODS[method].prompt_learning else 30,
                               arch="llama-bias" if method == "bitfit" else "llama",
                               **{"training.learning_rate": rate}), overwrite=True, evaluate_before=True)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]  # the DPO objective falls in training
    if not METHODS[method].prompt_learning:  # (on the tiny random model prompt learning hardly generalises)
        assert result.initial_metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
        assert result.metrics["rewards/margins"] > result.initial_metrics["rewards/margins"]


def test_the_loss_logs_means_since_its_last_report():
    from peftlab.config import PreferenceConfig

    loss = PreferenceLoss(PreferenceConfig(), cache=False)
    loss._logged["rewards/margins"] += [1.0, 3.0]
    assert loss.logged() == {"rewards/margins": 2.0}
    assert loss.logged() == {}


@pytest.mark.slow
def test_compare_ranks_techniques_on_a_preference_recipe(tiny_lms, pref_data, tmp_path):
    """Side by side: each technique's held-out pairwise accuracy against the bare base's (measured), and the full
    fine-tune's memory note says its figure holds the frozen reference."""
    from peftlab.comparison.report import notes
    from peftlab.comparison.runner import compare
    from peftlab.comparison.summary import summarize

    config = pref_config(tiny_lms, pref_data, tmp_path, steps=20)
    result = compare(config, methods=["lora", "ia3", "full"], out_dir=tmp_path / "cmp", progress=False)
    rows = {row["method"]: row for row in result.rows}
    assert set(rows) == {"lora", "ia3", "full"} and not result.failed
    base = result.baselines["base_model"]
    assert base["metric"] == "pairwise_accuracy" and 0 <= base["value"] <= 1
    for name, row in rows.items():
        assert row["main_metric"] == "pairwise_accuracy"
        assert row["initial_value"] == pytest.approx(base["value"], abs=1e-6), name  # before training: the base
    assert rows["lora"]["main_value"] > base["value"]
    assert rows["full"]["notes"] and "frozen copy" in rows["full"]["notes"][0]
    assert not rows["lora"]["notes"]
    assert any("full: memory:" in line for line in notes(summarize(result.rows, result.baselines)))


@pytest.mark.slow  # the everyday loop's budget (CI runs it)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_resumed_preference_run_equals_the_uninterrupted_one(tiny_lms, pref_data, tmp_path, method):
    """Checkpoints and resume as for every family: the same weights, evaluations and loss curve (its rewards
    included); full fine-tuning's reference is read again from the base, not taken from the resumed weights."""
    from safetensors.torch import load_file

    from peftlab import checkpoint

    settings = {"training.eval_strategy": "steps", "training.eval_steps": 4, "training.checkpoint_every": 4,
                "training.log_every": 2, "data.max_train_samples": 64}
    reference = train(pref_config(tiny_lms, pref_data, tmp_path / "a", method=method, steps=10, **settings))
    config = pref_config(tiny_lms, pref_data, tmp_path / "b", method=method, steps=10, **settings)

    def crash(kind, data):
        if kind == "step" and data["step"] == 6:
            raise RuntimeError("crash")  # a checkpoint at step 4, then the process dies

    with pytest.raises(RuntimeError, match="crash"):
        train(config, on_event=crash)
    assert checkpoint.saved(checkpoint.directory_for(config))
    resumed = train(config, resume=True)
    assert resumed.history == reference.history and resumed.losses == reference.losses
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    left, right = load_file(str(reference.output_dir / name)), load_file(str(resumed.output_dir / name))
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_long_completions_are_cut_at_the_budget_with_a_count(tiny_lms, capsys):
    import datasets
    from transformers import AutoTokenizer

    from peftlab.config import DataConfig
    from peftlab.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_lms["llama"])
    rows = [{"prompt": "review : alpha label :", "chosen": " positive" + " bravo" * 20, "rejected": " negative"},
            {"prompt": "review : delta label :", "chosen": " negative", "rejected": " positive"}]
    encoded = get_task("preference").encode(datasets.Dataset.from_list(rows), tokenizer, DataConfig(train_file="x"),
                                            {"mode": "text", "paired": True}, 12, "rows")
    assert max(len(ids) for ids in encoded["input_ids"]) == 12  # prompt + chosen cut at the budget
    assert encoded["rejected_ids"][0][-1] == tokenizer.eos_token_id  # the short one keeps its end
    assert "1 of 2 rows are longer than data.max_length=12" in capsys.readouterr().err
