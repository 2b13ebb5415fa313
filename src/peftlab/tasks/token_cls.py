"""Token classification: a tag for every word (named entities in BIO / IOB2 or IOBES, part-of-speech, chunks).

Rows hold words and their tags (``data.tokens_column`` / ``data.tags_column``: JSON Lines lists, a Hub dataset's
sequence columns, or CoNLL files read by :mod:`peftlab.conll`). The words are joined by spaces into one text and
tokenized with character offsets; every sub-word token is mapped back to its word by those offsets, so any fast
tokenizer works the same way in training and on raw text at prediction time (no ``add_prefix_space`` tricks). In
training a word's first sub-word carries its tag and the rest are ignored (``data.label_subwords: all`` tags
them all, a ``B-`` continuing as ``I-``); evaluation and prediction always read a word's first sub-word.

Metrics: with entity tags, entity-level precision / recall / F1 as seqeval computes them (the conlleval
definition: an entity counts when its type and both ends are right), plus word accuracy; with plain tags
(POS), word accuracy and macro F1 over the tags.
"""

from __future__ import annotations

import bisect
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from sklearn import metrics as skm
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, PreTrainedTokenizerBase

from peftlab.config import DataConfig, ModelConfig
from peftlab.data import require_columns
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base, pad_with_eos
from peftlab.progress import warn
from peftlab.tasks.base import Baseline, Meta, model_device

IGNORE = -100
_HEAD_NAMES = ("classifier", "score")
_FEATURE_KEYS = ("offset_mapping", "word_index")  # encode_rows' bookkeeping: not model inputs


def tag_scheme(labels: list[str]) -> str | None:
    """``IOB2`` when every tag is O or B-/I- + a type, ``IOBES`` when E-/S- appear too; None: plain tags (POS)."""
    prefixes = {label.split("-", 1)[0] for label in labels if label != "O" and "-" in label}
    plain = [label for label in labels if label != "O" and ("-" not in label or len(label) < 3)]
    if plain or not prefixes:
        return None
    if prefixes <= {"B", "I"}:
        return "IOB2"
    if prefixes <= {"B", "I", "E", "S"}:
        return "IOBES"
    return None


@dataclass
class TaggingMeta:
    """What a tagger learns from its data (``peftlab.json`` "meta" holds ``to_dict()``)."""

    labels: list[str] = field(default_factory=list)  # the tags in head order
    label_kind: str = "name"  # the data's tags are "name"s or "index"es into labels
    scheme: str | None = None  # IOB2 / IOBES (entities) or None (plain tags)
    label_subwords: str = "first"

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "label_kind": self.label_kind, "scheme": self.scheme,
                "label_subwords": self.label_subwords}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TaggingMeta:
        labels = list(raw.get("labels", []))
        return cls(labels=labels, label_kind=raw.get("label_kind", "name"),
                   scheme=raw.get("scheme", tag_scheme(labels)), label_subwords=raw.get("label_subwords", "first"))

    @classmethod
    def of(cls, meta: Mapping[str, Any] | TaggingMeta) -> TaggingMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)

    def tag_id(self, value: Any) -> int | None:
        if self.label_kind == "index":
            return int(value) if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(self.labels) else None
        try:
            return self.labels.index(str(value))
        except ValueError:
            return None


def _continuation(tag: str) -> str:
    """The tag of a word's later sub-words under ``label_subwords: all``: B-X -> I-X (S-X -> E-X stays as is)."""
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def word_spans(words: list[str]) -> tuple[str, list[int], list[int]]:
    """The words joined by single spaces, with each word's start and end character."""
    starts, ends, position = [], [], 0
    for word in words:
        starts.append(position)
        ends.append(position + len(word))
        position += len(word) + 1
    return " ".join(words), starts, ends


