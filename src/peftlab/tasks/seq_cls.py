"""Sequence classification (and regression): single texts or text pairs, any labels."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerBase

from peftlab.config import DataConfig, ModelConfig
from peftlab.data import require_columns, require_text
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base, pad_with_eos
from peftlab.tasks.base import Baseline, Meta, model_device
from peftlab.progress import warn

_HEAD_NAMES = ("classifier", "score")


def _examples(values: Iterable[Any], limit: int = 3) -> str:
    shown = sorted({repr(v) for v in values})
    return ", ".join(shown[:limit]) + (" ..." if len(shown) > limit else "")


@dataclass
class ClassificationMeta:
    """What a classifier learns from its data: its labels (``peftlab.json`` "meta" holds ``to_dict()``)."""

    regression: bool = False  # one score per row instead of a label
    labels: list[str] = field(default_factory=list)  # the head's outputs in order (regression: the label column)
    label_kind: str | None = None  # the data's labels: "index" (0..N-1) or "name"; None: a regression run's record

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"regression": self.regression, "labels": list(self.labels)}
        if self.label_kind is not None:
            out["label_kind"] = self.label_kind
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ClassificationMeta:
        return cls(regression=bool(raw.get("regression", False)), labels=list(raw.get("labels") or []),
                   label_kind=raw.get("label_kind"))

    @classmethod
    def of(cls, meta: Meta) -> ClassificationMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)


class SequenceClassification:
    """single texts or text pairs -> one of N labels (or a number), scored by accuracy, F1, MCC"""

    name = "seq-cls"
    peft_task_type = "SEQ_CLS"
    meta_type = ClassificationMeta
    packs = False
    pipeline_tag = "text-classification"
    auto_class = AutoModelForSequenceClassification
    classifies, generates, chat = True, False, False
    embeds = False
    base_is_reference = False  # the bare base's head is untrained: the majority class is the reference
    config_section = None  # no run-config section of its own (see tasks.base.Task)
    warns_imbalance = True  # training warns once about imbalanced labels (tasks.balance)

    def main_metric(self, meta: Meta) -> str:
        return "pearson" if ClassificationMeta.of(meta).regression else "accuracy"

    def check_model(self, config, model_name: str) -> None:
        return None  # every architecture with a sequence-classification class fits

    # --- data ---------------------------------------------------------------------------

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        columns = {"text_column": data.text_column, "text_pair_column": data.text_pair_column,
                   "label_column": data.label_column}
        for split in ("train", "eval"):
            require_columns(splits[split], columns, f"the {split} split")
            for column in (data.text_column, data.text_pair_column):
                if column:
                    require_text(splits[split][column], column, f"the {split} split")
        if data.regression:
            for split in ("train", "eval"):
                bad = [v for v in splits[split][data.label_column] if not isinstance(v, (int, float))]
                if bad:
                    raise DataError(f"regression labels must be numbers; the {split} split has {_examples(bad)}")
            return ClassificationMeta(regression=True, labels=[data.label_column]).to_dict()

        feature = splits["train"].features.get(data.label_column)
        if data.labels:
            labels, kind = list(data.labels), "name"
            if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                   for v in splits["train"][data.label_column]):
                kind = "index"
        elif isinstance(feature, datasets.ClassLabel):
            labels, kind = list(feature.names), "index"
        else:
            values = set(splits["train"][data.label_column])
            if None in values:
                raise DataError(f'the train split has missing values in the label column "{data.label_column}"')
            numeric = all(isinstance(v, (int, np.integer)) for v in values)
            labels, kind = [str(v) for v in sorted(values, key=(int if numeric else str))], "name"
            if len(labels) < 2:
                raise DataError(f'the label column "{data.label_column}" has a single value ({labels[0]!r})',
                                "classification needs at least two labels")
        meta = ClassificationMeta(regression=False, labels=labels, label_kind=kind)
        for split in ("train", "eval"):
            outside = [v for v in splits[split][data.label_column] if self._label_id(v, meta) is None]
            if outside:
                raise DataError(
                    f"the {split} split has {len(outside)} label(s) outside the label set "
                    f"[{', '.join(labels)}]: {_examples(outside)}",
                    "fix the data, or list every label in data.labels",
                )
        return meta.to_dict()

    @staticmethod
    def _label_id(value: Any, meta: ClassificationMeta) -> int | None:
        labels = meta.labels
        if meta.label_kind == "index":
            if isinstance(value, (int, np.integer)) and 0 <= int(value) < len(labels):
                return int(value)
            return None
        try:
            return labels.index(str(value))
        except ValueError:
            return None

    def encode(self, dataset, tokenizer, data, meta, max_length, where="data"):
        meta = ClassificationMeta.of(meta)
        text, pair, label = data.text_column, data.text_pair_column, data.label_column
        require_columns(dataset, {"text_column": text, "text_pair_column": pair}, where)
        for column in (text, pair):
            if column:
                require_text(dataset[column], column, where)
        has_labels = label in dataset.column_names

        def tokenize(batch):
            texts = (batch[text], batch[pair] if pair else None)
            out = tokenizer(*texts, truncation=True, max_length=max_length)
            # one token more tells which rows were cut (a column, so it holds when map() reads its cache)
            out["_long"] = [len(ids) > max_length for ids in
                            tokenizer(*texts, truncation=True, max_length=max_length + 1)["input_ids"]]
            if has_labels:
                if meta.regression:
                    out["labels"] = [float(v) for v in batch[label]]
                else:
                    out["labels"] = [self._label_id(v, meta) for v in batch[label]]
            return out

        encoded = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        long_rows = sum(encoded["_long"])
        encoded = encoded.remove_columns("_long")
        if long_rows:
            warn(f"{long_rows} of {len(dataset)} rows in {where} are longer than max_length={max_length} tokens "
                 "and were truncated (raise data.max_length to keep more of each text)")
        if has_labels and not meta.regression and any(v is None for v in encoded["labels"]):
            outside = [v for v in dataset[label] if self._label_id(v, meta) is None]
            kind = "label indices" if meta.label_kind == "index" else "label names"
            raise DataError(f"{where} has {len(outside)} label(s) outside the label set "
                            f"[{', '.join(meta.labels)}]: {_examples(outside)}",
                            f"the model was trained on these {kind}: use data labelled with them "
                            f"(or point data.label_column at the column that is)")
        return encoded

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def card_columns(self, data: DataConfig) -> str:
        inputs = [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])
        return f"input {' + '.join(f'`{c}`' for c in inputs)}, label `{data.label_column}`"

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        pair = ', ["A second text"]' if data and data.text_pair_column else ""
        return [f'inputs = tokenizer(["Your text here"]{pair}, return_tensors="pt")', "print(model(**inputs).logits)"]

    def training_loss(self, meta: Meta) -> None:
        return None  # the model's own loss (from its labels)

    def packed_collator(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        return None  # a row is one text (or pair) with one label: nothing to pack

    # --- model --------------------------------------------------------------------------

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        meta = ClassificationMeta.of(meta)
        labels = meta.labels
        kwargs: dict[str, Any] = {"num_labels": len(labels)}
        if meta.regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
        return kwargs

    def load_model(self, model: ModelConfig, meta: Meta):
        return pad_with_eos(load_base(model, self.auto_class, **self.model_kwargs(meta)))

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        hidden = getattr(base_config, "hidden_size", None)
        outs = [shape[0] for key, shape in tensors.items()
                if any(f".{h}." in f".{key}" for h in _HEAD_NAMES) and key.endswith("weight") and len(shape) == 2]
        final = [n for n in outs if n != hidden] or outs
        if not final:
            raise DataError("the adapter holds no classification head (classifier/score in modules_to_save)",
                            "a seq-cls adapter must save its head, or its predictions are random")
        num_labels = min(final)
        id2label = getattr(base_config, "id2label", None) or {}
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)] if len(id2label) == num_labels else [
            f"LABEL_{i}" for i in range(num_labels)]
        return ClassificationMeta(regression=num_labels == 1, labels=labels, label_kind="index").to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        # the bare base's head is untrained: two placeholder labels (the server refuses to classify with it)
        return ClassificationMeta(regression=False, labels=["LABEL_0", "LABEL_1"], label_kind="index").to_dict()

    def needs_pairs(self, data: DataConfig) -> bool:
        return bool(data.text_pair_column)

    def accepts_pairs(self, data: DataConfig) -> bool:
        return self.needs_pairs(data)

    def labels(self, meta: Meta) -> list[str]:
        return list(ClassificationMeta.of(meta).labels)

    # --- evaluation and prediction ----------------------------------------------------

    @torch.no_grad()
    def _logits(self, model, batches):
        model.eval()
        device = model_device(model)
        all_logits, all_labels, losses = [], [], []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            all_logits.append(out.logits.float().cpu())
            if "labels" in batch:
                all_labels.append(batch["labels"].cpu())
                losses.append(out.loss.float().item() * len(batch["labels"]))
        logits = torch.cat(all_logits)
        labels = torch.cat(all_labels) if all_labels else None
        loss = sum(losses) / len(logits) if losses else None
        return logits, labels, loss

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = ClassificationMeta.of(meta)
        if not meta.regression:
            return self.label_outcomes(model, tokenizer, raw, encoded, data, meta, batch_size)[0]
        logits, labels, loss = self._scored(model, tokenizer, raw, encoded, data, batch_size)
        result: dict[str, float] = {"loss": loss, "samples": float(len(labels))}
        pred, gold = logits.squeeze(-1).numpy(), labels.numpy()
        result["pearson"] = float(stats.pearsonr(pred, gold)[0])
        result["spearman"] = float(stats.spearmanr(pred, gold)[0])
        result["mse"] = float(np.mean((pred - gold) ** 2))
        return result

    def _scored(self, model, tokenizer, raw, encoded, data, batch_size):
        from torch.utils.data import DataLoader

        batches = DataLoader(encoded, batch_size=batch_size, collate_fn=self.collator(tokenizer))
        require_columns(raw, {"label_column": data.label_column}, "the evaluation data")
        return self._logits(model, batches)

    def label_outcomes(self, model, tokenizer, raw, encoded, data, meta, batch_size):
        """``evaluate``'s metrics with the gold and predicted label ids behind them (numpy arrays).

        F1 is named for what it averages: ``f1_binary`` (two labels: F1 of the positive class, the
        second label, ``labels[1]``) or ``f1_macro`` (the unweighted mean over the labels present in the
        gold or predicted labels, scikit-learn's default); micro F1
        equals accuracy for single-label classification, so it is not reported.
        """
        meta = ClassificationMeta.of(meta)
        if meta.regression:
            raise ConfigError("a regression run predicts a number per row: it has no classes to report",
                              "its metrics (pearson, spearman, mse) are those of peftlab eval without --report")
        logits, labels, loss = self._scored(model, tokenizer, raw, encoded, data, batch_size)
        result: dict[str, float] = {"loss": loss, "samples": float(len(labels))}
        pred, gold = logits.argmax(-1).numpy(), labels.numpy()
        binary = len(meta.labels) == 2
        present = sorted(set(gold.tolist()))
        if len(present) == 1:
            warn(f'the evaluation data holds a single label ("{meta.labels[present[0]]}" in all {len(gold)} rows): '
                 "accuracy is the share predicted as it, MCC is 0 by definition and F1 says little; evaluate on data "
                 "with every label for comparable figures")
        with warnings.catch_warnings():  # scikit-learn's own notes on one-label data: said once, above
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            result["accuracy"] = float(skm.accuracy_score(gold, pred))
            f1 = "f1_binary" if binary else "f1_macro"
            result[f1] = float(skm.f1_score(gold, pred, average="binary" if binary else "macro", zero_division=0))
            result["mcc"] = float(skm.matthews_corrcoef(gold, pred))
        return result, gold, pred

    # --- class balance (training.class_weights; peftlab.tasks.balance) ------------------

    def label_counts(self, raw: datasets.Dataset, data: DataConfig, meta: Meta) -> dict[str, int]:
        """Rows per label of raw data (every label, in the head's order); a regression run: ``{}``."""
        meta = ClassificationMeta.of(meta)
        if meta.regression:
            return {}
        counts = [0] * len(meta.labels)
        for value in raw[data.label_column]:
            index = self._label_id(value, meta)
            if index is not None:
                counts[index] += 1
        return dict(zip(meta.labels, counts))

    def loss_function(self, weights: list[float]):
        """The training loss with one weight per label (head order): ``loss(model, batch) -> tensor``.

        Cross-entropy as the model computes it from ``labels``, each row weighted by its class
        (torch's weighted mean: sum of weight x loss over the sum of the weights). It reads only
        the logits, so it is the same for every technique, prompt learning included.
        """
        weight = torch.tensor(weights, dtype=torch.float32)

        def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                                                     weight=weight.to(logits.device))

        return loss

    def encode_rows(self, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None):
        """Texts (and pairs) -> token ids per row, cut at ``max_length`` (``None``: not cut)."""
        enc = tokenizer(texts, pairs, truncation=max_length is not None, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(texts))]

    def logits(self, model, tokenizer, features: list[dict], **forward_kwargs) -> torch.Tensor:
        """One padded forward pass over encoded rows; ``forward_kwargs`` e.g. peft's ``adapter_names``."""
        model.eval()
        device = next(p for p in model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collator(tokenizer)(features).items()}
        with torch.no_grad():
            return model(**batch, **forward_kwargs).logits.float().cpu()

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        """One prediction: label and score (its probability), or a regression score; optionally every label's."""
        meta = ClassificationMeta.of(meta)
        record: dict[str, Any] = {"text": text}
        if pair is not None:
            record["text_pair"] = pair
        if meta.regression:
            record["score"] = float(row_logits[0])
            return record
        probs = row_logits.softmax(-1)
        best = int(probs.argmax())
        record.update(label=meta.labels[best], score=float(probs[best]))
        if probabilities:
            record["probabilities"] = {label: float(p) for label, p in zip(meta.labels, probs)}
        return record

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        meta = ClassificationMeta.of(meta)
        text, pair = data.text_column, data.text_pair_column
        missing = [c for c in (text, pair) if c and any(c not in r for r in rows)]
        if missing:
            raise DataError(f'the input has no "{missing[0]}" field', f"set data.{'text_pair_column' if missing[0] == pair else 'text_column'} or rename the field")
        for column in (text, pair):
            if column:
                require_text([r[column] for r in rows], column, "the input")
        outputs = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            features = self.encode_rows(tokenizer, [r[text] for r in chunk], [r[pair] for r in chunk] if pair else None,
                                        max_length)
            for row, row_logits in zip(chunk, self.logits(model, tokenizer, features)):
                outputs.append(self.record(row[text], row[pair] if pair else None, row_logits, meta))
        return outputs

    def baseline(self, splits, data, meta) -> Baseline:
        """A model that learned nothing but the training labels' frequencies: it gives every eval row the logits
        log(share of each label in the train split), so it predicts the majority label everywhere (ties: the
        first label); a regression predicts the training mean. Scored by ``evaluate`` itself on those constant
        outputs (its loss is the cross-entropy of the label shares); a constant score has no correlation, so a
        regression's pearson / spearman are 0 (scipy: undefined)."""
        meta = ClassificationMeta.of(meta)
        train, gold = splits["train"][data.label_column], splits["eval"][data.label_column]
        if meta.regression:
            mean = float(np.mean(train))
            outputs, labels = torch.full((len(gold), 1), mean), torch.tensor(gold, dtype=torch.float32)
            loss = float(torch.nn.functional.mse_loss(outputs.squeeze(-1), labels))
        else:
            counts = torch.bincount(torch.tensor([self._label_id(v, meta) for v in train]), minlength=len(meta.labels))
            outputs = (counts.float() / counts.sum()).clamp_min(1e-12).log().expand(len(gold), -1)
            labels = torch.tensor([self._label_id(v, meta) for v in gold])
            loss = float(torch.nn.functional.cross_entropy(outputs, labels))
        constant = copy.copy(self)  # evaluate() as it is, on the constant outputs instead of a model's
        constant._logits = lambda model, batches: (outputs, labels, loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy: "an input array is constant"
            metrics = constant.evaluate(None, None, splits["eval"], [], data, meta, 0, 1)
        if meta.regression:
            metrics.update({k: 0.0 for k in ("pearson", "spearman") if not np.isfinite(metrics.get(k, 0.0))})
            return Baseline("training mean", f"always {mean:.4g}, the train split's mean {data.label_column}",
                            metrics)
        majority = int(counts.argmax())
        return Baseline("majority class", f'always "{meta.labels[majority]}", the train split\'s most common label: '
                                          f"{int(counts[majority]):,} of {len(train):,} rows", metrics,
                        classes=len(meta.labels))
