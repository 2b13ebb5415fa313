"""Causal language modelling (decoder-only: GPT-2, BLOOM, Llama, Mistral, SmolLM).

Three data modes, chosen by the data config:

- ``completion``: prompt (text column or template) -> completion (``target_column``); the
  loss is on the completion unless ``loss_on: all``; evaluated by generation.
- ``chat``: a ``messages_column`` of ``[{role, content}, ...]``; the tokenizer's chat template
  renders all but the last message as the prompt, the last is the completion.
- ``text``: plain text (text column only), packed into blocks of ``max_length``;
  evaluated by perplexity.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import datasets
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from peftlab.config import DataConfig
from peftlab.data import require_columns
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base
from peftlab.progress import warn
from peftlab.tasks import generation as gen
from peftlab.tasks.base import Baseline, Meta, mean_loss
from peftlab.tasks.generation import GenerationMeta


def _mode(data) -> str:
    if data.messages_column:
        return "chat"
    return "completion" if data.target_column else "text"


def _with_mode(meta: Meta, data) -> GenerationMeta:
    """``meta`` with its data mode; an adapter made by plain peft has none (``None``): the data options decide."""
    meta = GenerationMeta.of(meta)
    return meta if meta.mode else replace(meta, mode=_mode(data))


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


class CausalLM:
    """prompt -> completion, chat messages, or plain text, on decoder-only models"""

    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    meta_type = GenerationMeta
    packs = True  # plain text, completion and chat rows alike (fastpath.packing decides per run)
    pipeline_tag = "text-generation"
    auto_class = AutoModelForCausalLM
    classifies, generates, chat = False, True, True
    embeds = False
    base_is_reference = True  # a comparison measures the bare base (no formula baseline for free text)
    config_section = None  # no run-config section of its own (see tasks.base.Task)

    def main_metric(self, meta: Meta) -> str:
        return gen.main_metric(meta)

    def check_model(self, config, model_name: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"task causal-lm needs a decoder-only model; {model_name} is an encoder-decoder "
                              f'("{config.model_type}")', "use task: seq2seq for encoder-decoder models")

    # --- data ---------------------------------------------------------------------------

    def inspect(self, splits, data):
        mode = _mode(data)
        meta = GenerationMeta(mode=mode)
        for split in ("train", "eval"):
            where = f"the {split} split"
            if mode == "chat":
                require_columns(splits[split], {"messages_column": data.messages_column}, where)
                targets = [self._split_chat(m, where)[1] for m in splits[split][data.messages_column]]
            elif mode == "completion":
                gen.check_prompt_columns(splits[split], data, where)
                targets = gen.check_targets(splits[split], data, where)
            else:
                require_columns(splits[split], {"text_column": data.text_column}, where)
                continue
            if split == "train":
                meta = GenerationMeta(mode=mode, **gen.target_meta(targets))
        return meta.to_dict()

    @staticmethod
    def _split_chat(messages, where: str) -> tuple[list[dict], str]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{where} has a messages value that is not a list of {{role, content}}: "
                            f"{str(messages)[:80]}")
        if not str(messages[-1]["content"]).strip():
            raise DataError(f"{where} has a conversation whose last message (the target) is empty")
        return messages[:-1], str(messages[-1]["content"])

    def _prompt(self, row: dict[str, Any], data, tokenizer) -> str:
        if _mode(data) == "chat":
            history = row[data.messages_column] if data.messages_column in row else [
                {"role": "user", "content": row[data.text_column]}]
            if history and history[-1].get("role") == "assistant":
                history = history[:-1]
            return self.chat_text(history, tokenizer)
        return gen.source_text(row, data)

    @staticmethod
    def chat_text(history: list[dict], tokenizer) -> str:
        """A conversation rendered by the tokenizer's chat template, ending with the assistant's turn."""
        if not tokenizer.chat_template:
            raise ConfigError("chat messages need a tokenizer with a chat template",
                              "use a chat model, or a completion column with data.prompt_template")
        return tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)

    def _prompt_ids(self, prompts: list[str], tokenizer, budget: int | None) -> list[list[int]]:
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        out = []
        for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]:
            out.append(bos + (ids if budget is None else ids[-max(1, budget - len(bos)):]))  # keep a long prompt's end
        return out

    def prompts(self, rows, tokenizer, data, max_length: int | None) -> tuple[list[str], list[list[int]]]:
        """Rows -> prompt texts and their token ids (longer ones keep their end; ``None``: not cut)."""
        texts = [self._prompt(r, data, tokenizer) for r in rows]
        return texts, self._prompt_ids(texts, tokenizer, max_length)

    def prompt_ids(self, texts: list[str], tokenizer, max_length: int | None) -> list[list[int]]:
        """Already rendered prompt texts (e.g. a chat) -> token ids, as for rows."""
        return self._prompt_ids(texts, tokenizer, max_length)

    def encode(self, dataset, tokenizer, data, meta, max_length, where="data"):
        meta = _with_mode(meta, data)
        dataset = gen.labels_as_text(dataset, data)
        if meta.mode == "text":
            return self._encode_text(dataset, tokenizer, data, max_length, where)
        rows = list(dataset)
        prompts = [self._prompt(r, data, tokenizer) for r in rows]
        if meta.mode == "chat":
            targets = [self._split_chat(r[data.messages_column], where)[1] for r in rows]
        else:
            require_columns(dataset, {"target_column": data.target_column}, where)
            targets = [str(r[data.target_column]) for r in rows]
        completions = tokenizer([" " + t if meta.mode == "completion" and not p.endswith((" ", "\n")) else t
                                 for p, t in zip(prompts, targets)], add_special_tokens=False)["input_ids"]
        long_targets = sum(len(c) > data.target_max_length for c in completions)
        if long_targets:
            warn(f"{where}: {long_targets} of {len(rows)} completions are longer than data.target_max_length="
                 f"{data.target_max_length} tokens; truncated")
        features = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt_ids, completion in zip(self._prompt_ids(prompts, tokenizer, max_length), completions):
            completion = completion[:data.target_max_length] + [tokenizer.eos_token_id]
            prompt_ids = prompt_ids[:max(1, max_length - len(completion))]
            ids = prompt_ids + completion
            masked = [-100] * len(prompt_ids) if data.loss_on == "completion" else list(prompt_ids)
            features["input_ids"].append(ids)
            features["attention_mask"].append([1] * len(ids))
            features["labels"].append(masked + completion)
        return datasets.Dataset.from_dict(features)

    def _encode_text(self, dataset, tokenizer, data, max_length, where):
        """Plain text: documents joined with EOS and cut into blocks of max_length."""
        require_columns(dataset, {"text_column": data.text_column}, where)
        stream: list[int] = []
        for ids in tokenizer([str(t) for t in dataset[data.text_column]], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [tokenizer.eos_token_id])
        blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
        if len(blocks) > 1 and len(blocks[-1]) < max_length:
            blocks.pop()  # a short tail block would be mostly padding
        if not blocks:
            raise DataError(f"{where} has no text")
        return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks],
                                           "labels": blocks})

    def collator(self, tokenizer):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")

    def card_columns(self, data: DataConfig) -> str:
        return gen.card_columns(data)

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return gen.card_example(data, max_new_tokens)

    def training_loss(self, meta: Meta) -> None:
        return None  # the model's own loss (from its labels)

    def packed_collator(self, tokenizer) -> _PackedCollator:
        """A batch's rows as one row without padding; position ids restart per row (fastpath.packing)."""
        return _PackedCollator()

    # --- model, evaluation, prediction ---------------------------------------------------

    def model_kwargs(self, meta) -> dict[str, Any]:
        return {}

    def load_model(self, model, meta):
        base = load_base(model, self.auto_class)
        if base.config.pad_token_id is None and base.config.eos_token_id is not None:
            eos = base.config.eos_token_id
            base.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        return base

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = _with_mode(meta, data)
        loss = mean_loss(model, encoded, self.collator(tokenizer), batch_size)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "samples": float(len(raw))}
        if meta.mode == "text":
            return metrics
        rows = list(gen.labels_as_text(raw, data))
        if meta.mode == "chat":
            references = [self._split_chat(r[data.messages_column], "the evaluation data")[1] for r in rows]
        else:
            references = gen.check_targets(raw, data, "the evaluation data")
        prompts = self._prompt_ids([self._prompt(r, data, tokenizer) for r in rows], tokenizer, max_length)
        kwargs = gen.generation_kwargs(None, data.target_max_length, tokenizer)
        predictions = gen.generate(model, tokenizer, prompts, batch_size, kwargs, decoder_only=True)
        return {**metrics, **gen.text_metrics(predictions, references, meta.label_like)}

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        texts, ids = self.prompts(rows, tokenizer, data, max_length)
        kwargs = gen.generation_kwargs(generation, data.target_max_length, tokenizer)
        outputs = gen.generate(model, tokenizer, ids, batch_size, kwargs, decoder_only=True)
        return [{"text": t, "generated": o} for t, o in zip(texts, outputs)]

    def meta_from_adapter(self, tensors, base_config):
        # no mode: eval / predict take it from the data options (--set data.target_column=... / prompt_template /
        # messages_column: completion or chat, scored by generation; none of them: plain text, perplexity), as
        # seq2seq takes its columns from them
        return GenerationMeta(mode=None).to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return GenerationMeta(mode="text").to_dict()

    def baseline(self, splits, data, meta) -> Baseline | None:
        """Label-like completions (or chat answers): the train split's most common one answered for every eval row,
        scored by the text metrics ``evaluate`` uses (free text, plain text: None; the base model is the reference
        there)."""
        meta = _with_mode(meta, data)
        if meta.mode == "text" or not meta.label_like:
            return None

        def targets(split: str) -> list[str]:
            if meta.mode == "chat":
                return [self._split_chat(m, f"the {split} split")[1] for m in splits[split][data.messages_column]]
            return gen.check_targets(splits[split], data, f"the {split} split")

        train, references = Counter(t.strip() for t in targets("train")), targets("eval")
        answer, count = train.most_common(1)[0]
        return Baseline("majority answer", f'always "{answer}", the train split\'s most common answer: {count:,} of '
                                           f"{sum(train.values()):,} rows",
                        {"samples": float(len(references)),
                         **gen.text_metrics([answer] * len(references), references, label_like=True)},
                        classes=len(meta.targets))


class _PackedCollator:
    """transformers' DataCollatorWithFlattening over the encoded columns it needs."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, rows):
        batch = self._flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        batch["use_cache"] = False  # transformers keeps packed rows apart only without a KV cache
        return batch
