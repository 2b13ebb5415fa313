"""What the generative families share: prompts from rows, batched generation, text metrics."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from peftlab import compat
from peftlab.config import DataConfig, GenerationConfig
from peftlab.data import require_columns
from peftlab.errors import ConfigError, DataError
from peftlab.tasks.base import Meta, model_device

LABEL_LIKE_MAX_DISTINCT = 32
LABEL_LIKE_MAX_WORDS = 4


# --- meta ------------------------------------------------------------------------------

@dataclass
class GenerationMeta:
    """What a generative family learns from its data (``peftlab.json`` "meta" holds ``to_dict()``)."""

    # "seq2seq"; causal LM: "completion" | "chat" | "text"; None: a plain-peft causal-LM adapter (the data
    # options decide at evaluation / prediction)
    mode: str | None = None
    label_like: bool = False  # targets are a small set of short strings: scored by exact match (accuracy)
    targets: list[str] = field(default_factory=list)  # those strings (label-like targets only)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "label_like": self.label_like, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GenerationMeta:
        return cls(mode=raw.get("mode"), label_like=bool(raw.get("label_like", False)),
                   targets=list(raw.get("targets") or []))

    @classmethod
    def of(cls, meta: Meta) -> GenerationMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)


# --- prompts ---------------------------------------------------------------------------

def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def check_prompt_columns(dataset, data: DataConfig, where: str) -> None:
    """The input columns (text column or the template's fields) exist; the template uses the text column."""
    if data.prompt_template:
        fields = template_fields(data.prompt_template)
        if data.text_column not in fields:
            raise ConfigError(
                f'prompt_template does not mention the text column "{data.text_column}": {data.prompt_template!r}',
                f'put "{{{data.text_column}}}" where the text goes, or set data.text_column',
            )
        require_columns(dataset, {f"prompt_template field {f!r}": f for f in fields}, where)
    else:
        require_columns(dataset, {"text_column": data.text_column}, where)


def source_text(row: dict[str, Any], data: DataConfig) -> str:
    try:
        if data.prompt_template:
            return data.prompt_template.format(**{k: "" if v is None else v for k, v in row.items()})
        return str(row[data.text_column])
    except KeyError as error:
        raise DataError(f"the input has no field {error} (needed by the prompt)",
                        f"give every field the prompt uses: {data.prompt_template or data.text_column}") from None


def labels_as_text(dataset, data: DataConfig):
    """Class-label columns (ints with names) become their names, so they can be generated."""
    for column in {data.target_column, data.text_column} - {None}:
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.ClassLabel):
            names = feature.names
            dataset = dataset.map(lambda b, c=column: {c: [names[i] for i in b[c]]}, batched=True,
                                  features=datasets.Features({**dataset.features, column: datasets.Value("string")}))
    return dataset


def check_targets(dataset, data: DataConfig, where: str) -> list[str]:
    """The target column exists and has no empty values; returns the targets as text."""
    if not data.target_column:
        raise ConfigError("this task needs data.target_column (the output text)")
    require_columns(dataset, {"target_column": data.target_column}, where)
    targets = ["" if v is None else str(v) for v in labels_as_text(dataset, data)[data.target_column]]
    empty = [i for i, t in enumerate(targets) if not t.strip()]
    if empty:
        raise DataError(f'{where} has {len(empty)} empty value(s) in the target column "{data.target_column}" '
                        f"(rows {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''})",
                        "fill or drop those rows")
    return targets


def target_meta(targets: list[str]) -> dict[str, Any]:
    """Targets from a small set of short strings are labels: scored by exact match (accuracy)."""
    distinct = sorted(set(t.strip() for t in targets))
    label_like = len(distinct) <= LABEL_LIKE_MAX_DISTINCT and all(
        len(t.split()) <= LABEL_LIKE_MAX_WORDS for t in distinct)
    return {"label_like": label_like, "targets": distinct if label_like else []}


def main_metric(meta: Meta) -> str:
    meta = GenerationMeta.of(meta)
    if meta.mode == "text":
        return "perplexity"
    return "accuracy" if meta.label_like else "rougeL"


# --- generation ------------------------------------------------------------------------

def generation_kwargs(options: GenerationConfig | None, default_new_tokens: int,
                      tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """transformers generate() arguments; None = greedy evaluation decoding."""
    kwargs: dict[str, Any] = {"max_new_tokens": default_new_tokens, "do_sample": False, "num_beams": 1}
    if options is not None:
        kwargs.update(max_new_tokens=options.max_new_tokens or default_new_tokens, do_sample=options.do_sample,
                      num_beams=options.num_beams)
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p)
        if options.stop:
            kwargs["stop"] = list(options.stop)
    return kwargs


