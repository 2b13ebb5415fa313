"""Each preference objective against TRL (the well-kept implementation), on the same tiny model and batch.

DPO, IPO and KTO: TRL tokenizes the raw rows and we encode them ourselves; the token ids, the loss and the
logged values (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/*, kl) must agree
to 1e-5. ORPO and SimPO (TRL's experimental ORPOTrainer / CPOTrainer, which tokenize their own older way):
both sides score TRL's collated batch.
"""

from __future__ import annotations

import warnings

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.config import DataConfig, PreferenceConfig
from peftlab.tasks.objectives import sequence_logps
from peftlab.tasks.preference import PairCollator, PreferenceLoss, PreferenceTuning, pad
from peftlab.testing import preference_rows

trl = pytest.importorskip("trl")

ROWS = 4
TOL = 1e-5


@pytest.fixture
def base(tiny_lms):
    return AutoModelForCausalLM.from_pretrained(tiny_lms["llama"]).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_lms):
    return AutoTokenizer.from_pretrained(tiny_lms["llama"])


def _rows(kind: str) -> datasets.Dataset:
    rows = preference_rows(ROWS, seed=5, chat=kind == "chat")
    if kind == "unpaired":
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r, side in zip(rows, ["chosen", "rejected", "rejected", "chosen"])]
    return datasets.Dataset.from_list(rows)


def _ours(model, tokenizer, dataset, objective: PreferenceConfig):
    task = PreferenceTuning()
    meta = {"mode": "text", "paired": "chosen" in dataset.column_names, "preference": objective.model_dump(mode="json")}
    encoded = task.encode(dataset, tokenizer, DataConfig(train_file="x.csv"), meta, 64, "rows")
    batch = task.collator(tokenizer)([encoded[i] for i in range(len(encoded))])
    loss = PreferenceLoss(objective, cache=False)
    with torch.no_grad():
        policy = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        value, logged = loss.terms(model, batch, policy)
    return batch, float(value), logged


def _trainer(cls, config_cls, base, tokenizer, dataset, tmp_path, seed=0, **args):
    """TRL's trainer with a new LoRA adapter on ``base`` (its reference: the adapter switched off, as ours); the
    adapter's B matrices are then drawn at random so that the policy differs from the reference."""
    config = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=ROWS, report_to=[], use_cpu=True,
                        max_length=64, **args)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=base, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return trainer, trainer.model.eval()


def _assert_logged(theirs: dict[str, float], ours: dict[str, float], names: list[str]) -> None:
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], abs=TOL), name


@pytest.mark.parametrize("loss,kind", [("dpo", "text"), ("ipo", "text"), ("dpo", "chat")])
def test_dpo_and_ipo_equal_trl(base, tokenizer, tmp_path, loss, kind):
    dataset = _rows(kind)
    trainer, policy = _trainer(trl.DPOTrainer, trl.DPOConfig, base, tokenizer, dataset, tmp_path, beta=0.2,
                       loss_type=["sigmoid" if loss == "dpo" else "ipo"])
    their_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    with torch.no_grad():
        their_loss = float(trainer.compute_loss(policy, their_batch))
    theirs = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    batch, our_loss, ours = _ours(policy, tokenizer, dataset, PreferenceConfig(loss=loss, beta=0.2))
    # the same tokens: our sequences are TRL's (prompt + completion, text completions ending with EOS)
    width = min(batch["input_ids"].shape[1], their_batch["input_ids"].shape[1])
    assert torch.equal(batch["attention_mask"].sum(1), their_batch["attention_mask"].sum(1))
    assert torch.equal((batch["input_ids"] * batch["attention_mask"])[:, :width],
                       (their_batch["input_ids"] * their_batch["attention_mask"])[:, :width])
    assert our_loss == pytest.approx(their_loss, abs=TOL)
    _assert_logged(theirs, ours, ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                  "logps/chosen", "logps/rejected"])
    assert abs(ours["rewards/margins"]) > 1e-3  # the adapter moves the policy off the reference: a real comparison


def test_kto_equals_trl(base, tokenizer, tmp_path):
    dataset = _rows("unpaired")
    # seed 2: an adapter whose KL estimate is above 0 (it is clamped at 0; most draws on 4 rows fall below)
    trainer, policy = _trainer(trl.KTOTrainer, trl.KTOConfig, base, tokenizer, dataset, tmp_path, seed=2, beta=0.2,
                       desirable_weight=1.5, undesirable_weight=0.5)
    their_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    with torch.no_grad():
        their_loss = float(trainer.compute_loss(policy, their_batch))
    theirs = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    _, our_loss, ours = _ours(policy, tokenizer, dataset,
                              PreferenceConfig(loss="kto", beta=0.2, desirable_weight=1.5, undesirable_weight=0.5))
    assert our_loss == pytest.approx(their_loss, abs=TOL)
    _assert_logged(theirs, ours, ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                  "logps/rejected"])
    assert ours["kl"] > 0  # a real KL term (it is clamped at 0): the rows must be unlike the reference


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl(base, tokenizer, tmp_path, loss):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    dataset = _rows("text")
    if loss == "orpo":
        trainer, policy = _trainer(ORPOTrainer, ORPOConfig, base, tokenizer, dataset, tmp_path, beta=0.2)
    else:
        trainer, policy = _trainer(CPOTrainer, CPOConfig, base, tokenizer, dataset, tmp_path, beta=0.2, loss_type="simpo",
                           cpo_alpha=0.0, simpo_gamma=0.3)
    their_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    with torch.no_grad():
        their_loss, theirs = trainer.get_batch_loss_metrics(policy, their_batch, "train")
    theirs = {k: float(v) for k, v in theirs.items()}

    # TRL's own sequences in our layout: chosen rows, then rejected rows; the completion is where TRL's labels are
    sequences = []
    for side in ("chosen", "rejected"):
        for ids, mask, labels in zip(their_batch[f"{side}_input_ids"], their_batch[f"{side}_attention_mask"],
                                     their_batch[f"{side}_labels"]):
            ids = ids[mask.bool()].tolist()
            sequences.append((ids, int((labels != -100).nonzero()[0])))
    batch = {**pad(sequences, tokenizer.pad_token_id), "row": torch.arange(ROWS), "key": torch.arange(2 * ROWS)}
    objective = PreferenceConfig(loss=loss, beta=0.2, simpo_gamma=0.3)
    with torch.no_grad():
        scored = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
        our_loss, ours = PreferenceLoss(objective, cache=False).terms(policy, batch, scored)
    assert float(our_loss) == pytest.approx(float(their_loss), abs=TOL)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"]
    _assert_logged(theirs, ours, names + (["nll_loss", "log_odds_ratio", "log_odds_chosen"] if loss == "orpo" else []))


def test_collator_orders_chosen_then_rejected(tokenizer):
    rows = [{"input_ids": [1, 5, 6], "rejected_ids": [1, 5, 7, 8], "prompt_length": 2, "row": 0},
            {"input_ids": [1, 9, 6], "rejected_ids": [1, 9, 7], "prompt_length": 2, "row": 1}]
    batch = PairCollator(0)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 9, 6, 0], [1, 5, 7, 8], [1, 9, 7, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100], [-100, -100, 6, -100], [-100, -100, 7, 8],
                                        [-100, -100, 7, -100]]
    assert batch["key"].tolist() == [0, 2, 1, 3]
