"""Extractive question answering: the answer is a span of the passage (SQuAD v1.1 / v2.0).

Rows hold a question (``data.question_column``), a passage (``data.context_column``) and SQuAD's answers
(``data.answers_column``: ``{"text": [...], "answer_start": [...]}``, character offsets into the passage; empty
lists: the passage does not answer the question, as in SQuAD v2.0). The question goes first and the passage
second; a passage longer than ``max_length`` is cut into overlapping windows (``data.doc_stride`` tokens shared by
neighbours, the standard Hugging Face recipe). In training every window learns the start and end token of the
answer, or the first token (CLS, index 0) where the answer is not inside that window or the row has none.

Evaluation and prediction read every window of a row and keep the best span over them (start <= end, at most
``data.max_answer_length`` tokens, only passage tokens); with unanswerable rows in the data (``version_2``) the
null answer (the CLS token's start + end score, the lowest over the windows) wins when it beats that span. Metrics:
exact match and F1 exactly as the official SQuAD v2.0 evaluation script computes them (it agrees with v1.1 on
answerable questions), as fractions 0-1, plus the model's loss over the windows.

Serving answers through ``/v1/classify`` (input: the question, input_pair: the passage): :meth:`encode_rows` gives
one feature per row that carries all of the row's windows, :meth:`logits` returns one tensor per row
(windows x tokens x 2: start and end scores) and :meth:`record` picks the span as ``predict`` does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from peftlab.config import DataConfig, ModelConfig
from peftlab.data import require_columns
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base, pad_with_eos
from peftlab.progress import warn
from peftlab.tasks.base import Baseline, Meta, WithoutClasses, model_device

CLS = 0  # the token a window's "no answer here" points at
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# serving's windows, where encode_rows is given no max_length: the Hugging Face question-answering pipeline's
# 384-token windows (or the tokenizer's limit), sharing data.doc_stride's default
_SERVING_WINDOW = 384
_DEFAULT_STRIDE = DataConfig.model_fields["doc_stride"].default

# --- SQuAD's answer normalisation and scores (the official v2.0 evaluation script) -------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a / an / the), single spaces: SQuAD's ``normalize_answer``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_score(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(gold: str, prediction: str) -> float:
    """Token overlap F1 of the normalised answers; an empty one scores 1 only against an empty one."""
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(golds: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Mean exact match and F1 (fractions 0-1): each row's best over its gold answers; a row whose gold answers
    are all empty after normalisation is unanswerable and scores 1 when the prediction is empty."""
    exact = f1 = 0.0
    for answers, prediction in zip(golds, predictions):
        answers = [a for a in answers if normalize_answer(a)] or [""]
        exact += max(exact_score(a, prediction) for a in answers)
        f1 += max(f1_score(a, prediction) for a in answers)
    count = max(1, len(predictions))
    return {"exact_match": exact / count, "f1": f1 / count, "samples": float(len(predictions))}


# --- typed meta ---------------------------------------------------------------------------------

@dataclass
class QAMeta:
    """What a question-answering run learns from its data (``peftlab.json`` "meta" holds ``to_dict()``)."""

    version_2: bool = False  # the data has unanswerable rows: the null answer may win
    max_answer_length: int = 30  # tokens (serving's span limit: data.max_answer_length of the run)

    def to_dict(self) -> dict[str, Any]:
        return {"version_2": self.version_2, "max_answer_length": self.max_answer_length}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QAMeta:
        return cls(version_2=bool(raw.get("version_2", False)), max_answer_length=int(raw.get("max_answer_length", 30)))

    @classmethod
    def of(cls, meta: Mapping[str, Any] | QAMeta) -> QAMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)


# --- windows ------------------------------------------------------------------------------------

def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("question answering needs a fast tokenizer (character offsets to map answers to tokens)",
                          "load the model's fast tokenizer (the tokenizers library)")


