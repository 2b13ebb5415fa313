"""Reward models: a scalar head trained on preference pairs with the Bradley-Terry loss, as TRL's RewardTrainer.

A row is a prompt with a chosen and a rejected completion (``data.prompt_column`` / ``chosen_column`` /
``rejected_column``; text, or chat messages rendered by the tokenizer's chat template; without a prompt column, the
prompt is what chosen and rejected share from their start, TRL's implicit prompt), checked and tokenized by
:mod:`peftlab.tasks.pairs` exactly as TRL tokenizes it: the model reads the prompt followed by the completion (text:
with EOS appended; chat: the whole conversation), one sequence per completion. The model is the base's
sequence-classification class with one output (``num_labels=1``; peft task type ``SEQ_CLS``): an encoder scores its
first token (BERT's pooler), a decoder-only model its last token that is not padding (``config.pad_token_id``, set
to EOS where the base has none).

Training: a batch holds the chosen sequences, then the rejected ones, padded together on the right (TRL's
``DataCollatorForPreference``); the loss is ``-logsigmoid(r_chosen - r_rejected)`` averaged over the pairs (TRL's
``RewardTrainer.compute_loss`` without a margin column or reward centring). Evaluation: ``pairwise_accuracy`` (the
share of pairs whose chosen completion scores strictly above the rejected one: TRL's logged ``accuracy``), the loss,
``margin`` (mean r_chosen - r_rejected) and the mean rewards of each side, over the whole split.

Serving and prediction score a text (the whole prompt + completion; EOS appended as in training) or a prompt and its
completion (``input_pair`` / ``--pair``), tokenized as in training; ``predict`` also takes rows with a prompt and a
chosen and a rejected completion, and says which one the model prefers.

Prompt tuning and P-tuning prepend their virtual tokens as embeddings, so a decoder-only model no longer sees the
token ids it finds its last real token with and reads the score at the last position, padding included: for those
techniques on such a model, each forward pass runs rows of one length together (:func:`rewards`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from peftlab import compat
from peftlab.config import DataConfig, ModelConfig
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base, pad_with_eos
from peftlab.progress import warn
from peftlab.tasks import pairs as preference_data
from peftlab.tasks.base import Baseline, Meta, WithoutClasses, model_device

REJECTED = "rejected_input_ids"  # an encoded row's rejected sequence (``input_ids``: the chosen one)

# --- typed meta ---------------------------------------------------------------------------------

@dataclass
class RewardMeta:
    """What a reward run learns from its data (``peftlab.json`` "meta" holds ``to_dict()``)."""

    chat: bool = False  # the prompts and completions are chat messages (rendered by the tokenizer's chat template)

    def to_dict(self) -> dict[str, Any]:
        return {"chat": self.chat}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RewardMeta:
        return cls(chat=bool(raw.get("chat", False)))

    @classmethod
    def of(cls, meta: Mapping[str, Any] | RewardMeta) -> RewardMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)


# --- the loss and the metrics -------------------------------------------------------------------

def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``-logsigmoid(r_chosen - r_rejected)`` averaged over the pairs (TRL's RewardTrainer loss)."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """The evaluation metrics of the pairs' rewards: the loss, ``pairwise_accuracy`` (chosen strictly above
    rejected), ``margin`` (mean r_chosen - r_rejected), the mean reward of each side and the pair count."""
    chosen, rejected = chosen.float(), rejected.float()
    if not len(chosen):
        return {"loss": float("nan"), "pairwise_accuracy": float("nan"), "margin": float("nan"),
                "rewards/chosen": float("nan"), "rewards/rejected": float("nan"), "samples": 0.0}
    return {"loss": float(bradley_terry(chosen, rejected)),
            "pairwise_accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).mean()),
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "samples": float(len(chosen))}


def _reads_last_token(model: torch.nn.Module) -> bool:
    """Whether the head scores the last non-padding token (decoder-only models: their head is ``score``; encoders'
    is ``classifier``, reading the first token)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(getattr(inner, "score", None), torch.nn.Module)


def rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            **forward_kwargs: Any) -> torch.Tensor:
    """One reward per row (a 1-D tensor, with its gradient) of right-padded rows.

    Padding positions hold the model's own ``pad_token_id`` (the id a decoder finds its last real token by, which
    the tokenizer's pad token may not be). Prompt tuning / P-tuning on a decoder-only model: rows of one length per
    forward pass (see the module's docstring); ``forward_kwargs`` (peft's ``adapter_names``) follow their rows.
    """
    unwrapped = getattr(model, "module", model)  # the model under accelerate's DDP wrapper
    pad = getattr(getattr(unwrapped, "config", None), "pad_token_id", None)
    if pad is not None:
        input_ids = input_ids.masked_fill(attention_mask == 0, int(pad))
    lengths = attention_mask.sum(-1)
    if (len(set(lengths.tolist())) > 1 and compat.prompt_positions_dropped(unwrapped)
            and _reads_last_token(unwrapped)):
        out = None
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().squeeze(-1)
            extra = {key: ([value[i] for i in rows.tolist()] if key == "adapter_names" else value)
                     for key, value in forward_kwargs.items()}
            part = model(input_ids=input_ids[rows, :length], attention_mask=attention_mask[rows, :length],
                         **extra).logits.squeeze(-1)
            if out is None:
                out = part.new_zeros(len(input_ids))
            out = out.index_put((rows,), part)
        return out
    return model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits.squeeze(-1)


def _text_ids(tokenizer, text: str) -> list[int]:
    """A whole text (prompt + completion) as training tokenizes it: with EOS appended unless it ends with one."""
    eos = tokenizer.eos_token or ""
    return tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]


