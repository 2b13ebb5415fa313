"""Sequence to sequence (encoder-decoder: T5, mT0, BART, BERT2BERT): source -> target text."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

from peftlab.config import DataConfig
from peftlab.errors import ConfigError
from peftlab.model import load_base
from peftlab.progress import warn
from peftlab.tasks import generation as gen
from peftlab.tasks.base import Baseline, Meta, mean_loss
from peftlab.tasks.generation import GenerationMeta


class Seq2Seq:
    """source text (or a prompt template) -> target text, evaluated by generation"""

    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    meta_type = GenerationMeta
    packs = False
    pipeline_tag = "text2text-generation"
    auto_class = AutoModelForSeq2SeqLM
    classifies, generates, chat = False, True, False
    embeds = False
    base_is_reference = True  # a comparison measures the bare base (no formula baseline for free text)
    config_section = None  # no run-config section of its own (see tasks.base.Task)

    def main_metric(self, meta: Meta) -> str:
        return gen.main_metric(meta)

    def check_model(self, config, model_name: str) -> None:
        if not getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f'task seq2seq needs an encoder-decoder model; {model_name} is a '
                              f'"{config.model_type}" model without a decoder stack of its own',
                              "use task: causal-lm for decoder-only models (GPT, Llama, BLOOM ...)")

    def inspect(self, splits, data):
        for split in ("train", "eval"):
            gen.check_prompt_columns(splits[split], data, f"the {split} split")
            targets = gen.check_targets(splits[split], data, f"the {split} split")
            if split == "train":
                meta = GenerationMeta(mode="seq2seq", **gen.target_meta(targets))
        return meta.to_dict()

    def encode(self, dataset, tokenizer, data, meta, max_length, where="data"):
        dataset = gen.labels_as_text(dataset, data)
        gen.check_prompt_columns(dataset, data, where)
        has_targets = bool(data.target_column) and data.target_column in dataset.column_names
        long_targets = 0

        def tokenize(batch):
            nonlocal long_targets
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            out = tokenizer([gen.source_text(r, data) for r in rows], max_length=max_length, truncation=True)
            if has_targets:
                labels = tokenizer(text_target=[str(t) for t in batch[data.target_column]])["input_ids"]
                eos = tokenizer.eos_token_id
                labels = [ids if not ids or ids[-1] == eos or eos is None else ids + [eos] for ids in labels]
                long_targets += sum(len(ids) > data.target_max_length for ids in labels)
                out["labels"] = [ids[:data.target_max_length - 1] + ids[-1:] if len(ids) > data.target_max_length
                                 else ids for ids in labels]
            return out

        encoded = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        if long_targets:
            warn(f"{where}: {long_targets} of {len(dataset)} targets are longer than data.target_max_length="
                 f"{data.target_max_length} tokens; truncated")
        return encoded

    def collator(self, tokenizer):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")

    def card_columns(self, data: DataConfig) -> str:
        return gen.card_columns(data)

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return gen.card_example(data, max_new_tokens)

    def training_loss(self, meta: Meta) -> None:
        return None  # the model's own loss (from its labels)

    def packed_collator(self, tokenizer) -> None:
        return None  # packing (fastpath) is for decoder-only rows

    def model_kwargs(self, meta) -> dict[str, Any]:
        return {}

    def load_model(self, model, meta):
        return load_base(model, self.auto_class)

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        references = gen.check_targets(raw, data, "the evaluation data")
        loss = mean_loss(model, encoded, self.collator(tokenizer), batch_size)
        kwargs = gen.generation_kwargs(None, data.target_max_length, tokenizer)
        predictions = gen.generate(model, tokenizer, list(encoded["input_ids"]), batch_size, kwargs,
                                   decoder_only=False)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "samples": float(len(references)),
                **gen.text_metrics(predictions, references, GenerationMeta.of(meta).label_like)}

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        sources, prompts = self.prompts(rows, tokenizer, data, max_length)
        kwargs = gen.generation_kwargs(generation, data.target_max_length, tokenizer)
        outputs = gen.generate(model, tokenizer, prompts, batch_size, kwargs, decoder_only=False)
        return [{"text": s, "generated": o} for s, o in zip(sources, outputs)]

    def prompts(self, rows, tokenizer, data, max_length: int | None) -> tuple[list[str], list[list[int]]]:
        """Rows -> source texts and their token ids (cut at ``max_length``; ``None``: not cut)."""
        sources = [gen.source_text(r, data) for r in rows]
        return sources, self.prompt_ids(sources, tokenizer, max_length)

    def prompt_ids(self, texts: list[str], tokenizer, max_length: int | None) -> list[list[int]]:
        if max_length is None:
            return tokenizer(texts)["input_ids"]
        return tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]

    def meta_from_adapter(self, tensors, base_config):
        return GenerationMeta(mode="seq2seq").to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return GenerationMeta(mode="seq2seq").to_dict()

    def baseline(self, splits, data, meta) -> Baseline | None:
        """Label-like targets: the train split's most common target answered for every eval row, scored by the
        text metrics ``evaluate`` uses (free text: None; the base model is the reference there)."""
        meta = GenerationMeta.of(meta)
        if not meta.label_like:
            return None
        train = Counter(t.strip() for t in gen.check_targets(splits["train"], data, "the train split"))
        references = gen.check_targets(splits["eval"], data, "the eval split")
        answer, count = train.most_common(1)[0]
        return Baseline("majority answer", f'always "{answer}", the train split\'s most common target: {count:,} of '
                                           f"{sum(train.values()):,} rows",
                        {"samples": float(len(references)),
                         **gen.text_metrics([answer] * len(references), references, label_like=True)},
                        classes=len(meta.targets))