def windows(tokenizer, questions: list[str], contexts: list[str], max_length: int,
            stride: int) -> tuple[list[list[dict[str, Any]]], int]:
    """Each row's windows: the question, then a part of the passage, at most ``max_length`` tokens; neighbours
    share ``stride`` passage tokens (at most half of the passage's room). A window: its model inputs and ``offsets``, the character span of each token in
    the passage (None: not a passage token). A question longer than half the room is cut to it (counted in the
    second value) so that every window holds some of the passage."""
    _require_fast(tokenizer)
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max(1, (max_length - specials) // 2)
    questions = [str(q).lstrip() for q in questions]
    asked = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    cut, lengths = 0, []
    for i, offsets in enumerate(asked["offset_mapping"]):
        if len(offsets) > room:
            questions[i] = questions[i][:offsets[room - 1][1]]
            cut += 1
        lengths.append(min(len(offsets), room))
    # at most half the passage's room in a window (the tokenizer refuses a stride as long as the room, and a longer
    # one would move each window by a token or two): shorter where a question is long
    strides = [max(0, min(stride, (max_length - specials - n) // 2)) for n in lengths]
    found: list[list[dict[str, Any]]] = [[] for _ in questions]
    for step in sorted(set(strides)):
        rows = [i for i, s in enumerate(strides) if s == step]
        encoded = tokenizer([questions[i] for i in rows], [str(contexts[i]) for i in rows], truncation="only_second",
                            max_length=max_length, stride=step, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        for j, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence = encoded.sequence_ids(j)
            window = {k: encoded[k][j] for k in _MODEL_INPUTS if k in encoded}
            window["offsets"] = [tuple(span) if part == 1 and span[1] > span[0] else None
                                 for part, span in zip(sequence, encoded["offset_mapping"][j])]
            found[rows[sample]].append(window)
    return found, cut


def window_targets(offsets: list[tuple[int, int] | None], start: int | None, end: int | None) -> tuple[int, int]:
    """The answer's first and last token in a window (characters ``start``-``end`` of the passage); CLS (0, 0) when
    the row has no answer or the window does not hold all of it."""
    if start is None:
        return CLS, CLS
    inside = [t for t, span in enumerate(offsets) if span is not None]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return CLS, CLS
    covering = [t for t in inside if offsets[t][1] > start and offsets[t][0] < end]
    return (covering[0], covering[-1]) if covering else (CLS, CLS)


def best_answer(context: str, scores: Sequence[torch.Tensor], offsets: Sequence[list[tuple[int, int] | None]],
                max_answer_length: int, allow_null: bool) -> dict[str, Any]:
    """The answer of one row from its windows' start / end scores (``scores[w]``: tokens x 2, the window's own
    length): the best span over all windows (start + end score; start <= end, at most ``max_answer_length`` tokens,
    passage tokens only). With ``allow_null`` the null answer (CLS start + end, the lowest over the windows) wins
    when it beats that span. ``score``: the answer's probability in its window (softmax of start times end)."""
    best, null = None, None
    for w, (window, spans) in enumerate(zip(scores, offsets)):
        start, end = window[:, 0].float(), window[:, 1].float()
        valid = torch.tensor([span is not None for span in spans], dtype=torch.bool)
        if allow_null:
            score = float(start[CLS] + end[CLS])
            if null is None or score < null[0]:
                null = (score, w, CLS, CLS)
        if not bool(valid.any()):
            continue
        n = len(spans)
        index = torch.arange(n)
        length = index[None, :] - index[:, None]
        allowed = valid[:, None] & valid[None, :] & (length >= 0) & (length < max_answer_length)
        table = (start[:, None] + end[None, :]).masked_fill(~allowed, float("-inf"))
        flat = int(table.argmax())
        score = float(table.view(-1)[flat])
        if score != float("-inf") and (best is None or score > best[0]):
            best = (score, w, flat // n, flat % n)
    chosen = null if best is None or (null is not None and null[0] > best[0]) else best
    if chosen is None:  # no passage token at all (an empty passage) and no null answer
        return {"answer": "", "start": None, "end": None, "score": 0.0}
    _, w, first, last = chosen
    window = scores[w].float()
    probability = float(window[:, 0].softmax(-1)[first] * window[:, 1].softmax(-1)[last])
    if chosen is null:
        return {"answer": "", "start": None, "end": None, "score": probability}
    begin, finish = offsets[w][first][0], offsets[w][last][1]
    return {"answer": context[begin:finish], "start": int(begin), "end": int(finish), "score": probability}


# --- the family ---------------------------------------------------------------------------------

class QuestionAnswering(WithoutClasses):
    """question + passage -> the answer span (or none, SQuAD v2.0), scored by SQuAD exact match and F1"""

    name = "qa"
    peft_task_type = "QUESTION_ANS"
    meta_type = QAMeta
    packs = False
    pipeline_tag = "question-answering"
    auto_class = AutoModelForQuestionAnswering
    classifies = True  # serving: /v1/classify with input = the question, input_pair = the passage
    generates = False
    chat = False
    embeds = False
    base_is_reference = False  # the bare base's qa_outputs head is untrained: the empty answer is the reference
    config_section = None  # no run-config section of its own (see tasks.base.Task)
    # class weights and eval --report refused (WithoutClasses) with this message and fix
    no_classes = ("question answering has no classes: its head scores each token as the answer's start and end",
                  "use peftlab eval (exact_match, f1)")
    warns_imbalance = False  # no classes

    def main_metric(self, meta: Meta) -> str:
        return "f1"

    def check_model(self, config, model_name: str) -> None:
        kind = getattr(config, "model_type", None)
        if kind not in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
            raise ConfigError(f"{model_name} ({kind}) has no extractive question-answering head in transformers "
                              "(AutoModelForQuestionAnswering)",
                              "use an encoder such as bert-base-cased, roberta-base, deberta-v3-base")

    # --- data -------------------------------------------------------------------------

    def _columns(self, data: DataConfig, answers: bool = True) -> dict[str, str]:
        columns = {"question_column": data.question_column, "context_column": data.context_column}
        return {**columns, "answers_column": data.answers_column} if answers else columns

    def _answers(self, rows: datasets.Dataset, data: DataConfig, where: str) -> list[tuple[list[str], list[int]]]:
        """Every row's answer texts and starts, checked: non-empty question and passage, each answer found at its
        ``answer_start`` in the passage."""
        found = []
        columns = zip(rows[data.question_column], rows[data.context_column], rows[data.answers_column])
        for index, (question, context, answers) in enumerate(columns):
            for column, value in ((data.question_column, question), (data.context_column, context)):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f'{where} row {index} has an empty "{column}"', "fill or drop that row")
            if not isinstance(answers, Mapping) or not {"text", "answer_start"} <= set(answers):
                raise DataError(f'{where} row {index}: "{data.answers_column}" must hold SQuAD\'s answers, '
                                f'{{"text": [...], "answer_start": [...]}}, got {str(answers)[:60]!r}',
                                'e.g. {"text": ["Denver Broncos"], "answer_start": [177]}; empty lists: no answer')
            texts, starts = list(answers["text"] or []), list(answers["answer_start"] or [])
            if len(texts) != len(starts):
                raise DataError(f"{where} row {index} has {len(texts)} answer texts but {len(starts)} answer_start",
                                "give one answer_start per answer text")
            for text, start in zip(texts, starts):
                if not isinstance(start, int) or isinstance(start, bool) or not str(text):
                    raise DataError(f"{where} row {index}: an answer needs a text and an integer answer_start, got "
                                    f"{text!r} at {start!r}")
                if context[start:start + len(text)] != text:
                    elsewhere = context.find(text)
                    hint = (f"the text is at character {elsewhere}" if elsewhere >= 0
                            else "the text is nowhere in the passage")
                    raise DataError(f"{where} row {index}: answer {text!r} does not start at character {start} of "
                                    f"the passage (found {context[start:start + len(text)]!r} there)",
                                    f"{hint}; answer_start counts characters of the passage from 0")
            found.append((texts, starts))
        return found

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        unanswerable = False
        for name in ("train", "eval"):
            require_columns(splits[name], self._columns(data), f"the {name} split")
            unanswerable |= any(not texts for texts, _ in self._answers(splits[name], data, f"the {name} split"))
        return QAMeta(version_2=unanswerable, max_answer_length=data.max_answer_length).to_dict()

    def _cut_warning(self, cut: int, total: int, where: str | None, max_length: int) -> None:
        if cut and where:
            warn(f"{cut} of {total} questions in {where} are too long for max_length={max_length} tokens: each was "
                 "cut to half a window so that the passage keeps the other half (raise data.max_length)")

    def _targets(self, rows_windows, answers) -> list[list[tuple[int, int]]]:
        """Each window's start and end token, from the row's first answer (training's and the loss's targets)."""
        targets = []
        for row_windows, (texts, starts) in zip(rows_windows, answers):
            first = (starts[0], starts[0] + len(texts[0])) if texts else (None, None)
            targets.append([window_targets(window["offsets"], *first) for window in row_windows])
        return targets

    def encode(self, dataset, tokenizer, data, meta, max_length, where):
        require_columns(dataset, self._columns(data), where)
        answers = self._answers(dataset, data, where)
        rows_windows, cut = windows(tokenizer, dataset[data.question_column], dataset[data.context_column],
                                    max_length, data.doc_stride)
        self._cut_warning(cut, len(dataset), where, max_length)
        columns: dict[str, list] = {}
        for row_windows, targets in zip(rows_windows, self._targets(rows_windows, answers)):
            for window, (start, end) in zip(row_windows, targets):
                for key in _MODEL_INPUTS:
                    if key in window:
                        columns.setdefault(key, []).append(window[key])
                columns.setdefault("start_positions", []).append(start)
                columns.setdefault("end_positions", []).append(end)
        return datasets.Dataset.from_dict(columns)

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def card_columns(self, data: DataConfig) -> str:
        return (f"question `{data.question_column}`, passage `{data.context_column}`, answers `{data.answers_column}` "
                "(SQuAD layout)")

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return ['inputs = tokenizer(["Your question?"], ["The passage that answers it."], return_tensors="pt")',
                "out = model(**inputs)",
                "start, end = int(out.start_logits.argmax()), int(out.end_logits.argmax())",
                'print(tokenizer.decode(inputs["input_ids"][0][start:end + 1]))']

    def training_loss(self, meta: Meta) -> None:
        return None  # the model's own loss (the mean of the start and end cross-entropies)

    def packed_collator(self, tokenizer) -> None:
        return None

    # --- model --------------------------------------------------------------------------

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        return {}  # the head always has two outputs: start and end

    def load_model(self, model: ModelConfig, meta: Meta):
        return pad_with_eos(load_base(model, self.auto_class, **self.model_kwargs(meta)))

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        """A plain-peft adapter: its ``qa_outputs`` head must score start and end (2 outputs). Whether it learned
        unanswerable questions is unknown, so it always answers with its best span (as transformers' pipeline)."""
        outs = [shape[0] for key, shape in tensors.items()
                if ".qa_outputs." in f".{key}" and key.endswith("weight") and len(shape) == 2]
        if outs and min(outs) != 2:
            raise DataError(f"the adapter's qa_outputs head has {min(outs)} outputs; a question-answering head "
                            "has 2 (start and end)", "is it an adapter of another task?")
        return QAMeta().to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return QAMeta().to_dict()

    def needs_pairs(self, data: DataConfig) -> bool:
        return True  # a question and its passage

    def accepts_pairs(self, data: DataConfig) -> bool:
        return True

    def labels(self, meta: Meta) -> list[str]:
        return ["start", "end"]  # the head's two outputs per token

    # --- forward passes -------------------------------------------------------------------

    @torch.no_grad()
    def _run_windows(self, model, tokenizer, flat: list[dict[str, Any]], batch_size: int,
                     targets: list[tuple[int, int]] | None = None,
                     adapter_names: list[str] | None = None) -> tuple[list[torch.Tensor], float | None]:
        """Start / end scores of every window (tokens x 2, its own length, on the CPU), in padded batches; with
        ``targets`` also the model's mean loss over the windows."""
        model.eval()
        device = model_device(model)
        collate = self.collator(tokenizer)
        scores, loss_sum = [], 0.0
        for begin in range(0, len(flat), max(1, batch_size)):
            chunk = flat[begin:begin + batch_size]
            features = [{k: w[k] for k in _MODEL_INPUTS if k in w} for w in chunk]
            if targets is not None:
                for feature, (start, end) in zip(features, targets[begin:begin + batch_size]):
                    feature.update(start_positions=start, end_positions=end)
            batch = {k: v.to(device) for k, v in collate(features).items()}
            extra = {"adapter_names": adapter_names[begin:begin + batch_size]} if adapter_names else {}
            out = model(**batch, **extra)
            both = torch.stack([out.start_logits, out.end_logits], dim=-1).float().cpu()
            scores.extend(both[i, :len(w["input_ids"])] for i, w in enumerate(chunk))
            if targets is not None:
                loss_sum += out.loss.float().item() * len(chunk)
        return scores, (loss_sum / len(flat) if targets is not None and flat else None)

    def _answer_rows(self, model, tokenizer, contexts: list[str], rows_windows, batch_size: int, meta: QAMeta,
                     max_answer_length: int, answers=None):
        """Each row's answer (:func:`best_answer`) and, with ``answers``, the mean loss over the windows."""
        flat = [w for row in rows_windows for w in row]
        targets = [t for row in self._targets(rows_windows, answers) for t in row] if answers is not None else None
        scores, loss = self._run_windows(model, tokenizer, flat, batch_size, targets)
        found, position = [], 0
        for context, row_windows in zip(contexts, rows_windows):
            mine = scores[position:position + len(row_windows)]
            position += len(row_windows)
            found.append(best_answer(context, mine, [w["offsets"] for w in row_windows], max_answer_length,
                                     meta.version_2))
        return found, loss

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = QAMeta.of(meta)
        require_columns(raw, self._columns(data), "the evaluation data")
        answers = self._answers(raw, data, "the evaluation data")
        contexts = raw[data.context_column]
        rows_windows, cut = windows(tokenizer, raw[data.question_column], contexts, max_length, data.doc_stride)
        found, loss = self._answer_rows(model, tokenizer, contexts, rows_windows, batch_size, meta,
                                        data.max_answer_length, answers)
        metrics = squad_scores([texts for texts, _ in answers], [f["answer"] for f in found])
        return {"loss": loss if loss is not None else float("nan"), **metrics}

    # --- prediction and serving -----------------------------------------------------------

    def encode_rows(self, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None):
        """Questions (``texts``) and passages (``pairs``) -> one feature per row holding all of its windows
        (``windows``; ``input_ids``: the first window's, for length checks). ``max_length`` None (serving): windows
        of the tokenizer's limit, at most 384 tokens (transformers' question-answering pipeline), sharing 64."""
        if pairs is None:
            raise ConfigError("question answering reads a question and a passage",
                              "give the passage as the pair (input_pair, --pair)")
        limit = int(tokenizer.model_max_length) if tokenizer.model_max_length < 1e9 else _SERVING_WINDOW
        length = max_length or min(limit, _SERVING_WINDOW)
        return self._features(tokenizer, texts, pairs, length, _DEFAULT_STRIDE)

    def _features(self, tokenizer, questions, contexts, max_length: int, stride: int, where: str | None = None):
        rows_windows, cut = windows(tokenizer, questions, contexts, max_length, stride)
        self._cut_warning(cut, len(questions), where, max_length)
        return [{"input_ids": row[0]["input_ids"], "windows": row} for row in rows_windows]

    def logits(self, model, tokenizer, features: list[dict], **forward_kwargs) -> list[torch.Tensor]:
        """Every window of every row in padded batches; one tensor per row (windows x tokens x 2: start and end
        scores; a window shorter than the row's longest is padded with -inf), on the CPU."""
        flat = [w for f in features for w in f["windows"]]
        names = forward_kwargs.pop("adapter_names", None)
        if names is not None:  # peft's mixed batches: one adapter name per window
            names = [name for name, f in zip(names, features) for _ in f["windows"]]
        if forward_kwargs:
            raise ConfigError(f"unexpected forward arguments: {', '.join(forward_kwargs)}")
        scores, _ = self._run_windows(model, tokenizer, flat, 32, adapter_names=names)
        rows, position = [], 0
        for f in features:
            mine = scores[position:position + len(f["windows"])]
            position += len(f["windows"])
            longest = max(len(s) for s in mine)
            padded = torch.full((len(mine), longest, 2), float("-inf"))
            for i, s in enumerate(mine):
                padded[i, :len(s)] = s
            rows.append(padded)
        return rows

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer to question ``text`` in passage ``pair`` from the row's window scores, as ``predict`` picks
        it; ``features``: the row as :meth:`encode_rows` made it (its windows' offsets). ``probabilities`` adds
        nothing (there are no classes)."""
        meta = QAMeta.of(meta)
        if features is None or pair is None:
            raise ConfigError("a question-answering record needs the passage and its windows' offsets")
        offsets = [w["offsets"] for w in features["windows"]]
        scores = [row_logits[i, :len(w["input_ids"])] for i, w in enumerate(features["windows"])]
        return {"question": text, "context": pair,
                **best_answer(pair, scores, offsets, meta.max_answer_length, meta.version_2)}

    def _inputs(self, rows: list[dict[str, Any]], data: DataConfig) -> tuple[list[str], list[str]]:
        """Questions and passages of raw rows: the question / context columns, else the text / text-pair ones
        (``peftlab predict --text QUESTION --pair PASSAGE``)."""
        questions, contexts = [], []
        for index, row in enumerate(rows):
            question = row.get(data.question_column, row.get(data.text_column))
            context = row.get(data.context_column, row.get(data.text_pair_column or "text_pair"))
            if not str(question or "").strip() or not str(context or "").strip():
                raise DataError(f'input row {index} needs a question ("{data.question_column}") and a passage '
                                f'("{data.context_column}")', "e.g. peftlab predict RUN --text QUESTION --pair "
                                                              "PASSAGE, or a file with those columns")
            questions.append(str(question))
            contexts.append(str(context))
        return questions, contexts

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        """One record per row: the question, the passage, the answer with its character span in the passage
        (``context[start:end] == answer``; the null answer: "" with start / end None) and its probability."""
        meta = QAMeta.of(meta)
        questions, contexts = self._inputs(rows, data)
        outputs = []
        for begin in range(0, len(rows), max(1, batch_size)):
            qs, cs = questions[begin:begin + batch_size], contexts[begin:begin + batch_size]
            features = self._features(tokenizer, qs, cs, max_length, data.doc_stride, "the input rows")
            row_meta = QAMeta(version_2=meta.version_2, max_answer_length=data.max_answer_length)
            for q, c, feature, row_logits in zip(qs, cs, features, self.logits(model, tokenizer, features)):
                outputs.append(self.record(q, c, row_logits, row_meta, features=feature))
        return outputs

    # --- reference --------------------------------------------------------------------------

    def baseline(self, splits, data, meta) -> Baseline:
        """A model that learned nothing answers nothing: the empty answer for every row, which scores 1 on the
        unanswerable rows (SQuAD v2.0) and 0 on the rest; scored by the family's own exact match and F1."""
        golds = [texts for texts, _ in self._answers(splits["eval"], data, "the eval split")]
        metrics = squad_scores(golds, [""] * len(golds))
        none = sum(1 for texts in golds if not texts)
        return Baseline("empty answer", f'always the empty answer ("no answer in the passage"): right on the {none:,} '
                                        f"unanswerable of {len(golds):,} rows", metrics)