class RewardModel(WithoutClasses):
    """prompt + chosen / rejected completions -> a scalar reward (Bradley-Terry loss), scored by pairwise accuracy"""

    name = "reward"
    peft_task_type = "SEQ_CLS"
    meta_type = RewardMeta
    packs = False
    pipeline_tag = "text-classification"
    auto_class = AutoModelForSequenceClassification
    classifies, generates, chat = True, False, False
    embeds = False
    base_is_reference = False  # the bare base's head is untrained: chance (0.5 pairwise accuracy) is the reference
    config_section = None  # no run-config section of its own (see tasks.base.Task)
    # class weights and eval --report refused (WithoutClasses) with this message and fix
    no_classes = ("a reward model has no classes: its head gives one score per text",
                  "use peftlab eval (pairwise_accuracy, margin)")
    warns_imbalance = False  # no classes

    def main_metric(self, meta: Meta) -> str:
        return "pairwise_accuracy"

    def check_model(self, config, model_name: str) -> None:
        kind = getattr(config, "model_type", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"{model_name} ({kind}) is an encoder-decoder model; a reward model is an encoder or a "
                              "decoder-only model with a sequence-classification head that gives one score",
                              "use e.g. an encoder (offline:minilm, bert-base-uncased, deberta-v3) or a decoder "
                              "(gpt2, SmolLM2, Llama)")
        if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise ConfigError(f"{model_name} ({kind}) has no sequence-classification head in transformers "
                              "(AutoModelForSequenceClassification), which a reward model scores with",
                              "use an encoder (BERT, RoBERTa, DeBERTa, MiniLM) or a decoder-only model (GPT-2, "
                              "Llama, SmolLM2, Qwen2)")

    # --- data -------------------------------------------------------------------------

    def _layout(self, dataset: datasets.Dataset, data: DataConfig, where: str) -> preference_data.Layout:
        shape = preference_data.layout(dataset, data, where)
        if not shape.paired:
            raise DataError(f'{where} holds unpaired rows (a completion in "{data.completion_column}" marked '
                            f'desirable or not in "{data.label_column}"): a reward model learns from pairs',
                            f'give each prompt a chosen and a rejected completion (columns "{data.chosen_column}" and '
                            f'"{data.rejected_column}", or set data.chosen_column / data.rejected_column); unpaired '
                            "rows train a preference-tuned model with KTO (task: preference)")
        return shape

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        shapes = {split: self._layout(splits[split], data, f"the {split} split") for split in ("train", "eval")}
        if len({shape.chat for shape in shapes.values()}) > 1:
            raise DataError("the train and eval splits differ: one holds chat messages, the other plain text",
                            "give both splits the same format")
        return RewardMeta(chat=shapes["train"].chat).to_dict()

    def _tokenized(self, tokenizer, prompts: list[Any], completions: list[list[Any]], max_length: int | None,
                   where: str) -> tuple[list[list[list[int]]], int]:
        """Each row's sequences (prompt + each completion, tokenized as TRL does), cut to ``max_length``; and how
        many rows were cut."""
        tokenized = [preference_data.tokenize(tokenizer, prompt, list(row)) for prompt, row in zip(prompts,
                                                                                                 completions)]
        if max_length is None:
            return [[prompt_ids + c for c in row] for prompt_ids, row in tokenized], 0
        preference_data.check_budget([len(prompt_ids) for prompt_ids, _ in tokenized], max_length, where)
        sequences, cut = [], 0
        for prompt_ids, row in tokenized:
            fitted = preference_data.fit(prompt_ids, row, max_length)
            cut += any(len(f) < len(c) for f, c in zip(fitted, row))
            sequences.append([prompt_ids + c for c in fitted])
        return sequences, cut

    def encode(self, dataset, tokenizer, data, meta, max_length, where="data"):
        self._layout(dataset, data, where)
        columns = [c for c in (data.prompt_column, data.chosen_column, data.rejected_column)
                   if c in dataset.column_names]
        split = [preference_data.prompt_and_completions(row, data) for row in dataset.select_columns(columns)]
        sequences, cut = self._tokenized(tokenizer, [prompt for prompt, _ in split],
                                         [completions for _, completions in split], max_length, where)
        if cut:
            warn(f"{cut} of {len(dataset)} pairs in {where} are longer than max_length={max_length} tokens; their "
                 "completions were cut at the end (raise data.max_length to keep more of each text)")
        return datasets.Dataset.from_dict({"input_ids": [chosen for chosen, _ in sequences],
                                           REJECTED: [rejected for _, rejected in sequences]})

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        """Encoded pairs -> one batch of the chosen sequences then the rejected ones, right-padded together (TRL's
        DataCollatorForPreference); rows without a rejected sequence (serving's) -> those rows alone."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            sequences = [list(r["input_ids"]) for r in rows]
            if rows and REJECTED in rows[0]:
                sequences += [list(r[REJECTED]) for r in rows]
            longest = max((len(s) for s in sequences), default=0)
            return {"input_ids": torch.tensor([s + [pad] * (longest - len(s)) for s in sequences], dtype=torch.long),
                    "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences],
                                                   dtype=torch.long)}

        return collate

    def packed_collator(self, tokenizer) -> None:
        return None  # a pair's two sequences are scored apart: nothing to pack

    def training_loss(self, meta: Meta):
        """The Bradley-Terry loss over a batch of chosen rows then rejected rows (the model has no loss of its own
        for pairs)."""

        def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            chosen, rejected = rewards(model, batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            return bradley_terry(chosen, rejected)

        return loss

    # --- the model card ---------------------------------------------------------------------

    def card_columns(self, data: DataConfig) -> str:
        return (f"prompt `{data.prompt_column}`, chosen completion `{data.chosen_column}`, rejected completion "
                f"`{data.rejected_column}` (preference pairs)")

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return ['prompt, completion = "Your prompt", " and a completion of it"',
                "# as in training: the prompt followed by the completion, then EOS (chat rows: the conversation "
                "rendered by tokenizer.apply_chat_template)",
                'inputs = tokenizer(prompt + completion + (tokenizer.eos_token or ""), return_tensors="pt")',
                "print(model(**inputs).logits[0, 0].item())  # the reward: higher is preferred"]

    # --- model --------------------------------------------------------------------------

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        return {"num_labels": 1}  # one score

    def load_model(self, model: ModelConfig, meta: Meta):
        return pad_with_eos(load_base(model, self.auto_class, **self.model_kwargs(meta)))

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        # a head of another width does not load on the one-score base: the adapter loader's shape check says so
        return RewardMeta().to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return RewardMeta().to_dict()

    def needs_pairs(self, data: DataConfig) -> bool:
        return False  # a whole text, or (optionally) a prompt and its completion

    def accepts_pairs(self, data: DataConfig) -> bool:
        """An input may come with a pair (a prompt and its completion; serving's ``input_pair``, ``--pair``)."""
        return True

    def labels(self, meta: Meta) -> list[str]:
        return ["score"]

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def _pair_rewards(self, model, tokenizer, encoded, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import DataLoader

        model.eval()
        device = model_device(model)
        chosen, rejected = [], []
        for batch in DataLoader(encoded, batch_size=max(1, batch_size), collate_fn=self.collator(tokenizer)):
            scores = rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            first, second = scores.chunk(2)
            chosen.append(first)
            rejected.append(second)
        return (torch.cat(chosen) if chosen else torch.zeros(0)), (torch.cat(rejected) if rejected else torch.zeros(0))

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        return pair_metrics(*self._pair_rewards(model, tokenizer, encoded, batch_size))

    # --- prediction and serving -----------------------------------------------------------

    def encode_rows(self, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None):
        """Texts (a whole prompt + completion each) or prompts (``texts``) with their completions (``pairs``) ->
        token ids as training makes them, cut at ``max_length`` (its end dropped; ``None``: not cut)."""
        if pairs is None:
            sequences = [_text_ids(tokenizer, str(text)) for text in texts]
        else:
            sequences = [ids for [ids] in self._tokenized(tokenizer, list(texts), [[p] for p in pairs], None,
                                                          "the input")[0]]
        sequences = [ids[:max_length] if max_length else ids for ids in sequences]
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in sequences]

    def logits(self, model, tokenizer, features: list[dict], **forward_kwargs) -> torch.Tensor:
        """The rows' rewards in one padded pass, as a (rows, 1) tensor on the CPU; ``forward_kwargs`` e.g. peft's
        ``adapter_names``."""
        model.eval()
        device = model_device(model)
        batch = self.collator(tokenizer)([{"input_ids": f["input_ids"]} for f in features])
        with torch.no_grad():
            return rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           **forward_kwargs).float().cpu().reshape(-1, 1)

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        """One text's (or prompt + completion's) reward; ``probabilities`` adds nothing (there are no classes)."""
        record: dict[str, Any] = {"text": text}
        if pair is not None:
            record["text_pair"] = pair
        record["score"] = float(row_logits.reshape(-1)[0])
        return record

    def _row_kind(self, row: dict[str, Any], data: DataConfig, index: int) -> str:
        has = {column for column, value in row.items() if not preference_data.is_empty(value)}
        if {data.chosen_column, data.rejected_column} <= has:  # the prompt: its column, or their shared beginning
            return "pair"
        if data.prompt_column in has and data.completion_column in has:
            return "completion"
        if data.text_column in has:
            return "text"
        raise DataError(f'input row {index} has nothing to score: it needs a chosen and a rejected completion '
                        f'("{data.chosen_column}", "{data.rejected_column}"; a prompt in "{data.prompt_column}" or '
                        f'their shared beginning), a prompt with one completion ("{data.completion_column}"), or a '
                        f'whole text ("{data.text_column}")',
                        f"its fields: {', '.join(row) or 'none'}; e.g. peftlab predict RUN --text \"PROMPT "
                        "COMPLETION\", or --text PROMPT --pair COMPLETION")

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        """One record per row: prompt + chosen + rejected -> both rewards, the margin and which one the model prefers;
        prompt + completion -> its reward; a text (with ``text_pair``: a prompt and its completion) -> its reward."""
        meta = RewardMeta.of(meta)
        pair_column = data.text_pair_column or "text_pair"
        kinds = [self._row_kind(row, data, i) for i, row in enumerate(rows)]
        # every sequence to score: (row, its prompt or text, its completions or None)
        prompts, completions, texts = [], [], []
        for row, kind in zip(rows, kinds):
            if kind == "pair":
                prompt, pair = preference_data.prompt_and_completions(
                    {k: v for k, v in row.items() if k != data.prompt_column or not preference_data.is_empty(v)}, data)
                prompts.append(prompt)
                completions.append(pair)
            elif kind == "completion":
                prompts.append(row[data.prompt_column])
                completions.append([row[data.completion_column]])
            elif not preference_data.is_empty(row.get(pair_column)):
                prompts.append(str(row[data.text_column]))
                completions.append([str(row[pair_column])])
            else:
                prompts.append(None)
                completions.append(None)
                texts.append(str(row[data.text_column]))
        with_prompt = [i for i, p in enumerate(prompts) if p is not None]
        tokenized, cut = self._tokenized(tokenizer, [prompts[i] for i in with_prompt],
                                         [completions[i] for i in with_prompt], max_length, "the input")
        sequences: list[list[list[int]]] = [[] for _ in rows]
        for i, row_sequences in zip(with_prompt, tokenized):
            sequences[i] = row_sequences
        plain = iter(texts)
        for i, p in enumerate(prompts):
            if p is None:
                ids = _text_ids(tokenizer, next(plain))
                cut += bool(max_length and len(ids) > max_length)
                sequences[i] = [ids[:max_length] if max_length else ids]
        if cut:
            warn(f"{cut} of {len(rows)} input rows are longer than max_length={max_length} tokens and were cut")
        flat = [{"input_ids": ids} for row_sequences in sequences for ids in row_sequences]
        scores: list[float] = []
        for start in range(0, len(flat), max(1, batch_size)):
            scores += self.logits(model, tokenizer, flat[start:start + batch_size]).reshape(-1).tolist()
        outputs, position = [], 0
        for row, kind, row_sequences in zip(rows, kinds, sequences):
            mine = scores[position:position + len(row_sequences)]
            position += len(row_sequences)
            if kind == "pair":
                chosen, rejected = mine
                preferred = "chosen" if chosen > rejected else "rejected" if rejected > chosen else "tie"
                outputs.append({"prompt": row.get(data.prompt_column), "chosen": row[data.chosen_column],
                                "rejected": row[data.rejected_column], "score_chosen": chosen,
                                "score_rejected": rejected, "margin": chosen - rejected, "preferred": preferred})
            elif kind == "completion":
                outputs.append({"prompt": row[data.prompt_column], "completion": row[data.completion_column],
                                "score": mine[0]})
            else:
                pair = None if preference_data.is_empty(row.get(pair_column)) else str(row[pair_column])
                outputs.append(self.record(str(row[data.text_column]), pair, torch.tensor(mine), meta))
        return outputs

    # --- reference --------------------------------------------------------------------------

    def baseline(self, splits, data, meta) -> Baseline:
        """Chance: a scorer that learned nothing ranks a pair right half the time (0.5 pairwise accuracy, what random
        scores give on average; a constant score ties every pair, 0 by the strict count); its loss is that of equal
        scores, log 2, with no margin."""
        pairs = len(splits["eval"])
        metrics = {"loss": math.log(2.0), "pairwise_accuracy": 0.5, "margin": 0.0, "rewards/chosen": 0.0,
                   "rewards/rejected": 0.0, "samples": float(pairs)}
        return Baseline("chance", f"chance: a scorer that learned nothing ranks half of the {pairs:,} eval pairs right "
                                  "(0.5 pairwise accuracy; loss log 2, that of equal scores)", metrics, classes=None)