class _StopOnText(StoppingCriteria):
    """Stops a row once its generated text contains a stop string (any tokenizer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_tokens(model, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], batch_size: int,
                    kwargs: dict[str, Any], decoder_only: bool, adapter_names: list[str] | None = None,
                    limits: list[int] | None = None, streamer=None) -> list[list[int]]:
    """The new token ids per prompt, generated in batches, up to and including the first EOS.

    ``adapter_names``: one per prompt, for a batch that mixes LoRA adapters (peft's ``adapter_names``;
    ``"__base__"`` is the bare base). ``limits``: at most this many new tokens for each row (the batch
    generates the largest; greedy rows equal a generation of their own length). ``streamer``: a
    transformers streamer (one prompt per batch).
    """
    kwargs = dict(kwargs)
    stop = kwargs.pop("stop", None)
    compat.fix_prompt_generation(model)  # applied at build / load already; a model made elsewhere gets it here
    model.eval()
    device = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if decoder_only else "right"
    eos = tokenizer.eos_token_id
    outputs: list[list[int] | None] = [None] * len(prompts)
    try:
        for rows in _batches(prompts, batch_size, equal_lengths=decoder_only and compat.prompt_positions_dropped(model)):
            batch = tokenizer.pad({"input_ids": [prompts[i] for i in rows]}, return_tensors="pt").to(device)
            extra: dict[str, Any] = {}
            if stop:
                prompt_length = batch["input_ids"].shape[1] if decoder_only else 0
                extra["stopping_criteria"] = StoppingCriteriaList([_StopOnText(tokenizer, stop, prompt_length)])
            if adapter_names is not None:
                extra["adapter_names"] = [adapter_names[i] for i in rows]
            if limits is not None:
                extra["max_new_tokens"] = max(limits[i] for i in rows)
            if streamer is not None:
                extra["streamer"] = streamer
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       pad_token_id=tokenizer.pad_token_id, **{**kwargs, **extra})
            generated = generated[:, batch["input_ids"].shape[1]:] if decoder_only else generated[:, 1:]
            for i, row in zip(rows, generated.tolist()):
                if limits is not None:
                    row = row[:limits[i]]
                if eos is not None and eos in row:
                    row = row[:row.index(eos) + 1]
                outputs[i] = row
    finally:
        tokenizer.padding_side = side
    return outputs


def _batches(prompts: list[list[int]], batch_size: int, equal_lengths: bool) -> list[list[int]]:
    """Row indices per generation batch, in order; with ``equal_lengths`` only prompts of one length share a batch.

    peft drops the position ids of prompt tuning / P-tuning models, so a left-padded decoder-only row
    would be generated at shifted positions, and its output would depend on which other prompts
    share its batch; rows of one length need no padding (each result is the row's own).
    """
    if not equal_lengths:
        return [list(range(start, min(start + batch_size, len(prompts))))
                for start in range(0, len(prompts), batch_size)]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    return [rows[start:start + batch_size] for rows in by_length.values() for start in range(0, len(rows), batch_size)]


def finish_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[str] | None) -> str:
    """Generated token ids -> the text a user sees: special tokens dropped, cut at a stop string, stripped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for marker in stop or []:
        text = text.split(marker)[0]
    return text.strip()


def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], batch_size: int,
             kwargs: dict[str, Any], decoder_only: bool) -> list[str]:
    """Generate for token-id prompts in batches; returns only the new text (cut at a stop string), stripped."""
    tokens = generate_tokens(model, tokenizer, prompts, batch_size, kwargs, decoder_only)
    return [finish_text(tokenizer, ids, kwargs.get("stop")) for ids in tokens]


# --- metrics ---------------------------------------------------------------------------

def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def text_metrics(predictions: list[str], references: list[str], label_like: bool) -> dict[str, float]:
    """Exact match (as ``accuracy`` for label targets); BLEU, chrF (sacrebleu) and ROUGE-L for free text."""
    matches = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
    exact = matches / max(1, len(references))
    if label_like:
        return {"accuracy": exact}
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return {
        "exact_match": exact,
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
        "rougeL": 100.0 * rouge / max(1, len(references)),
    }


# --- the model card's lines (tasks.base.Task.card_columns / card_example) -------------------------------------------

def card_columns(data: DataConfig) -> str:
    """What the card says a generative run's rows hold."""
    if data.messages_column:
        return f"chat messages in `{data.messages_column}` (the last one is the target)"
    inputs = f"prompt template `{data.prompt_template}`" if data.prompt_template else f"input `{data.text_column}`"
    return inputs + (f", target `{data.target_column}`" if data.target_column else " (plain text, no target)")


def card_example(data: DataConfig | None, max_new_tokens: int) -> list[str]:
    """Python lines that generate from an example prompt built as the run builds one."""
    if data and data.messages_column:
        prompt = ['messages = [{"role": "user", "content": "Your text here"}]',
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, '
                  'return_tensors="pt")']
    else:
        fields = list(dict.fromkeys(template_fields(data.prompt_template))) if data and data.prompt_template else []
        values = ", ".join(f'{f}="Your text here"' if f == data.text_column else f'{f}="..."' for f in fields)
        text = f"{data.prompt_template!r}.format({values})" if fields else '"Your text here"'
        prompt = [f'inputs = tokenizer([{text}], return_tensors="pt")']
    return [*prompt, f"output = model.generate(**inputs, max_new_tokens={max_new_tokens})",
            "print(tokenizer.batch_decode(output, skip_special_tokens=True))"]