def token_words(offsets: list[tuple[int, int]], starts: list[int], ends: list[int]) -> list[int | None]:
    """The word of every token (None: a special token or one that covers no character of a word)."""
    found: list[int | None] = []
    for begin, end in offsets:
        if end <= begin:
            found.append(None)
            continue
        index = bisect.bisect_right(starts, begin) - 1
        found.append(index if index >= 0 and begin < ends[index] else None)
    return found


class TokenClassification:
    """words -> one tag each (entities in IOB2 / IOBES, POS), scored by entity F1 (seqeval) and accuracy"""

    name = "token-cls"
    peft_task_type = "TOKEN_CLS"
    meta_type = TaggingMeta
    packs = False
    pipeline_tag = "token-classification"
    auto_class = AutoModelForTokenClassification
    classifies = True  # serving: /v1/classify answers with the tagged words and entities
    generates = False
    chat = False
    embeds = False
    base_is_reference = False  # the bare base's head is untrained: the majority tag is the reference
    config_section = None  # no run-config section of its own (see tasks.base.Task)
    warns_imbalance = False  # "O" dominates every NER corpus; entity F1, the main metric, does not count it

    def main_metric(self, meta: Meta) -> str:
        return "f1" if TaggingMeta.of(meta).scheme else "accuracy"

    def check_model(self, config, model_name: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"{model_name} is an encoder-decoder model; token classification needs an encoder "
                              "(or a decoder-only model) with a token classification head",
                              "use e.g. bert-base-cased, roberta-base, deberta-v3-base")

    # --- data -------------------------------------------------------------------------

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        columns = {"tokens_column": data.tokens_column, "tags_column": data.tags_column}
        for name in ("train", "eval"):
            require_columns(splits[name], columns, f"the {name} split")
        values = [tag for split in ("train", "eval") for row in splits[split][data.tags_column] for tag in row]
        feature = splits["train"].features.get(data.tags_column)
        inner = getattr(feature, "feature", None)
        names = getattr(inner, "names", None)  # a Hub dataset's Sequence(ClassLabel)
        indices = bool(values) and all(isinstance(v, (int, np.integer)) for v in values)
        if data.labels:
            labels, kind = list(data.labels), "index" if indices else "name"
        elif indices and names:
            labels, kind = list(names), "index"
        elif indices:
            raise DataError(f'the tags in "{data.tags_column}" are numbers and the data names no tags',
                            "set data.labels to the tag names in index order (e.g. [O, B-PER, I-PER, ...])")
        else:
            counts = Counter(str(v) for v in values)
            labels, kind = sorted(counts, key=lambda t: (t != "O", t.split("-", 1)[-1], t)), "name"
        meta = TaggingMeta(labels=labels, label_kind=kind, scheme=tag_scheme(labels),
                           label_subwords=data.label_subwords)
        for name in ("train", "eval"):
            self._check_rows(splits[name], data, meta, f"the {name} split")
        return meta.to_dict()

    def _check_rows(self, rows: datasets.Dataset, data: DataConfig, meta: TaggingMeta, where: str) -> None:
        for index, (words, tags) in enumerate(zip(rows[data.tokens_column], rows[data.tags_column])):
            if not isinstance(words, list) or not isinstance(tags, list):
                raise DataError(f'{where} row {index}: "{data.tokens_column}" and "{data.tags_column}" must be lists '
                                f"(one word, one tag), got {type(words).__name__} / {type(tags).__name__}",
                                "JSON Lines rows like {\"tokens\": [\"EU\", \"rejects\"], \"tags\": [\"B-ORG\", \"O\"]}"
                                ", or CoNLL files")
            if len(words) != len(tags):
                raise DataError(f"{where} row {index} has {len(words)} words but {len(tags)} tags",
                                "give exactly one tag per word")
            if any(not str(word).strip() for word in words):
                raise DataError(f"{where} row {index} has an empty word", "drop empty words (and their tags)")
            outside = [tag for tag in tags if meta.tag_id(tag) is None]
            if outside:
                raise DataError(f"{where} row {index} has tags outside the tag set [{', '.join(meta.labels)}]: "
                                f"{', '.join(map(repr, sorted(set(map(str, outside)))[:3]))}",
                                "use the tags the model was trained on, or set data.labels to the full tag set")

    def _encode_words(self, tokenizer, rows_words: list[list[str]], max_length: int | None):
        """Joined texts -> token ids, offsets and each token's word."""
        texts, spans = [], []
        for words in rows_words:
            text, starts, ends = word_spans([str(w) for w in words])
            texts.append(text)
            spans.append((starts, ends))
        if not getattr(tokenizer, "is_fast", True):
            raise ConfigError("token classification needs a fast tokenizer (character offsets)",
                              "load the model's fast tokenizer (the tokenizers library)")
        encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length,
                            return_offsets_mapping=True)
        words_of = [token_words(offsets, *span) for offsets, span in zip(encoded["offset_mapping"], spans)]
        return encoded, words_of

    def _labels(self, words_of: list[int | None], tags: list[Any], meta: TaggingMeta, subwords: str) -> list[int]:
        labels, previous = [], None
        for word in words_of:
            if word is None:
                labels.append(IGNORE)
            elif word != previous:
                labels.append(meta.tag_id(tags[word]))
            elif subwords == "all":
                tag = meta.labels[meta.tag_id(tags[word])]
                labels.append(meta.labels.index(_continuation(tag)) if _continuation(tag) in meta.labels
                              else meta.tag_id(tags[word]))
            else:
                labels.append(IGNORE)
            previous = word if word is not None else previous
        return labels

    def encode(self, dataset, tokenizer, data, meta, max_length, where):
        meta = TaggingMeta.of(meta)
        require_columns(dataset, {"tokens_column": data.tokens_column}, where)
        has_tags = data.tags_column in dataset.column_names
        if has_tags:
            self._check_rows(dataset, data, meta, where)
        cut = 0
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        extra = None
        for start in range(0, len(dataset), 1000):
            chunk = dataset[start:start + 1000]
            encoded, words_of = self._encode_words(tokenizer, chunk[data.tokens_column], max_length)
            if "token_type_ids" in encoded:
                extra = extra or []
                extra.extend(encoded["token_type_ids"])
            for i, words in enumerate(chunk[data.tokens_column]):
                seen = {w for w in words_of[i] if w is not None}
                cut += len(seen) < len(words)
                rows["input_ids"].append(encoded["input_ids"][i])
                rows["attention_mask"].append(encoded["attention_mask"][i])
                tags = chunk[data.tags_column][i] if has_tags else [meta.labels[0]] * len(words)
                rows["labels"].append(self._labels(words_of[i], tags, meta, meta.label_subwords))
        if extra is not None:
            rows["token_type_ids"] = extra
        if cut:
            warn(f"{cut} of {len(dataset)} rows in {where} are longer than max_length={max_length} tokens and were "
                 "cut: their last words get no tag in training and count as \"O\" / the first tag in evaluation "
                 "(raise data.max_length)")
        return datasets.Dataset.from_dict(rows)

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")

    def card_columns(self, data: DataConfig) -> str:
        return f"words `{data.tokens_column}`, one tag per word `{data.tags_column}`"

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return ['inputs = tokenizer(["Your text here"], return_tensors="pt")',
                "tags = model(**inputs).logits.argmax(-1)[0]  # one per token; a word's tag: its first token's",
                "print([model.config.id2label[int(t)] for t in tags])"]

    def training_loss(self, meta: Meta) -> None:
        return None  # the model's own loss (from its labels)

    def packed_collator(self, tokenizer) -> None:
        return None

    # --- model --------------------------------------------------------------------------

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        labels = TaggingMeta.of(meta).labels
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def load_model(self, model: ModelConfig, meta: Meta):
        return pad_with_eos(load_base(model, self.auto_class, **self.model_kwargs(meta)))

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        outs = [shape[0] for key, shape in tensors.items()
                if any(f".{h}." in f".{key}" for h in _HEAD_NAMES) and key.endswith("weight") and len(shape) == 2]
        if not outs:
            raise DataError("the adapter holds no token classification head (classifier/score in modules_to_save)",
                            "a token-cls adapter must save its head, or its tags are random")
        count = min(outs)
        id2label = getattr(base_config, "id2label", None) or {}
        labels = ([id2label.get(i, f"LABEL_{i}") for i in range(count)] if len(id2label) == count
                  else [f"LABEL_{i}" for i in range(count)])
        return TaggingMeta(labels=labels, label_kind="index", scheme=tag_scheme(labels)).to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return TaggingMeta(labels=["LABEL_0", "LABEL_1"], label_kind="index").to_dict()

    def needs_pairs(self, data: DataConfig) -> bool:
        return False

    def accepts_pairs(self, data: DataConfig) -> bool:
        return False

    def labels(self, meta: Meta) -> list[str]:
        return list(TaggingMeta.of(meta).labels)

    # --- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def _word_logits(self, model, tokenizer, rows_words: list[list[str]], max_length: int | None,
                     batch_size: int, tags: list[list[Any]] | None = None, meta: TaggingMeta | None = None):
        """Each row's logits per word (its first sub-word; a word cut off by max_length: None), and the mean loss
        over the words' first sub-words when ``tags`` are given."""
        model.eval()
        device = model_device(model)
        collate = self.collator(tokenizer)
        per_row, loss_sum, loss_count = [], 0.0, 0
        for start in range(0, len(rows_words), batch_size):
            chunk = rows_words[start:start + batch_size]
            encoded, words_of = self._encode_words(tokenizer, chunk, max_length)
            features = []
            for i in range(len(chunk)):
                feature = {k: encoded[k][i] for k in encoded if k != "offset_mapping"}
                if tags is not None:
                    feature["labels"] = self._labels(words_of[i], tags[start + i], meta, "first")
                features.append(feature)
            batch = {k: v.to(device) for k, v in collate(features).items()}
            out = model(**batch)
            logits = out.logits.float().cpu()
            if tags is not None:
                count = int((batch["labels"] != IGNORE).sum())
                loss_sum += out.loss.float().item() * count
                loss_count += count
            for i, words in enumerate(chunk):
                row: list[torch.Tensor | None] = [None] * len(words)
                for position, word in enumerate(words_of[i]):
                    if word is not None and row[word] is None:
                        row[word] = logits[i, position]
                per_row.append(row)
        return per_row, (loss_sum / loss_count if loss_count else None)

    def _outcomes(self, model, tokenizer, raw, data, meta: TaggingMeta, max_length, batch_size):
        require_columns(raw, {"tokens_column": data.tokens_column, "tags_column": data.tags_column},
                        "the evaluation data")
        self._check_rows(raw, data, meta, "the evaluation data")
        words, tags = raw[data.tokens_column], raw[data.tags_column]
        per_row, loss = self._word_logits(model, tokenizer, words, max_length, batch_size, tags, meta)
        gold = [[meta.tag_id(t) for t in row] for row in tags]
        fallback = meta.labels.index("O") if "O" in meta.labels else 0
        pred = [[int(w.argmax()) if w is not None else fallback for w in row] for row in per_row]
        return gold, pred, loss

    def _metrics(self, gold: list[list[int]], pred: list[list[int]], loss: float | None,
                 meta: TaggingMeta) -> dict[str, float]:
        flat_gold = np.array([t for row in gold for t in row])
        flat_pred = np.array([t for row in pred for t in row])
        result: dict[str, float] = {"loss": loss if loss is not None else float("nan"), "samples": float(len(gold))}
        result["accuracy"] = float((flat_gold == flat_pred).mean()) if len(flat_gold) else 0.0
        if meta.scheme:
            from seqeval import metrics as seq

            names_gold = [[meta.labels[t] for t in row] for row in gold]
            names_pred = [[meta.labels[t] for t in row] for row in pred]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # seqeval: "... seems not to be NE tag" for odd predictions
                result["precision"] = float(seq.precision_score(names_gold, names_pred, zero_division=0))
                result["recall"] = float(seq.recall_score(names_gold, names_pred, zero_division=0))
                result["f1"] = float(seq.f1_score(names_gold, names_pred, zero_division=0))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result["f1_macro"] = float(skm.f1_score(flat_gold, flat_pred, average="macro", zero_division=0))
        return result

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = TaggingMeta.of(meta)
        gold, pred, loss = self._outcomes(model, tokenizer, raw, data, meta, max_length, batch_size)
        return self._metrics(gold, pred, loss, meta)

    # --- by class: class weights, peftlab eval --report ----------------------------------

    def label_counts(self, raw: datasets.Dataset, data: DataConfig, meta: Meta) -> dict[str, int]:
        """Words per tag (every tag, in head order)."""
        meta = TaggingMeta.of(meta)
        counts = Counter(meta.tag_id(tag) for row in raw[data.tags_column] for tag in row)
        return {label: counts.get(i, 0) for i, label in enumerate(meta.labels)}

    def loss_function(self, weights: list[float]):
        """Cross-entropy over the tagged sub-words, each weighted by its tag (torch's weighted mean)."""
        weight = torch.tensor(weights, dtype=torch.float32)

        def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                                                     weight=weight.to(logits.device), ignore_index=IGNORE)

        return loss

    def label_outcomes(self, model, tokenizer, raw, encoded, data, meta, batch_size):
        """``evaluate``'s metrics with the gold and predicted tag of every word (flat numpy arrays)."""
        meta = TaggingMeta.of(meta)
        # the rows as evaluate() cut them: no encoded row is longer than the run's max_length
        max_length = max((len(ids) for ids in encoded["input_ids"]), default=None) if len(encoded) else None
        gold, pred, loss = self._outcomes(model, tokenizer, raw, data, meta, max_length, batch_size)
        return (self._metrics(gold, pred, loss, meta), np.array([t for row in gold for t in row]),
                np.array([t for row in pred for t in row]))

    # --- prediction and serving -----------------------------------------------------------

    def encode_rows(self, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None):
        """Raw texts -> token ids with each token's character offsets and word (the tokenizer's own words)."""
        if pairs is not None:
            raise ConfigError("token classification tags single texts", "drop the text pairs")
        encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length,
                            return_offsets_mapping=True)
        rows = []
        for i in range(len(texts)):
            row = {k: encoded[k][i] for k in encoded}
            row["word_index"] = [w if w is not None else -1 for w in encoded.word_ids(i)]
            rows.append(row)
        return rows

    def logits(self, model, tokenizer, features: list[dict], **forward_kwargs) -> torch.Tensor:
        """One padded forward pass; every row's logits per token (batch x tokens x tags), on the CPU."""
        model.eval()
        device = next(p for p in model.parameters()).device
        inputs = [{k: v for k, v in f.items() if k not in _FEATURE_KEYS} for f in features]
        batch = {k: v.to(device) for k, v in self.collator(tokenizer)(inputs).items()}
        with torch.no_grad():
            return model(**batch, **forward_kwargs).logits.float().cpu()

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        """The tagged words of a text (tag and score of each word's first sub-word, character offsets) and, with
        entity tags, its entities as spans. ``features``: the row as :meth:`encode_rows` made it."""
        meta = TaggingMeta.of(meta)
        if features is None:
            raise ConfigError("a token classification record needs the row's token offsets")
        probs = row_logits.softmax(-1)
        words: list[dict[str, Any]] = []
        current = None
        for position, (word, (begin, end)) in enumerate(zip(features["word_index"], features["offset_mapping"])):
            if word < 0 or end <= begin:
                continue
            if word != current:
                best = int(probs[position].argmax())
                entry = {"word": text[begin:end], "tag": meta.labels[best], "score": float(probs[position, best]),
                         "start": int(begin), "end": int(end)}
                if probabilities:
                    entry["probabilities"] = {label: float(p) for label, p in zip(meta.labels, probs[position])}
                words.append(entry)
                current = word
            else:
                words[-1]["end"] = int(end)
                words[-1]["word"] = text[words[-1]["start"]:int(end)]
        return {"text": text, **self._spans(text, words, meta)}

    def _spans(self, text: str, words: list[dict[str, Any]], meta: TaggingMeta) -> dict[str, Any]:
        result: dict[str, Any] = {"words": words}
        if meta.scheme:
            from seqeval.metrics.sequence_labeling import get_entities

            entities = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = get_entities([w["tag"] for w in words])
            for kind, first, last in found:
                start, end = words[first]["start"], words[last]["end"]
                scores = [w["score"] for w in words[first:last + 1]]
                entities.append({"entity": kind, "text": text[start:end], "start": start, "end": end,
                                 "score": float(np.mean(scores))})
            result["entities"] = entities
        return result

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        """Raw texts (``data.text_column``) are split into words by the tokenizer; rows of words
        (``data.tokens_column``) keep theirs. One record per row: the tagged words, and the entities."""
        meta = TaggingMeta.of(meta)
        outputs = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            if all(data.tokens_column in r for r in chunk):
                words = [[str(w) for w in r[data.tokens_column]] for r in chunk]
                per_row, _ = self._word_logits(model, tokenizer, words, max_length, len(chunk))
                for row_words, row_logits in zip(words, per_row):
                    text, starts, ends = word_spans(row_words)
                    tagged = []
                    for word, begin, end, logits in zip(row_words, starts, ends, row_logits):
                        if logits is None:
                            continue  # cut off by max_length
                        probs = logits.softmax(-1)
                        best = int(probs.argmax())
                        tagged.append({"word": word, "tag": meta.labels[best], "score": float(probs[best]),
                                       "start": begin, "end": end})
                    outputs.append({data.tokens_column: row_words, **self._spans(text, tagged, meta)})
                continue
            missing = [i for i, r in enumerate(chunk) if not str(r.get(data.text_column) or "").strip()]
            if missing:
                raise DataError(f'input row {start + missing[0]} has neither "{data.tokens_column}" (a list of words) '
                                f'nor a "{data.text_column}" text', "give each row its words or its text")
            texts = [str(r[data.text_column]) for r in chunk]
            features = self.encode_rows(tokenizer, texts, None, max_length)
            for text, feature, row_logits in zip(texts, features, self.logits(model, tokenizer, features)):
                outputs.append(self.record(text, None, row_logits, meta, features=feature))
        return outputs

    # --- reference --------------------------------------------------------------------------

    def baseline(self, splits, data, meta) -> Baseline:
        """A tagger that learned only the training tags' frequencies: the most common tag (usually "O") for every
        word; scored by the family's own metrics (its loss: the cross-entropy of the tag shares)."""
        meta = TaggingMeta.of(meta)
        counts = self.label_counts(splits["train"], data, meta)
        total = sum(counts.values())
        shares = torch.tensor([max(c / total, 1e-12) for c in counts.values()])
        majority = int(shares.argmax())
        gold = [[meta.tag_id(t) for t in row] for row in splits["eval"][data.tags_column]]
        flat = torch.tensor([t for row in gold for t in row])
        loss = float(torch.nn.functional.cross_entropy(shares.log().expand(len(flat), -1), flat)) if len(flat) else 0.0
        metrics = self._metrics(gold, [[majority] * len(row) for row in gold], loss, meta)
        return Baseline("majority tag", f'always "{meta.labels[majority]}", the train split\'s most common tag: '
                                        f"{counts[meta.labels[majority]]:,} of {total:,} words", metrics,
                        classes=len(meta.labels))

